"""Ahead-of-time compile of every Triton kernel for Hopper (sm_90) on a machine without a GPU: registers, spills,
stack, shared memory and blocks per SM of each kernel, as the trainer would launch it.

Runbook
  python bench/kernel_resources.py            # the default golf shapes: d 512, 8/4 heads of 64, chunk 64, 13 taps,
                                              # T 1024 and 2048; the gather conv in bf16 and fp32, the memory in bf16
  python bench/kernel_resources.py --sweep    # also every (chunk, head dim) pair check_memory_sizes admits, and the
                                              # refused ones of the same grid (they must not fit)
  python bench/kernel_resources.py --boundary # only the grid's largest admitted and smallest refused pairs: a tile's
                                              # resources grow with both sizes, so these decide the sweep
  python bench/kernel_resources.py --json     # one JSON list of rows instead of the table

How it works: convgpt_ops's own launch functions run on CPU tensors with a stand-in Triton driver whose target is
sm_90, and Triton's compile step is replaced by a recorder, so each launch yields exactly the kernel, signature,
constants, alignment attributes and options (num_warps, num_stages) that a GPU launch would compile. Each is then
compiled with triton.compile for that target, ptxas included (it ships with Triton); nothing is launched. The
interpreter must be off (TRITON_INTERPRET=1 replaces the kernels by Python): the script refuses it.

Hopper limits (CUDA C++ Programming Guide, compute capability 9.0): 227 KB of shared memory per block and 228 KB
per SM, 1 KB of it reserved per resident block; 64K 32-bit registers per SM, allocated per warp in units of 256;
at most 255 registers per thread, 64 warps and 32 blocks per SM. `fits` means: compiled, shared memory within the
block limit, and at least one block per SM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("error: TRITON_INTERPRET=1 replaces the kernels by the interpreter; unset it to compile them")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convgpt_ops as ops  # noqa: E402
from train_gpt import Hyperparameters  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # Hopper: H100 / H200
MAX_SHARED_PER_BLOCK = 227 * 1024
SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK = 228 * 1024, 1024
REGS_PER_SM, REG_ALLOC_UNIT, MAX_REGS_PER_THREAD = 65536, 256, 255
MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, WARP = 64, 32, 32
HP = Hyperparameters()  # the trainer's defaults are the golf shapes
POW2 = (16, 32, 64, 128, 256)
GQA_KV_HEADS = (8, 2, 1)  # kv heads of the extra memory cases beside the default 8/4


class _Sm90Driver:
    """Just enough of a Triton driver for the launcher to bind arguments for sm_90 (no device behind it)."""

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def recording() -> Iterator[list[tuple]]:
    """Kernel launches inside record (kernel, signature, constexprs, options, attrs) instead of compiling."""
    specs: list[tuple] = []
    original = JITFunction._do_compile

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        specs.append((self, signature, constexprs, options, attrs))

    config, previous = triton.runtime.driver, triton.runtime.driver._active  # no GPU: there may be no default driver
    config.set_active(_Sm90Driver())
    JITFunction._do_compile = record
    try:
        yield specs
    finally:
        JITFunction._do_compile = original
        config._active = previous


def blocks_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM, limited by registers, shared memory, warps and the block cap."""
    regs_per_warp = math.ceil(max(regs, 1) * WARP / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK)
    return min(by_regs, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)


_compiled: dict[str, dict] = {}


def compile_spec(spec: tuple) -> dict:
    """Compile one recorded launch for sm_90 and read its resources (cached by Triton's own source hash)."""
    fn, signature, constexprs, options, attrs = spec
    source = ASTSource(fn, signature, constexprs, attrs)
    key = source.hash() + str(sorted(options.__dict__.items()))
    if key in _compiled:
        return _compiled[key]
    row = dict(kernel=fn.__name__, num_warps=options.num_warps, num_stages=options.num_stages)
    triton.knobs.nvidia.dump_ptxas_log = True  # registers and spills come from ptxas's own report
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=TARGET, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - a compile error is a result to report
        row.update(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", fits=False)
    else:
        ptxas = log.getvalue()

        def number(pattern: str) -> int:
            return int(re.search(pattern, ptxas).group(1))

        sass = triton.tools.disasm.get_sass(kernel.asm["cubin"])
        row.update(registers=number(r"Used (\d+) registers"), spill_bytes=number(r"(\d+) bytes spill stores"),
                   stack_bytes=number(r"(\d+) bytes stack frame"), shared_bytes=kernel.metadata.shared,
                   mma="HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "-")
        row["blocks_per_sm"] = blocks_per_sm(row["registers"], row["shared_bytes"], options.num_warps)
        row["fits"] = row["shared_bytes"] <= MAX_SHARED_PER_BLOCK and row["blocks_per_sm"] >= 1
    _compiled[key] = row
    return row


def gather_case(T: int, dtype: torch.dtype) -> Callable[[], None]:
    table = ops.conv_taps(T, HP.conv1d_k, HP.conv2d_k, HP.conv2d_layout)
    inverse, taps = ops.conv_taps_inverse(table), table.shape[1]

    def launch() -> None:
        u, gate = torch.zeros(1, T, 2 * HP.model_dim, dtype=dtype).chunk(2, -1)  # ConvMix's: one projection's halves
        w, grad = torch.zeros(HP.model_dim, taps, dtype=dtype), torch.zeros(1, T, HP.model_dim, dtype=dtype)
        ops.launch_gather(u, table, w, gate)  # the forward, the gate in its epilogue
        ops.launch_gather(grad, inverse, w)  # grad_u
        ops.launch_gather_wgrad(grad, u, table, taps)
    return launch


def memory_case(T: int, dtype: torch.dtype, head_dim: int, chunk: int,
                heads: tuple[int, int] = (HP.num_heads, HP.num_kv_heads)) -> Callable[[], None]:
    def launch() -> None:
        q = torch.randn(1, heads[0], T, head_dim).to(dtype)
        k, v = (torch.randn(1, heads[1], T, head_dim).to(dtype) for _ in range(2))
        picks = ops.chunk_picks(q.float(), k.float(), chunk, HP.mem_topk)
        pairs, starts, used, work = ops.memory_schedule(picks, chunk)
        out, lse = ops.launch_memory_forward(q, k, v, pairs, starts, used, work, chunk)
        ops.launch_memory_backward(out, q, k, v, pairs, starts, used, lse, lse, chunk)
    return launch


def admitted(chunk: int, head_dim: int) -> bool:
    try:
        ops.check_memory_sizes(chunk, head_dim)
    except ValueError:
        return False
    return True


def boundary(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The admitted pairs that no other admitted pair exceeds in both sizes, and the refused ones that no other
    refused pair is below: a tile's registers and shared memory grow with its chunk and its head dim, so if these
    fit (and these do not), so do (nor do) the rest of the grid."""
    def dominated(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a != b and a[0] <= b[0] and a[1] <= b[1]
    yes = [p for p in pairs if admitted(*p)]
    no = [p for p in pairs if not admitted(*p)]
    return ([p for p in yes if not any(dominated(p, q) for q in yes)] +
            [p for p in no if not any(dominated(q, p) for q in no)])


def cases(mode: str) -> Iterator[tuple[str, bool, Callable[[], None]]]:
    """(case name, admitted by check_memory_sizes, launcher) for every shape to compile: the default shapes, then
    with mode "sweep" every (chunk, head dim) pair of the grid; mode "boundary": only the grid's boundary pairs."""
    heads = f"H={HP.num_heads}/{HP.num_kv_heads}"
    if mode != "boundary":
        for T in (HP.train_seq_len, 2 * HP.train_seq_len):
            for dtype in (torch.bfloat16, torch.float32):
                yield f"gather T={T} C={HP.model_dim} {str(dtype)[6:]}", True, gather_case(T, dtype)
            yield f"memory T={T} {heads} D={HP.head_dim} chunk={HP.mem_chunk} bfloat16", True, memory_case(
                T, torch.bfloat16, HP.head_dim, HP.mem_chunk)
        for kv_heads in GQA_KV_HEADS:  # the backward unrolls its loop over a kv head's G query heads: G = 1, 4 and 8
            yield f"memory T={HP.train_seq_len} H={HP.num_heads}/{kv_heads} D={HP.head_dim} chunk={HP.mem_chunk} " \
                  "bfloat16", True, memory_case(HP.train_seq_len, torch.bfloat16, HP.head_dim, HP.mem_chunk,
                                                (HP.num_heads, kv_heads))
    if mode == "default":
        return
    grid = [(chunk, head_dim) for chunk in POW2 for head_dim in POW2[:4]]
    for chunk, head_dim in grid if mode == "sweep" else boundary(grid):
        yield f"memory {heads} D={head_dim} chunk={chunk} bfloat16", admitted(chunk, head_dim), memory_case(
            4 * chunk, torch.bfloat16, head_dim, chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--sweep", action="store_true", help="every (chunk, head dim) pair, admitted or refused")
    modes.add_argument("--boundary", action="store_true", help="only the grid's largest admitted and smallest refused "
                                                               "pairs (no default shapes): what decides the sweep")
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    cli = parser.parse_args()
    rows = []
    if not cli.json:
        print(f"target:cuda sm_{TARGET.arch} torch:{torch.__version__} triton:{triton.__version__} (ahead of time, no GPU)")
        print(f"{'case':<44} {'kernel':<28} {'warps':>5} {'regs':>4} {'spill':>6} {'stack':>6} {'shared':>7} "
              f"{'blk/SM':>6} {'mma':>5} {'admitted':>8} {'fits':>4}")
    for name, admit, launch in cases("sweep" if cli.sweep else "boundary" if cli.boundary else "default"):
        with recording() as specs:
            launch()
        for spec in specs:
            row = dict(case=name, admitted=admit, **compile_spec(spec))
            rows.append(row)
            if not cli.json:
                if "error" in row:
                    print(f"{name:<44} {row['kernel']:<28} error: {row['error']}", flush=True)
                    continue
                print(f"{name:<44} {row['kernel']:<28} {row['num_warps']:>5} {row['registers']:>4} "
                      f"{row['spill_bytes']:>6} {row['stack_bytes']:>6} {row['shared_bytes']:>7} {row['blocks_per_sm']:>6} "
                      f"{row['mma']:>5} {'yes' if admit else 'no':>8} {'yes' if row['fits'] else 'NO':>4}", flush=True)
    if cli.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
