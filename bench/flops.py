"""Forward FLOPs per token of a ConvGPT configuration, by component: counted, not guessed.

Runbook
  python bench/flops.py                                        # the trainer's defaults at TRAIN_SEQ_LEN
  MEM_TOPK=8 TRAIN_SEQ_LEN=2048 python bench/flops.py          # any setting, from the environment as the trainer reads it
  python bench/flops.py --seq-len 2048 --json                  # one JSON object

How it counts
  * The model is built from Hyperparameters and moved to the meta device, so nothing is computed and any size is
    cheap. One forward of one sequence runs under torch.utils.flop_counter.FlopCounterMode, which counts the matmuls
    (linear layers, the gather conv's einsum, the head) at 2 FLOPs per multiply-add. Elementwise work (norms,
    gates, activations, softmax) is not counted, as in every FLOPs-per-token convention.
  * The chunk memory is the exception. Its PyTorch reference is a masked dense attention over all T x T pairs. So
    while counting, the memory is replaced by its routing (chunk_routing runs and is counted as it is: q against
    every earlier chunk's mean key) plus the attention work that the algorithm does: each query reads its own
    chunk up to itself and the min(top-k, earlier chunks) chunks it picked, at 4 * head_dim FLOPs per key and head
    (q.k and p.v). Dense layers (top-k covering every earlier chunk) are causal attention: t + 1 keys, no routing.
    What a kernel actually executes on top of that is the cost model's business (bench/cost_model.py, issue 12).
  * One count per configuration and sequence length; components are keyed embed, conv, memory_proj,
    memory_route, memory_attn, mlp, head, and they sum to total.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from convgpt_ops import chunk_routing, memory_is_dense  # noqa: E402
from train_gpt import ConvGPT, ConvMix, Hyperparameters  # noqa: E402

FLOPS_PER_KEY_PER_DIM = 4  # q.k and p.v: one multiply-add each per key, head and head-dim element


@dataclass(frozen=True)
class FlopCount:
    seq_len: int
    per_token: dict[str, float]  # forward FLOPs per token by component

    @property
    def total(self) -> float:
        return sum(self.per_token.values())


def memory_keys(seq_len: int, chunk: int, topk: int) -> int:
    """Keys read over all queries of one sequence: own chunk up to t, plus min(topk, earlier chunks) full chunks."""
    return sum(t % chunk + 1 + chunk * min(topk, t // chunk) for t in range(seq_len))


def count_forward_flops(args: Hyperparameters, seq_len: int | None = None) -> FlopCount:
    """FLOPs per token of one forward of a seq_len-token sequence (default TRAIN_SEQ_LEN) for these settings."""
    T = seq_len or args.train_seq_len
    args = replace(args, train_seq_len=T, eval_seq_len=0)
    counter, memory = FlopCounterMode(display=False), {"route": 0, "attn": 0}

    def algorithmic_memory(q, k, v, chunk, topk):
        before = counter.get_total_flops()
        if not memory_is_dense(T, chunk, topk):
            chunk_routing(q, k, chunk, topk)
        memory["route"] += counter.get_total_flops() - before
        memory["attn"] += FLOPS_PER_KEY_PER_DIM * q.shape[0] * q.shape[1] * q.shape[3] * memory_keys(T, chunk, topk)
        return torch.empty_like(q)

    model = ConvGPT(args).to("meta")
    parts = {"embed": 0, "conv": 0, "memory_proj": 0, "mlp": 0}
    modules = [(model.bigram, "embed")] if model.bigram is not None else []
    for block in model.blocks:
        modules += [(block.mixer, "conv" if isinstance(block.mixer, ConvMix) else "memory_proj"), (block.mlp, "mlp")]
    for module, key in modules:
        module.register_forward_pre_hook(lambda *_: parts.__setitem__("start", counter.get_total_flops()))
        module.register_forward_hook(lambda *_, key=key: parts.__setitem__(key, parts[key] + counter.get_total_flops()
                                                                             - parts.pop("start")))
    with counter, mock.patch.object(train_gpt, "chunk_memory_ref", algorithmic_memory):
        model.forward_logits(torch.zeros((1, T), dtype=torch.long, device="meta"))
    parts["memory_proj"] -= memory["route"]
    parts |= {"memory_route": memory["route"], "memory_attn": memory["attn"]}
    parts["head"] = counter.get_total_flops() - sum(v for key, v in parts.items() if key != "memory_attn")
    return FlopCount(T, {key: value / T for key, value in parts.items()})


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=0, help="sequence length (default TRAIN_SEQ_LEN)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    cli = parser.parse_args(argv)
    try:
        args = Hyperparameters.from_env(env)
    except train_gpt.FatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = count_forward_flops(args, cli.seq_len or None)
    if cli.json:
        print(json.dumps({"seq_len": count.seq_len, "total": count.total, "per_token": count.per_token}))
        return 0
    print(f"forward FLOPs per token at seq_len {count.seq_len}: {count.total / 1e6:,.2f} M")
    for key, value in count.per_token.items():
        print(f"  {key:13} {value / 1e6:10,.3f} M  {100 * value / count.total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
