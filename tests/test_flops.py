"""bench/flops.py: forward FLOPs per token, checked against hand counts and against the memory's own mask."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import flops  # noqa: E402
from convgpt_ops import chunk_memory_mask  # noqa: E402
from train_gpt import Hyperparameters  # noqa: E402


@pytest.mark.parametrize("T,chunk,topk", [(1024, 64, 4), (200, 16, 3), (64, 16, 0), (70, 32, 9)])
def test_memory_keys_equal_the_visible_keys_of_the_reference_mask(T, chunk, topk):
    q, k = torch.randn(1, 2, T, 8), torch.randn(1, 1, T, 8)
    assert flops.memory_keys(T, chunk, topk) * 2 == int(chunk_memory_mask(q, k, chunk, topk).sum())


def test_default_model_matches_a_hand_count():
    a = Hyperparameters()
    count = flops.count_forward_flops(a)
    d, hd, hidden, n_mem = a.model_dim, a.head_dim, round(a.mlp_mult * a.model_dim), a.num_layers // a.mem_every
    n_conv, taps = a.num_layers - n_mem, a.conv1d_k + a.conv2d_k ** 2
    per_token = {
        "embed": 2 * a.bigram_dim * d,
        "conv": n_conv * 2 * (d * 2 * d + d * d + taps * d),
        "memory_proj": n_mem * 2 * (d * d + d * 2 * a.num_kv_heads * hd + d * d),
        "mlp": a.num_layers * 2 * 2 * d * hidden,
        "memory_route": n_mem * 2 * a.num_heads * hd * ((a.train_seq_len - 1) // a.mem_chunk),
        "memory_attn": n_mem * 4 * a.num_heads * hd * flops.memory_keys(a.train_seq_len, a.mem_chunk, a.mem_topk) / a.train_seq_len,
        "head": 2 * d * a.vocab_size,
    }
    assert count.per_token == pytest.approx(per_token, rel=1e-12) and count.total == pytest.approx(sum(per_token.values()))


def test_dense_memory_is_causal_attention_without_routing_and_costs_grow_with_topk():
    dense = flops.count_forward_flops(Hyperparameters(mem_topk=1_000_000), 2048)
    a = Hyperparameters()
    assert dense.seq_len == 2048 and dense.per_token["memory_route"] == 0
    assert dense.per_token["memory_attn"] == (a.num_layers // a.mem_every) * 4 * a.num_heads * a.head_dim * (2048 + 1) / 2
    totals = [flops.count_forward_flops(Hyperparameters(mem_topk=k)).total for k in (1, 2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    no_memory = flops.count_forward_flops(Hyperparameters(mem_every=0))
    assert no_memory.per_token["memory_attn"] == no_memory.per_token["memory_proj"] == 0


def test_cli_reads_the_trainer_settings(capsys):
    assert flops.main(["--json", "--seq-len", "512"], {"MEM_TOPK": "2", "NUM_LAYERS": "4"}) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seq_len"] == 512 and out["total"] == pytest.approx(sum(out["per_token"].values()))
    assert out["total"] == pytest.approx(flops.count_forward_flops(Hyperparameters(mem_topk=2, num_layers=4), 512).total)
    assert flops.main([], {"MEM_TOPK": "x"}) == 2 and "MEM_TOPK='x' is not a valid int" in capsys.readouterr().err


def test_parallel_blocks_cost_the_same():
    a = flops.count_forward_flops(Hyperparameters())
    assert flops.count_forward_flops(Hyperparameters(parallel_from=0)).per_token == pytest.approx(a.per_token)
