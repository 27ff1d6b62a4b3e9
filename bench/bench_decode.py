"""Decoding speed on this machine: the cached decoder (ConvGPT.forward_logits with a cache, what tools/sample.py
runs) against a full forward over the whole context for each new token, and the decoding state per token.

Runbook
  python bench/bench_decode.py                                  # default settings (d 512), contexts 128 and 1024
  python bench/bench_decode.py --contexts 256 --new-tokens 64 --env NUM_LAYERS=11 MLP_MULT=2

  The weights are random (speed does not depend on them, routing aside); batch 1, fp32, reference path, on the CPU
  unless --device. Each context C: a prompt of C - new tokens, then `new` tokens one at a time through the cache,
  so the last one sees C tokens; the full forward runs once per token at length C.
Output: one `decode ...` line per context (key:value) and a `decode_state` line. Name the hardware with the numbers.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def state_bytes_per_token(cache: dict, length: int) -> dict[str, float]:
    """Bytes per token of context held by the decoding cache, by what holds them."""
    held = {"conv_u": 0, "memory_kv": 0, "ids": cache["ids"].numel() * cache["ids"].element_size()}
    for key, layer in cache.items():
        if key != "ids":
            for name, t in layer.items():
                held["conv_u" if name == "u" else "memory_kv"] += t.numel() * t.element_size()
    return {name: value / length for name, value in held.items()}


@torch.no_grad()
def time_context(model: train_gpt.ConvGPT, context: int, new: int, device: torch.device) -> dict[str, float]:
    ids = torch.randint(2, model.args.vocab_size, (1, context), device=device)
    ids[:, 0] = train_gpt.BOS_ID
    cache: dict = {}
    model.forward_logits(ids[:, :context - new], cache)
    train_gpt.sync(device)
    t0 = time.perf_counter()
    for t in range(context - new, context):
        model.forward_logits(ids[:, t:t + 1], cache)
    train_gpt.sync(device)
    cached = (time.perf_counter() - t0) / new
    model.forward_logits(ids)
    train_gpt.sync(device)
    t0 = time.perf_counter()
    repeats = max(1, min(new, 8))
    for _ in range(repeats):
        model.forward_logits(ids)
    train_gpt.sync(device)
    full = (time.perf_counter() - t0) / repeats
    return {"cached_ms": 1000 * cached, "full_ms": 1000 * full, "cached_tok_s": 1 / cached, "full_tok_s": 1 / full,
            "speedup": full / cached, **state_bytes_per_token(cache, context)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--env", nargs="*", default=[], help="settings as NAME=VALUE")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    args = train_gpt.Hyperparameters.from_env(dict(kv.split("=", 1) for kv in a.env))
    if not all(a.new_tokens < c <= args.max_seq_len for c in a.contexts):
        print(f"error: each context must lie in {a.new_tokens + 1}..{args.max_seq_len} (TRAIN_SEQ_LEN)", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = train_gpt.ConvGPT(args).to(device).eval()
    print(f"decode_setup model_dim:{args.model_dim} num_layers:{args.num_layers} params:{sum(p.numel() for p in model.parameters())} "
          f"device:{device} cpu:{cpu_name().replace(' ', '_')} threads:{torch.get_num_threads()} "
          f"torch:{torch.__version__}")
    for context in a.contexts:
        r = time_context(model, context, a.new_tokens, device)
        print(f"decode context:{context} cached_ms:{r['cached_ms']:.2f} full_ms:{r['full_ms']:.2f} "
              f"cached_tok_s:{r['cached_tok_s']:.1f} full_tok_s:{r['full_tok_s']:.1f} speedup:{r['speedup']:.1f}")
        state = {k: v for k, v in r.items() if k in ("conv_u", "memory_kv", "ids")}
    print("decode_state bytes_per_token:" + f"{sum(state.values()):.0f} " + " ".join(f"{k}:{v:.0f}" for k, v in state.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
