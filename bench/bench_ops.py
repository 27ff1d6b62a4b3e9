"""Benchmark of the ConvGPT-v2 token mixers and of a full training step; prints one table.

Runbook
  python bench/bench_ops.py                 # on a CUDA GPU: the issue-3 shapes (B*T = 524,288 tokens, d = 512)
  python bench/bench_ops.py --no-steps      # the op rows only (the preflight's training runs time whole steps)
  python bench/bench_ops.py --small         # anywhere: a small shape (on CPU, add TRITON_INTERPRET=1 to include
                                            # the Triton kernels; interpreter times say nothing about GPU speed)

Rows (forward + backward, median ms; on CUDA timed with triton.testing.do_bench, elsewhere with a wall clock):
  conv triton / conv ref                  one ConvMix's silu(g) * gather conv (1D + Hilbert taps), fwd + bwd
  memory triton / memory ref              chunk memory at MEM_TOPK, MEM_CHUNK=64, 8 query / 4 kv heads of 64
                                          (the ref rows run under torch.compile on CUDA, eagerly elsewhere)
  dense sdpa                              causal attention of the same heads (FlashAttention on Hopper)
  step default / step dense               one optimizer step of the default model and of the dense-attention
                                          configuration (MEM_EVERY=1, all chunks: same parameter count)
plus the conv kernel's achieved GB/s against this device's copy bandwidth. Numbers depend on the device: the
header line names it; record it with every number you quote.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convgpt_ops as ops  # noqa: E402
import train_gpt as tg  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def fwd_bwd(op: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out = op(*inputs)
        out.backward(torch.ones_like(out))
    return run


def leaf(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_()


def bench_conv(B: int, T: int, C: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """ConvMix's silu(g) * conv(u), u and g the two halves of one projection as in the model."""
    table = ops.conv_taps(T, 4, 3).to(device)
    inverse = ops.conv_taps_inverse(table)
    ug, w = leaf((B, T, 2 * C), device, dtype), leaf((C, table.shape[1]), device, dtype)
    ref = torch.compile(ops.gated_gather_conv_ref) if device.type == "cuda" else ops.gated_gather_conv_ref
    rows = {"conv ref": timed(fwd_bwd(lambda ug, w: ref(*ug.chunk(2, -1), table, w), ug, w), device, repeats)}
    if ops.triton_enabled(device):
        kernel = lambda ug, w: ops.gated_gather_conv(*ug.chunk(2, -1), table, inverse, w)[1]  # noqa: E731
        ms = timed(fwd_bwd(kernel, ug, w), device, repeats)
        rows["conv triton"] = ms
        # fewest bytes: forward reads u, g, writes m, y; backward reads dy, g, m, u, writes dm, dg, grad_u (and
        # reads dm twice: grad_u and grad_w)
        rows["conv triton GB/s"] = 12 * ug.numel() // 2 * ug.element_size() / ms / 1e6
    return rows


def bench_memory(B: int, T: int, heads: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype, topk: int,
                 repeats: int) -> dict[str, float]:
    """heads = (query heads, kv heads, head dim, chunk)."""
    H, Hkv, D, chunk = heads
    q, k, v = leaf((B, H, T, D), device, dtype), leaf((B, Hkv, T, D), device, dtype), leaf((B, Hkv, T, D), device, dtype)
    ref = torch.compile(ops.chunk_memory_ref, dynamic=False) if device.type == "cuda" else ops.chunk_memory_ref
    dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    rows = {"memory ref": timed(fwd_bwd(lambda *a: ref(*a, chunk, topk), q, k, v), device, repeats),
            "dense sdpa": timed(fwd_bwd(dense, q, k, v), device, repeats)}
    if ops.triton_enabled(device):
        rows["memory triton"] = timed(fwd_bwd(lambda *a: ops.chunk_memory_triton(*a, chunk, topk), q, k, v), device, repeats)
    return rows


def bench_step(env: dict[str, str], tokens: int, T: int, device: torch.device, repeats: int) -> float:
    """One optimizer step (forward, backward, Muon + Adam) on random tokens, the trainer's own code path."""
    args = tg.Hyperparameters.from_env({**env, "TRAIN_SEQ_LEN": str(T), "TRAIN_BATCH_TOKENS": str(8 * T * max(1, tokens // (8 * T)))})
    model = tg.ConvGPT(args).to(device)
    model.body_dtype = tg.body_dtype(args, device)
    tg.set_triton(model, ops.triton_enabled(device))
    step_model = torch.compile(model, dynamic=False) if device.type == "cuda" else model
    optimizers = tg.build_optimizers(model, args, tg.zeropower_via_newtonschulz5)
    x = torch.randint(0, args.vocab_size, (tokens // T, T), device=device)

    def step() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with tg.autocast(device):
            step_model(x, x).backward()
        for opt in optimizers:
            opt.step()
    return timed(step, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small shape that runs anywhere")
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--no-steps", action="store_true", help="leave out the two full training-step rows")
    cli = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = cli.small or device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    triton_note = "triton on" if ops.triton_enabled(device) else "triton off (set CONVGPT_TRITON=1 TRITON_INTERPRET=1 on CPU)"
    print(f"device:{name.replace(' ', '_')} dtype:{dtype} torch:{torch.__version__} triton:{triton.__version__} {triton_note}")
    if device.type == "cuda":
        big = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        ms = timed(lambda: big.clone(), device, 10)
        print(f"copy_bandwidth_GBps:{2 * big.numel() / ms / 1e6:.0f}")
    tokens, seq_lens, C, repeats = (512, (64, 128), 16, 2) if small else (524_288, (1024, 2048), 512, 10)
    heads = (2, 1, 16, 16) if small else (8, 4, 64, 64)
    dense_env = {"MEM_EVERY": "1", "MEM_TOPK": "1000000"}
    step_env = {"NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "MEM_CHUNK": "16",
                "MEM_TOPK": "1"} if small else {}
    print(f"{'T':>6} {'row':<22} {'ms':>10}")
    for T in seq_lens:
        rows = bench_conv(tokens // T, T, C, device, dtype, repeats)
        rows |= bench_memory(tokens // T, T, heads, device, dtype, cli.topk, repeats)
        if not cli.no_steps:
            rows["step default"] = bench_step(step_env, tokens, T, device, repeats)
            rows["step dense"] = bench_step({**step_env, **dense_env}, tokens, T, device, repeats)
        for row, value in rows.items():
            print(f"{T:>6} {row:<22} {value:>10.2f}")


if __name__ == "__main__":
    main()
