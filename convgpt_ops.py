"""ConvGPT-v2 token-mixing ops: the readable PyTorch reference (the spec every kernel must match).

What is here
  conv_taps(seq_len, conv1d_k, conv2d_k) -> [seq_len, conv1d_k + conv2d_k**2] int64 source table.
      Tap j of position p reads u[table[p, j] - 1]; 0 means "masked" (reads a zero row).
      Taps 0..conv1d_k-1 are the causal 1D conv (p, p-1, ...); the rest are the KxK Hilbert-grid
      neighbours of p, kept only where the neighbour's sequence index is <= p.
  causal_gather_conv_ref(u, table, weight): depthwise conv over those taps, u [B, T, C], weight [C, J].
  chunk_routing(q, k, chunk, topk): which complete earlier chunks each (head, query token) reads.
  chunk_memory_ref(q, k, v, chunk, topk): sparse chunk-token attention, q [B, H, T, D], k/v [B, Hkv, T, D].

Invariants (tests/test_ops.py checks each)
  * Causality: output t depends only on inputs <= t, for every op, at every position.
  * A table row depends only on p, never on seq_len, so table[:T] is the table for length T.
  * The first 4**m Hilbert cells fill a 2**m square, the first 2*4**m a 2**m x 2**(m+1) rectangle.
  * topk >= the number of complete earlier chunks is exactly dense causal attention.

Run the checks: python -m pytest -q tests/test_ops.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

HILBERT_SIDE = 256  # grid side in cells (DESIGN.md): 256 x 256 = 65,536 positions
MAX_SEQ_LEN = HILBERT_SIDE * HILBERT_SIDE


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


def conv_taps(seq_len: int, conv1d_k: int, conv2d_k: int) -> torch.Tensor:
    """Source table for the causal 1D taps then the Hilbert-masked 2D taps (see the module docstring)."""
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"seq_len {seq_len} outside the Hilbert grid (1..{MAX_SEQ_LEN})")
    if conv2d_k % 2 == 0 and conv2d_k != 0:
        raise ValueError(f"conv2d_k {conv2d_k} must be odd (a centred KxK window) or 0")
    pos = np.arange(seq_len, dtype=np.int64)
    cols = [np.where(pos - j >= 0, pos - j + 1, 0) for j in range(conv1d_k)]
    x, y = hilbert_d2xy(HILBERT_SIDE, np.arange(MAX_SEQ_LEN, dtype=np.int64))
    grid = np.empty((HILBERT_SIDE, HILBERT_SIDE), dtype=np.int64)
    grid[x, y] = np.arange(MAX_SEQ_LEN)
    px, py, r = x[:seq_len], y[:seq_len], conv2d_k // 2
    offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)] if conv2d_k else []
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


def chunk_routing(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """Bool [B, H, T, n_past] with n_past = (T - 1) // chunk: the complete, strictly earlier chunks each
    (head, query token) reads, the topk whose mean key scores highest against q_t. A chunk's mean key only
    averages tokens before t's chunk; routing is never shared between query tokens."""
    B, H, T, D = q.shape
    n_past = (T - 1) // chunk
    q_chunk = torch.arange(T, device=q.device) // chunk
    if n_past == 0 or topk == 0:
        return torch.zeros(B, H, T, n_past, dtype=torch.bool, device=q.device)
    kbar = k[:, :, : n_past * chunk].unflatten(2, (n_past, chunk)).float().mean(3)
    scores = q.float() @ kbar.repeat_interleave(H // k.shape[1], 1).transpose(-1, -2)
    earlier = torch.arange(n_past, device=q.device)[None, :] < q_chunk[:, None]
    scores = scores.masked_fill(~earlier, float("-inf"))
    top = scores.topk(min(topk, n_past), dim=-1)
    picked = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
    return picked.scatter(-1, top.indices, top.values.isfinite())


def chunk_memory_mask(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """Bool [B, H, T, T]: key s is visible to query t if s is in t's chunk and s <= t, or s lies in a chunk
    that chunk_routing picked for (head, t)."""
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    q_chunk = pos // chunk
    own = (q_chunk[:, None] == q_chunk[None, :]) & (pos[None, :] <= pos[:, None])
    n_past = (T - 1) // chunk
    if n_past == 0 or topk == 0:
        return own.expand(q.shape[0], q.shape[1], T, T)
    picked = chunk_routing(q, k, chunk, topk)
    return own | (picked[..., q_chunk.clamp(max=n_past - 1)] & (pos < n_past * chunk))


def chunk_memory_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """One softmax over the visible keys of chunk_memory_mask; grouped heads; returns [B, H, T, D].
    The masked path repeats k and v per query head itself: masked SDPA kernels may lack GQA support."""
    if topk >= (q.shape[2] - 1) // chunk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask, group = chunk_memory_mask(q, k, chunk, topk), q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)
