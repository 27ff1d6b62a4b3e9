"""ConvGPT-v2 token-mixing ops: each as a plain PyTorch `_ref` (the readable spec) and Triton kernels.

What is here
  conv_taps(seq_len, conv1d_k, conv2d_k) -> [seq_len, conv1d_k + conv2d_k**2] int64 source table.
      Tap j of position p reads u[table[p, j] - 1]; 0 means "masked" (reads a zero row).
      Taps 0..conv1d_k-1 are the causal 1D conv (p, p-1, ...); the rest are the KxK Hilbert-grid
      neighbours of p, kept only where the neighbour's sequence index is <= p.
  conv_taps_inverse(table): which position reads s through tap j (the backward's gather, no atomics).
  causal_gather_conv_ref(u, table, weight): depthwise conv over those taps, u [B, T, C], weight [C, J] in u's dtype.
  gated_gather_conv_ref(u, gate, table, weight) / gated_gather_conv(u, gate, table, inverse, weight):
      ConvMix's silu(gate) * conv; the kernel op returns (conv, gated), the gate applied in its epilogue.
  chunk_picks(q, k, chunk, topk) / chunk_routing(...): which complete earlier chunks each (head, query token)
      reads, as indices (what the kernels take) or as a mask (what the reference takes).
  memory_schedule(picks, chunk): the kernels' key-chunk-major work lists, built once for forward and backward.
  chunk_memory_ref(q, k, v, chunk, topk) / chunk_memory_triton(...): sparse chunk-token attention,
      q [B, H, T, D], k/v [B, Hkv, T, D] of one dtype (compiled: bf16/fp16); routing stays in PyTorch.
  triton_enabled(device): the switch. CONVGPT_TRITON=1 forces the kernels, 0 the reference, unset means
      kernels exactly on CUDA; on CPU the kernels need Triton's interpreter (TRITON_INTERPRET=1).
  launch_*: the kernel launches, shared by the ops and bench/kernel_resources.py (sm_90 compile, no GPU).
  self_test_kernels(...): each kernel once at the model's parameters against its _ref (the trainer's startup check).
The kernel ops are torch.library custom ops (convgpt::gated_gather_conv, convgpt::chunk_memory, and their
backwards) with fake and autograd registrations, so torch.compile(fullgraph=True) traces them. Every input of an
op has one dtype (from torch 2.12 CUDA autocast returns fp32 from rms_norm: callers cast).

The chunk memory's schedule is key-chunk-major, as MoBA's: a query reads at most topk + 1 key chunks (its picks
and its own), so key chunk j's list holds its own chunk's queries and the later ones that picked it. A forward
program takes j and one tile of `chunk` listed queries and writes each one's partial result for j (normalised
output and lse) into that query's slot; a merge kernel combines a query's slots by log-sum-exp. The backward runs
one program per key chunk and kv head over all of its tiles, in every query head of the GQA group: dK and dV
accumulate there, each query's dQ share goes to its slot, and the slots are summed. The work is the listed (query,
chunk) pairs rounded up to whole tiles, about topk + 1 blocks per 64 queries, not the union of what 64 neighbouring
queries picked (bench/cost_model.py counts it).

Invariants (tests/test_ops.py, tests/test_kernels_*.py check each)
  * Causality: output t depends only on inputs <= t, for every op and both paths, at every position.
  * A table row depends only on p, never on seq_len, so table[:T] is the table for length T, and the
    inverse of the longest table serves every T (the kernels ignore readers >= T).
  * The first 4**m Hilbert cells fill a 2**m square, the first 2*4**m a 2**m x 2**(m+1) rectangle.
  * topk >= the number of complete earlier chunks is exactly dense causal attention.
  * The reference memory given the queries of the last Tq of k's positions (incremental decoding) returns the
    full result's last Tq rows (tests/test_sample.py).
  * Kernels equal their _ref in outputs and every gradient (fp32 ~1e-5, bf16 ~1e-2), deterministically.
  * check_memory_sizes admits only chunk x head-dim tiles whose kernels fit a Hopper block (chunks <= 256).

Run the checks: python -m pytest -q tests/test_ops.py tests/test_kernels_conv.py tests/test_kernels_memory.py
tests/test_kernel_resources.py (on CPU, tests/conftest.py switches the interpreter on; on a GPU the same tests run
the compiled kernels).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

HILBERT_SIDE = 256  # grid side in cells (DESIGN.md): 256 x 256 = 65,536 positions
MAX_SEQ_LEN = HILBERT_SIDE * HILBERT_SIDE
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LOG2E = 1.4426950408889634  # log2(e): the attention kernels work in base 2
TL_LOG2E, TL_LN2 = tl.constexpr(LOG2E), tl.constexpr(1 / LOG2E)  # the same for kernels: they read only constexpr globals
MERGE_BLOCK_ROWS = 64  # query rows per program of the chunk memory's merge and dQ slot-sum kernels
# Tile sizes from the sm_90 compile (bench/kernel_resources.py, bench/results/kernel_resources_sm90.md):
MEMORY_MAX_CHUNK, MEMORY_MAX_TILE = 256, 8192  # chunk x head dim: the backward's 128 x 64 takes 130 KB of the 227 KB a
# block has, 256 x 32 226 KB; 128 x 128 needs 258 KB
GATHER_BLOCK_T, GATHER_MAX_BLOCK_C = 16, 64  # positions x channels per program: 32 x 128 spilled in bf16
WGRAD_BLOCK_T, WGRAD_MAX_BLOCK_C, WGRAD_MAX_PROGRAMS = 8, 32, 128  # weight-gradient partial sums: 8 x 64 spilled


def triton_enabled(device: torch.device) -> bool:
    """The path switch: CONVGPT_TRITON=1 forces the Triton kernels, 0 the PyTorch reference; unset means
    Triton exactly on CUDA. On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1)."""
    flag = os.environ.get("CONVGPT_TRITON", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"CONVGPT_TRITON={flag!r} must be 0 or 1")
    on = flag == "1" or (flag == "" and device.type == "cuda")
    if on and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"CONVGPT_TRITON=1 on {device} needs TRITON_INTERPRET=1 (the kernels otherwise need CUDA)")
    return on


def hilbert_d2xy(side: int, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Curve index -> (x, y) on a side x side Hilbert curve (the classic iterative d2xy, vectorised)."""
    x, y, t = np.zeros_like(d), np.zeros_like(d), d.copy()
    s = 1
    while s < side:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        flip = (ry == 0) & (rx == 1)
        x, y = np.where(flip, s - 1 - x, x), np.where(flip, s - 1 - y, y)
        x, y = np.where(ry == 0, y, x), np.where(ry == 0, x, y)
        x, y, t, s = x + s * rx, y + s * ry, t // 4, s * 2
    return x, y


CONV2D_LAYOUTS = ("hilbert", "dilated")  # the 2D branch, and its plain dilated 1D control


def conv_taps(seq_len: int, conv1d_k: int, conv2d_k: int, layout: str = "hilbert") -> torch.Tensor:
    """Source table for the causal 1D taps then the Hilbert-masked 2D taps (see the module docstring). The
    "dilated" layout is the control for the 2D branch: the same k*k taps at 1D distances conv1d_k * (1..k*k)."""
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"seq_len {seq_len} outside the Hilbert grid (1..{MAX_SEQ_LEN})")
    if conv2d_k % 2 == 0 and conv2d_k != 0:
        raise ValueError(f"conv2d_k {conv2d_k} must be odd (a centred KxK window) or 0")
    if layout not in CONV2D_LAYOUTS:
        raise ValueError(f"layout {layout!r} must be one of {', '.join(CONV2D_LAYOUTS)}")
    pos = np.arange(seq_len, dtype=np.int64)
    dists = [*range(conv1d_k)]
    if layout == "dilated":
        dists += [max(conv1d_k, 1) * (j + 1) for j in range(conv2d_k * conv2d_k)]
    cols = [np.where(pos - dist >= 0, pos - dist + 1, 0) for dist in dists]
    x, y = hilbert_d2xy(HILBERT_SIDE, np.arange(MAX_SEQ_LEN, dtype=np.int64))
    grid = np.empty((HILBERT_SIDE, HILBERT_SIDE), dtype=np.int64)
    grid[x, y] = np.arange(MAX_SEQ_LEN)
    px, py, r = x[:seq_len], y[:seq_len], conv2d_k // 2
    offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)] if conv2d_k and layout == "hilbert" else []
    for dx, dy in offsets:
        nx, ny = px + dx, py + dy
        inside = (nx >= 0) & (nx < HILBERT_SIDE) & (ny >= 0) & (ny < HILBERT_SIDE)
        src = grid[np.clip(nx, 0, HILBERT_SIDE - 1), np.clip(ny, 0, HILBERT_SIDE - 1)]
        cols.append(np.where(inside & (src <= pos), src + 1, 0))
    return torch.from_numpy(np.stack(cols, axis=1) if cols else np.zeros((seq_len, 0), np.int64))


def causal_gather_conv_ref(u: torch.Tensor, table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[b, t, c] = sum_j weight[c, j] * u[b, table[t, j] - 1, c], a masked tap reading zero."""
    u_pad = F.pad(u, (0, 0, 1, 0))
    return torch.einsum("btjc,cj->btc", u_pad[:, table], weight.to(u.dtype))


def conv_taps_inverse(table: Tensor) -> Tensor:
    """inv[s, j] = t + 1 where table[t, j] == s + 1, else 0 (each (s, j) is read by at most one t)."""
    T, J = table.shape
    hit = table > 0
    t = torch.arange(T, device=table.device)[:, None].expand(T, J)
    j = torch.arange(J, device=table.device)[None, :].expand(T, J)
    inv = torch.zeros_like(table)
    inv[table[hit] - 1, j[hit]] = t[hit] + 1
    if int((inv > 0).sum()) != int(hit.sum()):
        raise ValueError("table is not invertible: some (source, tap) pair is read by two positions")
    return inv


@triton.jit
def _gather_conv_kernel(x_ptr, gate_ptr, idx_ptr, w_ptr, out_ptr, gated_ptr, T, C, stride_xb, stride_xt,
                        J: tl.constexpr, GATED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, t, c] = sum_j w[c, j] * x[b, idx[t, j] - 1, c], skipping idx == 0 and idx > T; x may be strided in
    b and t (its channels contiguous), out is contiguous. GATED: also gated = silu(gate) * out, gate with x's
    strides (the other half of the same projection), gated contiguous."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    base = b * T * C
    t_ok, c_ok = t < T, c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(J):
        src = tl.load(idx_ptr + t.to(tl.int64) * J + j, mask=t_ok, other=0)
        w = tl.load(w_ptr + c * J + j, mask=c_ok, other=0.0).to(tl.float32)
        ok = ((src > 0) & (src <= T))[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + b * stride_xb + (src - 1).to(tl.int64)[:, None] * stride_xt + c[None, :], mask=ok, other=0.0)
        acc += x.to(tl.float32) * w[None, :]
    out_ok = t_ok[:, None] & c_ok[None, :]
    out_off = base + t.to(tl.int64)[:, None] * C + c[None, :]
    m = acc.to(out_ptr.dtype.element_ty)  # the gate multiplies the stored m: 128 registers in bf16, acc took 130
    tl.store(out_ptr + out_off, m, mask=out_ok)
    if GATED:
        g = tl.load(gate_ptr + b * stride_xb + t.to(tl.int64)[:, None] * stride_xt + c[None, :], mask=out_ok,
                    other=0.0).to(tl.float32)
        tl.store(gated_ptr + out_off, (m.to(tl.float32) * g * tl.sigmoid(g)).to(gated_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _gather_conv_wgrad_kernel(g_ptr, x_ptr, idx_ptr, part_ptr, T, C, stride_xb, stride_xt, n_rows, rows_per_prog,
                              J: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[p, c, j] = sum over rows r = b * T + t of program p of g[b, t, c] * x[b, idx[t, j] - 1, c] (g
    contiguous, x strided as in _gather_conv_kernel)."""
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    jj = tl.arange(0, BLOCK_J)
    c_ok, j_ok = c < C, jj < J
    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_T):
        r = start + r0 + tl.arange(0, BLOCK_T)
        r_ok = r < n_rows
        t = r % T
        src = tl.load(idx_ptr + t[:, None] * J + jj[None, :], mask=r_ok[:, None] & j_ok[None, :], other=0)
        g = tl.load(g_ptr + r[:, None] * C + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        row = (r // T * stride_xb)[:, None] + (src - 1).to(tl.int64) * stride_xt
        ok = ((src > 0) & (src <= T))[:, :, None] & c_ok[None, None, :]
        x = tl.load(x_ptr + row[:, :, None] + c[None, None, :], mask=ok, other=0.0)
        acc += tl.sum(x.to(tl.float32) * g.to(tl.float32)[:, None, :], axis=0)
    out = part_ptr + pid.to(tl.int64) * C * J + c[None, :] * J + jj[:, None]
    tl.store(out, acc, mask=j_ok[:, None] & c_ok[None, :])


def _check_gather_conv(u: Tensor, table: Tensor, inv: Tensor, weight: Tensor) -> None:
    """Raise ValueError naming the first argument that breaks the module docstring's contract."""
    if u.dim() != 3 or u.dtype not in FLOAT_DTYPES:
        raise ValueError(f"u must be a 3-D float32/bfloat16/float16 tensor [B, T, C], got {u.dtype} {tuple(u.shape)}")
    if weight.dim() != 2 or weight.dtype != u.dtype or weight.shape[1] < 1:
        raise ValueError(f"weight must be a [C, J] tensor with J >= 1 in u's dtype {u.dtype}, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    (_, T, C), J = u.shape, weight.shape[1]
    if weight.shape[0] != C:
        raise ValueError(f"weight has {weight.shape[0]} channels but u has C={C}")
    for name, t in (("table", table), ("inv", inv)):
        if t.dtype != torch.int64 or t.dim() != 2 or t.shape[0] < T or t.shape[1] != J:
            raise ValueError(f"{name} must be int64 [>= T={T}, J={J}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("table", table), ("inv", inv), ("weight", weight)):
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    if u.device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"u is on {u.device}: the Triton kernels need CUDA tensors or TRITON_INTERPRET=1")


def channels_last_contiguous(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous (the kernels take the other strides), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def one_layout(*xs: Tensor) -> tuple[Tensor, ...]:
    """xs with contiguous last dims and one set of strides, for a kernel that indexes them alike: the views
    themselves where they share strides (the model's are slices of one projection), else contiguous copies."""
    xs = tuple(channels_last_contiguous(x) for x in xs)
    return xs if all(x.stride() == xs[0].stride() for x in xs) else tuple(x.contiguous() for x in xs)  # SymInts: no set


def launch_gather(x: Tensor, idx: Tensor, weight: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, gated): out[b, t, c] = sum_j weight[c, j] * x[b, idx[t, j] - 1, c] (forward and grad_u), gated =
    silu(gate) * out when a gate (x's shape and strides) is given, else out itself; x's channels contiguous, idx and
    weight contiguous."""
    B, T, C = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gated = out if gate is None else torch.empty_like(out)
    block_c = min(GATHER_MAX_BLOCK_C, triton.next_power_of_2(C))
    grid = (triton.cdiv(T, GATHER_BLOCK_T), triton.cdiv(C, block_c), B)
    _gather_conv_kernel[grid](x, x if gate is None else gate, idx, weight, out, gated, T, C, x.stride(0), x.stride(1),
                              J=weight.shape[1], GATED=gate is not None, BLOCK_T=GATHER_BLOCK_T, BLOCK_C=block_c)
    return out, gated


def launch_gather_wgrad(grad: Tensor, u: Tensor, table: Tensor, n_taps: int) -> Tensor:
    """grad_weight [C, n_taps] (fp32) of the gather conv; grad and table contiguous, u's channels contiguous."""
    B, T, C = u.shape
    n_rows, block_c = B * T, min(WGRAD_MAX_BLOCK_C, triton.next_power_of_2(C))
    blocks = triton.cdiv(n_rows, WGRAD_BLOCK_T)
    rows_per_prog = triton.cdiv(blocks, min(blocks, WGRAD_MAX_PROGRAMS)) * WGRAD_BLOCK_T
    n_prog = triton.cdiv(n_rows, rows_per_prog)
    part = torch.empty(n_prog, C, n_taps, dtype=torch.float32, device=u.device)
    _gather_conv_wgrad_kernel[(n_prog, triton.cdiv(C, block_c))](
        grad, u, table, part, T, C, u.stride(0), u.stride(1), n_rows, rows_per_prog, J=n_taps, BLOCK_J=triton.next_power_of_2(n_taps),
        BLOCK_T=WGRAD_BLOCK_T, BLOCK_C=block_c)
    return part.sum(0)


@torch.library.custom_op("convgpt::gather_conv_backward", mutates_args=())
def gather_conv_backward(grad: Tensor, u: Tensor, table: Tensor, inv: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_u, grad_weight) of the gather conv m = launch_gather(u, table, weight) for output gradient grad."""
    _check_gather_conv(u, table, inv, weight)
    grad, table, inv, weight = (t.contiguous() for t in (grad.to(u.dtype), table, inv, weight))
    u = channels_last_contiguous(u)
    return launch_gather(grad, inv, weight)[0], launch_gather_wgrad(grad, u, table, weight.shape[1]).to(weight.dtype)


@gather_conv_backward.register_fake
def _gather_conv_backward_fake(grad: Tensor, u: Tensor, table: Tensor, inv: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    _check_gather_conv(u, table, inv, weight)
    return u.new_empty(u.shape), weight.new_empty(weight.shape)


def gated_gather_conv_ref(u: Tensor, gate: Tensor, table: Tensor, weight: Tensor) -> Tensor:
    """silu(gate) * causal_gather_conv_ref(u, table, weight): ConvMix's fused product."""
    return F.silu(gate) * causal_gather_conv_ref(u, table, weight)


def _check_gate(u: Tensor, gate: Tensor, table: Tensor, inv: Tensor, weight: Tensor) -> None:
    _check_gather_conv(u, table, inv, weight)
    if gate.shape != u.shape or gate.dtype != u.dtype or gate.device != u.device:
        raise ValueError(f"gate must match u {tuple(u.shape)} {u.dtype} on {u.device}; got {tuple(gate.shape)} "
                         f"{gate.dtype} on {gate.device}")


@torch.library.custom_op("convgpt::gated_gather_conv", mutates_args=())
def gated_gather_conv(u: Tensor, gate: Tensor, table: Tensor, inv: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(m, silu(gate) * m), m[b, t, c] = sum_j weight[c, j] * u[b, table[t, j] - 1, c]: the conv with the gate in
    its kernel's epilogue; differentiable in u, gate and weight through both outputs (m alone is the plain conv).
    gate has u's shape and dtype; m is kept for the backward."""
    _check_gate(u, gate, table, inv, weight)
    u, gate = one_layout(u, gate)
    return launch_gather(u, table.contiguous(), weight.contiguous(), gate)


@gated_gather_conv.register_fake
def _gated_gather_conv_fake(u: Tensor, gate: Tensor, table: Tensor, inv: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    _check_gate(u, gate, table, inv, weight)
    return u.new_empty(u.shape), u.new_empty(u.shape)


def _gated_gather_conv_setup(ctx, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    u, gate, table, inv, weight = inputs
    ctx.save_for_backward(u, gate, table, inv, weight, output[0])
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as a tensor of zeros


def _gated_gather_conv_grad(ctx, grad_m: Tensor | None, grad_y: Tensor | None) -> tuple[Tensor | None, ...]:
    """d/dm = dy * silu(g) (+ m's own gradient), d/dg = dy * m * silu'(g), in fp32; then the conv's backward."""
    u, gate, table, inv, weight, m = ctx.saved_tensors
    dm, dg = (None if grad_m is None else grad_m.float()), None
    if grad_y is not None:
        g, dy = gate.float(), grad_y.float()
        sig = torch.sigmoid(g)
        dm = dy * g * sig if dm is None else dm + dy * g * sig
        dg = (dy * m.float() * sig * (1 + g * (1 - sig))).to(gate.dtype)
    if dm is None:
        return None, None, None, None, None
    grad_u, grad_w = gather_conv_backward(dm.to(u.dtype), u, table, inv, weight)
    return grad_u, dg, None, None, grad_w


gated_gather_conv.register_autograd(_gated_gather_conv_grad, setup_context=_gated_gather_conv_setup)


def memory_is_dense(seq_len: int, chunk: int, topk: int) -> bool:
    """Every query reads every earlier complete chunk: the memory is plain causal attention."""
    return topk >= (seq_len - 1) // chunk


def chunk_picks(q: Tensor, k: Tensor, chunk: int, topk: int) -> Tensor:
    """int64 [B, H, Tq, min(topk, n_past)] with n_past = (T - 1) // chunk: the complete, strictly earlier chunks
    each (head, query token) reads, the topk whose mean key scores highest against q_t, in score order; n_past marks
    a slot left empty (a query with fewer earlier chunks than topk). A chunk's mean key only averages tokens before
    t's chunk; routing is never shared between query tokens. q holds the last Tq of k's T positions (Tq < T:
    incremental decoding), here and in chunk_routing, chunk_memory_mask and chunk_memory_ref."""
    B, H, Tq, D = q.shape
    T = k.shape[2]
    n_past = (T - 1) // chunk
    if n_past == 0 or topk == 0:
        return torch.zeros(B, H, Tq, 0, dtype=torch.long, device=q.device)
    kbar = k[:, :, : n_past * chunk].unflatten(2, (n_past, chunk)).float().mean(3)
    scores = q.float() @ kbar.repeat_interleave(H // k.shape[1], 1).transpose(-1, -2)
    earlier = torch.arange(n_past, device=q.device)[None, :] < (torch.arange(T - Tq, T, device=q.device) // chunk)[:, None]
    top = scores.masked_fill(~earlier, float("-inf")).topk(min(topk, n_past), dim=-1)
    return torch.where(top.values.isfinite(), top.indices, n_past)


def chunk_routing(q: Tensor, k: Tensor, chunk: int, topk: int) -> Tensor:
    """Bool [B, H, Tq, n_past]: chunk_picks as a mask."""
    B, H, Tq, _ = q.shape
    n_past = (k.shape[2] - 1) // chunk
    picks = chunk_picks(q, k, chunk, topk)
    mask = torch.zeros(B, H, Tq, n_past + 1, dtype=torch.bool, device=q.device)
    return mask.scatter(-1, picks, True)[..., :n_past]


def chunk_memory_mask(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """Bool [B, H, Tq, T]: key s is visible to query t if s is in t's chunk and s <= t, or s lies in a chunk
    that chunk_routing picked for (head, t)."""
    Tq, T = q.shape[2], k.shape[2]
    pos = torch.arange(T, device=q.device)
    k_chunk = pos // chunk
    own = (k_chunk[T - Tq:, None] == k_chunk[None, :]) & (pos[None, :] <= pos[T - Tq:, None])
    n_past = (T - 1) // chunk
    if n_past == 0 or topk == 0:
        return own.expand(q.shape[0], q.shape[1], Tq, T)
    picked = chunk_routing(q, k, chunk, topk)
    return own | (picked[..., k_chunk.clamp(max=n_past - 1)] & (pos < n_past * chunk))


def chunk_memory_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """One softmax over the visible keys of chunk_memory_mask; grouped heads; returns [B, H, Tq, D].
    The masked path repeats k and v per query head itself: masked SDPA kernels may lack GQA support."""
    if q.shape[2] == k.shape[2] and memory_is_dense(q.shape[2], chunk, topk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask, group = chunk_memory_mask(q, k, chunk, topk), q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)


def check_memory_sizes(chunk: int, head_dim: int) -> None:
    """The Triton chunk memory tiles one chunk as one block: both sizes must suit tl.dot, and the tiles must fit
    a Hopper block's shared memory (bench/kernel_resources.py --sweep compiles every pair)."""
    if chunk < 16 or chunk > MEMORY_MAX_CHUNK or chunk & (chunk - 1):
        raise ValueError(f"chunk {chunk} must be a power of two in 16..{MEMORY_MAX_CHUNK} for the Triton chunk memory")
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim {head_dim} must be a power of two in 16..128 for the Triton chunk memory")
    if chunk * head_dim > MEMORY_MAX_TILE:
        raise ValueError(f"chunk {chunk} x head dim {head_dim} needs more than the 227 KB of shared memory of a Hopper "
                         f"block (at most {MEMORY_MAX_TILE} elements)")


def check_chunk_memory_inputs(q: Tensor, k: Tensor, v: Tensor, chunk: int, picks: Tensor | None = None) -> None:
    """Raise ValueError naming the first bad shape, dtype, device or size."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    B, H, T, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D")
    if k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"q heads H={H} must be a multiple of kv heads Hkv={k.shape[1]}")
    if q.dtype not in FLOAT_DTYPES or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes must be equal and one of fp32/bf16/fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.float32 and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fp32 q, k, v: the compiled chunk memory runs bf16/fp16 only (fp32 tiles spill); use bf16 "
                         "autocast or CONVGPT_TRITON=0")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must share a device; got {q.device}, {k.device}, {v.device}")
    if T < 1 or B < 1 or H < 1 or T > MAX_SEQ_LEN:
        raise ValueError(f"q {tuple(q.shape)} must have B, H >= 1 and 1 <= T <= {MAX_SEQ_LEN} (the schedule's int32 "
                         f"lists)")
    check_memory_sizes(chunk, D)
    if picks is not None and (picks.dim() != 4 or tuple(picks.shape[:3]) != (B, H, T) or picks.device != q.device
                              or picks.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"picks must be int32/int64 [{B}, {H}, {T}, P] on {q.device}; got {picks.dtype} "
                         f"{tuple(picks.shape)} on {picks.device}")


def memory_schedule(picks: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Key-chunk-major work lists (see the module docstring) from picks [B, H, T, P]; a query's pick at or after
    its own chunk, below 0 or repeated is dropped, so the kernels stay causal whatever the routing. Every query has
    S = P + 1 slots: its kept picks ascending, then its own chunk. Returns, all int32:
    pairs [B*H, T*S]: the (query, slot) pairs t * S + s grouped by key chunk, ascending in t within one;
    starts [B*H, NT + 1]: where key chunk j's pairs begin (its own chunk's queries first, then those that picked it);
    used [B, H, T]: each query's filled slots;
    work [B*H, W]: one forward program per entry, j * T + where its tile of `chunk` pairs begins in j's list, or -1.
    W = cdiv(T * S, chunk) + NT bounds the tiles without a host sync. Built once per call of chunk_memory_triton:
    the forward and the backward op take the same lists."""
    B, H, T, P = picks.shape
    nt, dev, S = -(-T // chunk), picks.device, P + 1  # ceil division in plain ints: this runs in traced code
    own = (torch.arange(T, device=dev) // chunk).view(T, 1).expand(B, H, T, 1)
    keys = torch.where((picks >= 0) & (picks < own), picks, nt).sort(-1).values
    repeat = torch.cat([torch.zeros_like(keys[..., :1], dtype=torch.bool), keys[..., 1:] == keys[..., :-1]], -1)
    keys = torch.cat([keys.masked_fill(repeat, nt), own], -1).sort(-1).values.to(torch.int32)  # own after picks
    used = (keys < nt).sum(-1, dtype=torch.int32)
    by_key = keys.view(B * H, T * S).sort(dim=-1, stable=True)
    bounds = torch.arange(nt + 1, device=dev, dtype=torch.int32).expand(B * H, nt + 1).contiguous()
    starts = torch.searchsorted(by_key.values, bounds).to(torch.int32)
    tiles = (starts[:, 1:] - starts[:, :-1] + chunk - 1) // chunk
    ends = tiles.cumsum(-1)
    n_work = -(-T * S // chunk) + nt
    w = torch.arange(n_work, device=dev).expand(B * H, n_work).contiguous()
    j = torch.searchsorted(ends, w, right=True)
    first = (w - (ends - tiles).gather(-1, j.clamp(max=nt - 1))) * chunk
    work = torch.where(j < nt, j * T + first, -1).to(torch.int32)
    return by_key.indices.to(torch.int32), starts.contiguous(), used.contiguous(), work


def _launch_opts(chunk: int, dtype: torch.dtype) -> dict:
    """DT, the tl.dot operand type, is the input dtype on GPU. Under the interpreter it is fp32: there tl.dot
    multiplies bf16's raw uint16 bits (Triton 3.7); operands rounded to the input dtype, then widened, keep the
    GPU's numerics (exact products, fp32 accumulation)."""
    dt = tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else TL_DTYPES[dtype]
    return dict(BLOCK=chunk, DT=dt, PREC="ieee" if dt == tl.float32 else "tf32", num_warps=4 if chunk <= 64 else 8,
                num_stages=2)


@triton.jit
def _fwd_kernel(Q, K, V, PAIRS, STARTS, WORK, PART_O, PART_LSE, qk_scale, T, NT, W, S, H, HKV, G, sq_b, sq_h, sq_t,
                skv_b, skv_h, skv_t, BLOCK: tl.constexpr, D: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """One work item: key chunk j against a tile of the queries that read it; writes each query's partial
    (softmax-normalised output, lse) for j into its slot. The causal test cols <= rows only bites on j's own chunk."""
    pid = tl.program_id(0)  # one axis: B * H * W may pass the 65,535 limit of a grid's second axis
    bh, w = pid // W, pid % W
    item = tl.load(WORK + bh.to(tl.int64) * W + w)
    if item < 0:
        return
    j, first = item // T, item % T
    b, h = (bh // H).to(tl.int64), bh % H
    kv_base = b * skv_b + (h // G) * skv_h
    start = tl.load(STARTS + bh * (NT + 1) + j)
    e, ar, d = first + tl.arange(0, BLOCK), tl.arange(0, BLOCK), tl.arange(0, D)
    ok = e < tl.load(STARTS + bh * (NT + 1) + j + 1) - start
    pair = tl.load(PAIRS + bh.to(tl.int64) * T * S + start + e, mask=ok, other=0)
    rows = pair // S
    q = tl.load(Q + b * sq_b + h * sq_h + rows.to(tl.int64)[:, None] * sq_t + d[None, :], mask=ok[:, None],
                other=0.0).to(DT)
    cols = j * BLOCK + ar
    kv_off = kv_base + cols.to(tl.int64)[:, None] * skv_t + d[None, :]
    k = tl.load(K + kv_off, mask=(cols < T)[:, None], other=0.0).to(DT)
    v = tl.load(V + kv_off, mask=(cols < T)[:, None], other=0.0).to(DT)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    s = tl.where((cols[None, :] <= rows[:, None]) & ok[:, None], s, float("-inf"))
    m = tl.maximum(tl.max(s, 1), -1.0e30)  # finite: an unlisted row gets p = 0, not NaN (it is not stored)
    p = tl.exp2(s - m[:, None])
    l_i = tl.where(ok, tl.sum(p, 1), 1.0)
    o = tl.dot(p.to(Q.dtype.element_ty).to(DT), v, input_precision=PREC) / l_i[:, None]
    part = bh.to(tl.int64) * T * S + pair
    tl.store(PART_O + part[:, None] * D + d[None, :], o.to(PART_O.dtype.element_ty), mask=ok[:, None])
    tl.store(PART_LSE + part, (m + tl.log2(l_i)) * TL_LN2, mask=ok)


@triton.jit
def _merge_kernel(PART_O, PART_LSE, USED, O, LSE, n_rows, S, T, H, so_b, so_h, so_t, BLOCK_R: tl.constexpr,
                  D: tl.constexpr):
    """Each query's output and lse from its `used` partials: the log-sum-exp merge, online over the slots; rows
    r = (b * H + h) * T + t, O strided."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok, d = r < n_rows, tl.arange(0, D)
    used = tl.load(USED + r, mask=ok, other=0)
    m = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, D), tl.float32)
    for s in range(S):
        take = ok & (s < used)
        part = r.to(tl.int64) * S + s
        lse_s = tl.load(PART_LSE + part, mask=take, other=float("-inf"))
        m_new = tl.maximum(m, lse_s)
        alpha, weight = tl.exp(m - m_new), tl.exp(lse_s - m_new)
        o_s = tl.load(PART_O + part[:, None] * D + d[None, :], mask=take[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + weight[:, None] * o_s
        l_i = l_i * alpha + weight
        m = m_new
    l_i = tl.where(ok, l_i, 1.0)
    r64 = r.to(tl.int64)
    o_row = r64 // (H * T) * so_b + r64 // T % H * so_h + r64 % T * so_t
    tl.store(O + o_row[:, None] + d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=ok[:, None])
    tl.store(LSE + r, m + tl.log(l_i), mask=ok)


@triton.jit
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, PAIRS, STARTS, PART_DQ, DK, DV, sm_scale, qk_scale, T, NT, S, H, HKV,
                sq_b, sq_h, sq_t, skv_b, skv_h, skv_t, sdo_b, sdo_h, sdo_t, G: tl.constexpr, BLOCK: tl.constexpr,
                D: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Key chunk j of one kv head over every tile of the queries that read it, in each of its G query heads: dK and
    dV accumulate here in fp32 and are stored once, in k's dtype; each query's dQ share from j goes to its slot
    (summed after by _sum_slots_kernel: deterministic, no atomics)."""
    bkv, j = tl.program_id(0), tl.program_id(1)
    b, kvh = (bkv // HKV).to(tl.int64), bkv % HKV
    cols, ar, d = j * BLOCK + tl.arange(0, BLOCK), tl.arange(0, BLOCK), tl.arange(0, D)
    col_ok = cols < T
    kv_off = b * skv_b + kvh * skv_h + cols.to(tl.int64)[:, None] * skv_t + d[None, :]
    k = tl.load(K + kv_off, mask=col_ok[:, None], other=0.0).to(DT)
    v = tl.load(V + kv_off, mask=col_ok[:, None], other=0.0).to(DT)
    dk = tl.zeros((BLOCK, D), tl.float32)
    dv = tl.zeros((BLOCK, D), tl.float32)
    for g in tl.static_range(G):
        h = kvh * G + g
        bh = b * H + h
        q_ptr, do_ptr = Q + b * sq_b + h * sq_h, DO + b * sdo_b + h * sdo_h
        lse_ptr, delta_ptr, part_ptr = LSE + bh * T, DELTA + bh * T, PART_DQ + bh * T * S * D
        start = tl.load(STARTS + bh * (NT + 1) + j)
        count = tl.load(STARTS + bh * (NT + 1) + j + 1) - start
        pairs_ptr = PAIRS + bh * T * S + start
        for first in range(0, count, BLOCK):
            e = first + ar
            ok = e < count
            pair = tl.load(pairs_ptr + e, mask=ok, other=0)
            rows = pair // S
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * sq_t + d[None, :], mask=ok[:, None], other=0.0).to(DT)
            do = tl.load(do_ptr + rows.to(tl.int64)[:, None] * sdo_t + d[None, :], mask=ok[:, None], other=0.0).to(DT)
            lse2 = tl.load(lse_ptr + rows, mask=ok, other=0.0) * TL_LOG2E
            delta = tl.load(delta_ptr + rows, mask=ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [keys, queries]
            pt = tl.where((cols[:, None] <= rows[None, :]) & ok[None, :], tl.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(Q.dtype.element_ty).to(DT), do, input_precision=PREC)
            dst = (pt * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])).to(Q.dtype.element_ty).to(DT)
            dk += tl.dot(dst, q, input_precision=PREC)
            dq = tl.dot(tl.trans(dst), k, input_precision=PREC) * sm_scale
            tl.store(part_ptr + pair.to(tl.int64)[:, None] * D + d[None, :], dq, mask=ok[:, None])
    out_off = bkv.to(tl.int64) * T * D + cols[:, None] * D + d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _sum_slots_kernel(X, USED, Y, n_rows, S, BLOCK_R: tl.constexpr, D: tl.constexpr):
    """Y[r] = the fp32 sum of X[r, s] over the slots s < USED[r], stored in Y's dtype; X [n_rows, S, D] fp32 and Y
    [n_rows, D] contiguous. A row's slots from USED[r] on are never read, so they need no zeros."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok, d = r < n_rows, tl.arange(0, D)
    used = tl.load(USED + r, mask=ok, other=0)
    r64 = r.to(tl.int64)
    acc = tl.zeros((BLOCK_R, D), tl.float32)
    for s in range(S):
        acc += tl.load(X + (r64 * S + s)[:, None] * D + d[None, :], mask=(s < used)[:, None], other=0.0)
    tl.store(Y + r64[:, None] * D + d[None, :], acc.to(Y.dtype.element_ty), mask=ok[:, None])


def launch_sum_slots(x: Tensor, used: Tensor, out: Tensor) -> Tensor:
    """out [..., D] = x [..., S, D] (fp32) summed over each row's first `used` slots (used [...] int32); all three
    contiguous. See _sum_slots_kernel."""
    n_rows, slots, D = used.numel(), x.shape[-2], x.shape[-1]
    _sum_slots_kernel[(triton.cdiv(n_rows, MERGE_BLOCK_ROWS),)](x, used, out, n_rows, slots, BLOCK_R=MERGE_BLOCK_ROWS,
                                                               D=D, num_warps=4)
    return out


def memory_strides(*xs: Tensor) -> tuple[int, ...]:
    """The batch, head and position strides of each [B, H, T, D] tensor (D contiguous), for the kernels."""
    return tuple(s for x in xs for s in x.stride()[:3])


def launch_memory_forward(q: Tensor, k: Tensor, v: Tensor, pairs: Tensor, starts: Tensor, used: Tensor, work: Tensor,
                          chunk: int) -> tuple[Tensor, Tensor]:
    """(out in q's layout, lse) of the chunk memory over memory_schedule's lists: the partials kernel, then the
    merge. q, k, v have contiguous D, and k and v one set of strides."""
    (B, H, T, D), hkv = q.shape, k.shape[1]
    slots = pairs.shape[-1] // T
    part_o = torch.empty(B, H, T, slots, D, dtype=q.dtype, device=q.device)
    part_lse = torch.empty(B, H, T, slots, dtype=torch.float32, device=q.device)
    nt, n_work = triton.cdiv(T, chunk), work.shape[-1]
    _fwd_kernel[(B * H * n_work,)](q, k, v, pairs, starts, work, part_o, part_lse, LOG2E / math.sqrt(D), T, nt, n_work,
                                 slots, H, hkv, H // hkv, *memory_strides(q, k), D=D, **_launch_opts(chunk, q.dtype))
    out, lse = torch.empty_like(q), torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    _merge_kernel[(triton.cdiv(B * H * T, MERGE_BLOCK_ROWS),)](part_o, part_lse, used, out, lse, B * H * T, slots, T, H,
                                                             *memory_strides(out), BLOCK_R=MERGE_BLOCK_ROWS, D=D,
                                                             num_warps=4)
    return out, lse


def launch_memory_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pairs: Tensor, starts: Tensor,
                           used: Tensor, lse: Tensor, delta: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, each in its input's dtype, of the chunk memory; inputs as launch_memory_forward's,
    grad_out in q's dtype with contiguous D, lse and delta fp32 contiguous. One program per (kv head, key chunk)
    sums dK and dV over the GQA group in registers; the fp32 dQ slots are summed by one more pass."""
    (B, H, T, D), hkv = q.shape, k.shape[1]
    slots, nt, dev = pairs.shape[-1] // T, triton.cdiv(T, chunk), q.device
    part_dq = torch.empty(B, H, T, slots, D, dtype=torch.float32, device=dev)  # a query's slots >= used: never read
    dk, dv = (torch.empty(B, hkv, T, D, dtype=x.dtype, device=dev) for x in (k, v))
    _bwd_kernel[(B * hkv, nt)](q, k, v, grad_out, lse, delta, pairs, starts, part_dq, dk, dv, 1.0 / math.sqrt(D),
                               LOG2E / math.sqrt(D), T, nt, slots, H, hkv, *memory_strides(q, k, grad_out), G=H // hkv,
                               D=D, **_launch_opts(chunk, q.dtype))
    return launch_sum_slots(part_dq, used, q.new_empty(B, H, T, D)), dk, dv


def memory_layout(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as the kernels take them without copies where strides will do: D contiguous, k and v alike (the
    model's k and v are two halves of one projection, so they are)."""
    return (channels_last_contiguous(q), *one_layout(k, v))


def check_memory_schedule(q: Tensor, chunk: int, pairs: Tensor, starts: Tensor, used: Tensor, work: Tensor) -> None:
    """Raise ValueError unless the four lists have memory_schedule's dtypes, shapes and layout for q and chunk.
    Their values are not checked: the kernels index with them, so they must come from memory_schedule, whose
    dropping of late, repeated and negative picks is what keeps the kernels causal."""
    B, H, T, _ = q.shape
    nt, slots = triton.cdiv(T, chunk), max(pairs.shape[-1] // T, 1)
    want = {"pairs": (B * H, T * slots), "starts": (B * H, nt + 1), "used": (B, H, T),
            "work": (B * H, triton.cdiv(T * slots, chunk) + nt)}
    for name, x in zip(want, (pairs, starts, used, work)):
        if x.dtype != torch.int32 or tuple(x.shape) != want[name] or x.device != q.device or not x.is_contiguous():
            raise ValueError(f"schedule {name} must be contiguous int32 {list(want[name])} on {q.device} "
                             f"(memory_schedule); got {x.dtype} {tuple(x.shape)} on {x.device}")


@torch.library.custom_op("convgpt::chunk_memory", mutates_args=())
def chunk_memory_op(q: Tensor, k: Tensor, v: Tensor, pairs: Tensor, starts: Tensor, used: Tensor, work: Tensor,
                    chunk: int) -> tuple[Tensor, Tensor]:
    """(out [B, H, T, D] in q's dtype, lse [B, H, T] fp32) over memory_schedule's lists; see the module docstring."""
    check_chunk_memory_inputs(q, k, v, chunk)
    check_memory_schedule(q, chunk, pairs, starts, used, work)
    return launch_memory_forward(*memory_layout(q, k, v), pairs, starts, used, work, chunk)


@chunk_memory_op.register_fake
def _chunk_memory_fake(q: Tensor, k: Tensor, v: Tensor, pairs: Tensor, starts: Tensor, used: Tensor, work: Tensor,
                       chunk: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(memory_layout(q, k, v)[0]), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("convgpt::chunk_memory_backward", mutates_args=())
def chunk_memory_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pairs: Tensor, starts: Tensor,
                             used: Tensor, lse: Tensor, delta: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) given delta = rowsum(dO * O) - dlse, fp32 [B, H, T]."""
    return launch_memory_backward(channels_last_contiguous(grad_out.to(q.dtype)), *memory_layout(q, k, v), pairs,
                                  starts, used, lse.float().contiguous(), delta.float().contiguous(), chunk)


@chunk_memory_backward_op.register_fake
def _chunk_memory_backward_fake(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pairs: Tensor, starts: Tensor,
                                used: Tensor, lse: Tensor, delta: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _chunk_memory_setup(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, pairs, starts, used, _, ctx.chunk = inputs
    ctx.save_for_backward(q, k, v, pairs, starts, used, *output)
    ctx.set_materialize_grads(False)  # the unused lse's gradient arrives as None, not as zeros


def _chunk_memory_grad(ctx, grad_out: Tensor | None, grad_lse: Tensor | None) -> tuple:
    q, k, v, pairs, starts, used, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    dq, dk, dv = chunk_memory_backward_op(grad_out, q, k, v, pairs, starts, used, lse, delta, ctx.chunk)
    return dq, dk, dv, None, None, None, None, None


chunk_memory_op.register_autograd(_chunk_memory_grad, setup_context=_chunk_memory_setup)


def chunk_memory_from_picks(q: Tensor, k: Tensor, v: Tensor, picks: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(out, lse) of the chunk memory given chunk_picks' picks [B, H, T, P]: one schedule for forward and backward."""
    check_chunk_memory_inputs(q, k, v, chunk, picks)
    return chunk_memory_op(q, k, v, *memory_schedule(picks, chunk), chunk)


def chunk_memory_triton(q: Tensor, k: Tensor, v: Tensor, chunk: int, topk: int) -> Tensor:
    """Drop-in for convgpt_ops.chunk_memory_ref: route in PyTorch (no gradient), attend with the Triton op."""
    check_chunk_memory_inputs(q, k, v, chunk)
    with torch.no_grad():
        picks = chunk_picks(q.detach(), k.detach(), chunk, topk)
    return chunk_memory_from_picks(q, k, v, picks, chunk)[0]


SELF_TEST_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |err| / max |ref|


def self_test_kernels(device: torch.device, dtype: torch.dtype, tables: tuple[Tensor, Tensor] | None, channels: int,
                      memory: tuple[int, int, int, int] | None) -> None:
    """Forward and backward of the gather conv (tables = (table, inverse)) and the sparse chunk memory (memory =
    (heads, kv heads, head dim, chunk)) once, on random inputs at the model's kernel parameters and sizes that
    specialize like training's (T 1024, 16 chunks), against the references in fp32 on the same rounded inputs.
    Raises on a compile error, a failed launch or an error above SELF_TEST_TOL."""
    gen = torch.Generator().manual_seed(0)
    checks = []
    if tables is not None:
        table, inverse = tables[0][:1024].to(device), tables[1].to(device)
        u, g = (torch.randn(2, table.shape[0], channels, generator=gen) for _ in range(2))
        w = torch.randn(channels, table.shape[1], generator=gen)
        checks.append(("gather_conv", lambda u, g, w: gated_gather_conv(u, g, table, inverse, w)[1],
                       lambda u, g, w: gated_gather_conv_ref(u, g, table, w), (u, g, w)))
    if memory is not None:
        heads, kv_heads, head_dim, chunk = memory
        qkv = [torch.randn(1, h, 16 * chunk, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads)]
        checks.append(("chunk_memory", lambda *qkv: chunk_memory_triton(*qkv, chunk, 1),
                       lambda *qkv: chunk_memory_ref(*qkv, chunk, 1), qkv))
    for name, kernel, ref, inputs in checks:
        upstream, results = torch.randn(inputs[0].shape, generator=gen).to(device, dtype), []
        for fn, dt in ((kernel, dtype), (ref, torch.float32)):
            leaves = [x.to(device, dtype).to(dt, copy=True).requires_grad_() for x in inputs]
            out = fn(*leaves)
            out.backward(upstream.to(dt))
            results.append([out, *(x.grad for x in leaves)])
        for got, want in zip(*results):
            err = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            if not err <= SELF_TEST_TOL[dtype]:
                raise RuntimeError(f"{name} on {device} ({dtype}) differs from its reference: relative error {err:.2e}")
