"""Incremental decoding (ConvGPT.forward_logits with a cache) and tools/sample.py: parity with the full forward at
every position, the decoding state, the sampler, and its bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import ROOT, TINY_ENV
from convgpt_ops import chunk_memory_ref
from tools import sample

LAYOUTS = {  # the decoder must match the full forward in each (issue 24)
    "default": {},
    "dense": {"MEM_EVERY": "1", "MEM_TOPK": "1000000"},
    "conv1d_only": {"CONV2D_K": "0"},
    "half_rope": {"MEM_ROPE": "half", "NUM_LAYERS": "8"},
    "sequential": {"PARALLEL_FROM": "0"},
}
SEQ = 1024
PARITY_ATOL = 1e-4  # fp32 logits, issue 24


def random_model(**env: str) -> train_gpt.ConvGPT:
    """A small model at seq 1024 whose every weight is random (zero-initialised projections included), so that each
    branch moves the logits; chunks of 64, top-3 of up to 15 earlier chunks."""
    args = train_gpt.Hyperparameters.from_env({"NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                               "TRAIN_SEQ_LEN": str(SEQ), "MEM_CHUNK": "64", "MEM_TOPK": "3",
                                               "BIGRAM_BUCKETS": "64", "BIGRAM_DIM": "16", **env})
    torch.manual_seed(0)
    model = train_gpt.ConvGPT(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(2, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = train_gpt.BOS_ID
    ids[0, length * 3 // 10] = train_gpt.BOS_ID  # a document boundary inside: SmearGate and BigramHash must see it
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_decoder_equals_the_full_forward_at_every_position(layout: str) -> None:
    model = random_model(**LAYOUTS[layout])
    ids = tokens(2, SEQ)
    steps = [5, 1, 1, 58, 1, 3, 64] + [1] * (SEQ - 133)  # a prompt, single tokens, and blocks across chunk edges
    with torch.no_grad():
        full = model.forward_logits(ids)
        cache, out, t = {}, [], 0
        for n in steps:
            out.append(model.forward_logits(ids[:, t:t + n], cache))
            t += n
    assert t == SEQ
    err = (torch.cat(out, 1) - full).abs().amax((0, 2))
    assert err.numel() == SEQ and float(err.max()) <= PARITY_ATOL, f"worst position {int(err.argmax())}: {float(err.max())}"


def test_decoder_state_holds_tap_sources_and_memory_keys_per_token() -> None:
    """Per token: u (model_dim) in each ConvMix, k and v (2 x kv heads x head dim) in each ChunkMemory; no more."""
    model = random_model()
    a = model.args
    cache = {}
    with torch.no_grad():
        model.forward_logits(tokens(1, 100), cache)
    kinds = [type(b.mixer).__name__ for b in model.blocks]
    assert kinds == ["ConvMix", "ChunkMemory"] * 2
    for i, kind in enumerate(kinds):
        shapes = {name: tuple(t.shape) for name, t in cache[i].items()}
        assert shapes == ({"u": (1, 100, a.model_dim)} if kind == "ConvMix" else
                          {"k": (1, a.num_kv_heads, 100, a.head_dim), "v": (1, a.num_kv_heads, 100, a.head_dim)})
    assert tuple(cache["ids"].shape) == (1, 100)


def test_decoder_refuses_to_run_past_the_longest_sequence() -> None:
    model = random_model(TRAIN_SEQ_LEN="64")
    cache = {}
    with torch.no_grad():
        model.forward_logits(tokens(1, 64), cache)
        with pytest.raises(ValueError, match="longer than the model's 64"):
            model.forward_logits(tokens(1, 1), cache)
        with pytest.raises(ValueError, match="adds none"):  # an empty step would re-append the context rows
            model.forward_logits(tokens(1, 1)[:, :0], cache)
    assert {key: tuple(t.shape) for key, t in cache[0].items()} == {"u": (1, 64, 64)}  # the refused steps left no trace
    assert tuple(cache["ids"].shape) == (1, 64)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels run on CPU only in Triton's "
                    "interpreter; on a GPU they run compiled")
def test_decoding_with_the_kernels_switched_on_stays_on_the_reference_path() -> None:
    """The kernels take whole sequences only; with a cache both mixers must take their reference path."""
    model = random_model(TRAIN_SEQ_LEN="128", MEM_CHUNK="16", MEM_TOPK="2")
    ids = tokens(1, 128)
    with torch.no_grad():
        full = model.forward_logits(ids)
        train_gpt.set_triton(model, True)
        cache = {}
        out = [model.forward_logits(ids[:, :50], cache), model.forward_logits(ids[:, 50:100], cache)]  # a block of
        out += [model.forward_logits(ids[:, t:t + 1], cache) for t in range(100, 128)]  # 50 new: routed, not dense
    assert float((torch.cat(out, 1) - full).abs().max()) <= PARITY_ATOL


@pytest.mark.parametrize("topk", [0, 2, 1000])
def test_memory_of_the_last_queries_equals_the_full_memorys_rows(topk: int) -> None:
    """chunk_memory_ref with q holding the last Tq of k's positions is the full result's last Tq rows."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 70, 8, generator=g) for h in (4, 2, 2))
    full = chunk_memory_ref(q, k, v, 16, topk)
    for tq in (1, 5, 16, 17, 69, 70):
        torch.testing.assert_close(chunk_memory_ref(q[:, :, -tq:], k, v, 16, topk), full[:, :, -tq:], atol=1e-5, rtol=1e-5)


def test_next_token_greedy_top_k_and_seeds() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    assert torch.equal(sample.next_token(logits, 0.0, 0, g(1)), logits.argmax(-1))
    assert torch.equal(sample.next_token(logits, 1.0, 1, g(1)), logits.argmax(-1))
    draws = torch.stack([sample.next_token(logits, 1.0, 5, g(s)) for s in range(40)])
    top5 = logits.topk(5, -1).indices
    assert all(bool((draws[:, r, None] == top5[r]).any(-1).all()) for r in range(3))
    assert len(set(draws[:, 0].tolist())) > 1
    assert torch.equal(sample.next_token(logits, 0.8, 0, g(9)), sample.next_token(logits, 0.8, 0, g(9)))


def test_generate_is_greedy_decoding_of_the_full_forward() -> None:
    model = random_model()
    prompt = tokens(2, 7)
    new = sample.generate(model, prompt, 12)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat((ids, model.forward_logits(ids)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(new, ids[:, 7:])


class Scripted:
    """forward_logits whose argmax is the next token of a script per row (BOS = 1 ends a document)."""

    def __init__(self, script: list[list[int]]):
        self.script, self.calls = torch.tensor(script), []

    def forward_logits(self, ids: torch.Tensor, cache: dict) -> torch.Tensor:
        self.calls.append(ids.shape[1])
        step = len(self.calls) - 1
        return torch.nn.functional.one_hot(self.script[:, step], 32).float()[:, None].expand(-1, ids.shape[1], -1)


class Pieces:
    """A stand-in tokenizer: a piece per character (ids from 10), decoded back."""

    def encode(self, text: str) -> list[int]:
        return [10 + ord(c) - ord("a") for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i - 10) if i >= 10 else "?" for i in ids)


def test_sample_prompts_cut_each_sample_at_its_bos_and_keep_the_prompt_order() -> None:
    model = Scripted([[1, 12, 12], [13, 1, 12]])  # the rows of prompts "ab" and "cd" (one batch: 3 tokens each)
    model.args = train_gpt.Hyperparameters(train_seq_len=8)
    samples = sample.sample_prompts(model, Pieces(), ["ab", "cd"], 3, 0.0, 0, 1)
    assert [(s.prompt, s.ids, s.text) for s in samples] == [("ab", [], "ab"), ("cd", [13], "cdd")]


def test_prompt_and_new_tokens_must_fit_the_longest_sequence() -> None:
    """The last new token is never fed back: prompt + new - 1 positions must fit."""
    assert sample.encode(Pieces(), ["abcd"], 8, 4) == [[1, 10, 11, 12, 13]]  # 5 + 4 - 1 = 8 positions
    with pytest.raises(train_gpt.FatalError, match="prompt 1 is 5 tokens"):
        sample.encode(Pieces(), ["abcd"], 8, 5)


def test_generate_feeds_one_token_per_step_and_stops_each_row_at_bos() -> None:
    model = Scripted([[5, 6, 1, 7, 7], [3, 4, 5, 1, 7]])
    new = sample.generate(model, torch.ones(2, 4, dtype=torch.long), 10)
    assert new.tolist() == [[5, 6, 1, 1], [3, 4, 5, 1]]  # a row past its BOS stays BOS; all done: no more steps
    assert model.calls == [4, 1, 1, 1]
    assert sample.generate(Scripted([[1, 2]]), torch.ones(1, 2, dtype=torch.long), 10).tolist() == [[1]]


def run_sample(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "sample.py"), *argv], capture_output=True, text=True,
                          timeout=120, env=env)


def test_sample_cli_prints_greedy_text_from_an_artifact(tiny_run: dict, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nof a\n")
    argv = ["--artifact", str(tiny_run["artifact"]), "--log", str(tiny_run["log"]), "--tokenizer",
            str(tiny_run["tokenizer"]), "--prompt", "one", "--prompt-file", str(prompts), "--max-new-tokens", "8",
            "--temperature", "0"]
    first, second = run_sample(*argv), run_sample(*argv)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("--- prompt:") == 3 and "sample prompts:3 new_tokens:" in first.stdout
    assert first.stdout.rsplit("sample ", 1)[0] == second.stdout.rsplit("sample ", 1)[0]  # all but the timing line

    args = sample.settings(str(tiny_run["log"]), {})
    model, _ = sample.load_model(str(tiny_run["artifact"]), args)
    sp = sample.load_tokenizer(str(tiny_run["tokenizer"]))
    (s,) = sample.sample_prompts(model, sp, ["one"], 8, 0.0, 0, 1)
    assert f"--- prompt: one\n{s.text}\n" in first.stdout and s.text.startswith("one")


@pytest.mark.parametrize("case", ["mismatch", "tokenizer", "too_long", "no_prompt", "no_log", "nan", "not_sp",
                                  "not_utf8"])
def test_sample_cli_bad_input_is_one_error_line(tiny_run: dict, tmp_path, case: str) -> None:
    base = {"--artifact": str(tiny_run["artifact"]), "--log": str(tiny_run["log"]),
            "--tokenizer": str(tiny_run["tokenizer"]), "--prompt": "the cat", "--max-new-tokens": "4"}
    env, want = None, {"mismatch": "does not match the model settings", "tokenizer": "does not exist",
                       "too_long": "exceeds the model's longest sequence of 64", "no_prompt": "no prompt",
                       "no_log": "cannot be read", "nan": "--temperature finite",
                       "not_sp": "is not a sentencepiece model", "not_utf8": "is not UTF-8 text"}[case]
    if case == "mismatch":  # the settings from the environment, one of them not the run's
        del base["--log"]
        env = {**os.environ, **TINY_ENV, "MODEL_DIM": "32"}
    elif case == "tokenizer":
        base["--tokenizer"] = str(tmp_path / "absent.model")
    elif case == "too_long":
        base["--max-new-tokens"] = "60"
    elif case == "no_prompt":
        del base["--prompt"]
    elif case == "no_log":
        base["--log"] = str(tmp_path / "absent.txt")
    elif case == "nan":
        base["--temperature"] = "nan"
    elif case == "not_sp":
        (tmp_path / "bad.model").write_bytes(b"not a model")
        base["--tokenizer"] = str(tmp_path / "bad.model")
    else:
        (tmp_path / "p.txt").write_bytes(b"\xff\xfe bad")
        base["--prompt-file"] = str(tmp_path / "p.txt")
    result = run_sample(*[x for pair in base.items() for x in pair], env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], result.stderr
