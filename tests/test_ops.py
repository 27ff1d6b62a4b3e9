"""convgpt_ops reference ops: Hilbert layout, tap table, gather conv, chunk memory, and their causality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convgpt_ops import (HILBERT_SIDE, MAX_SEQ_LEN, causal_gather_conv_ref, chunk_memory_mask, chunk_memory_ref,
                         conv_taps, hilbert_d2xy)


def test_hilbert_curve_is_a_walk_filling_squares_then_rectangles():
    x, y = hilbert_d2xy(HILBERT_SIDE, np.arange(MAX_SEQ_LEN))
    assert len(set(zip(x.tolist(), y.tolist()))) == MAX_SEQ_LEN
    assert (np.abs(np.diff(x)) + np.abs(np.diff(y)) == 1).all()
    for m in range(1, 8):
        n = 4 ** m
        assert x[:n].max() < 2 ** m and y[:n].max() < 2 ** m
        spans = sorted((x[:2 * n].max() + 1, y[:2 * n].max() + 1))
        assert spans == [2 ** m, 2 ** (m + 1)]
    assert (x[:1024].max(), y[:1024].max()) == (31, 31)


def test_tap_table_is_causal_and_independent_of_length():
    table = conv_taps(2048, 4, 3)
    pos = torch.arange(2048)[:, None]
    assert table.shape == (2048, 4 + 9)
    assert ((table == 0) | (table - 1 <= pos)).all()
    assert torch.equal(table[:, :4], torch.where(pos - torch.arange(4) >= 0, pos - torch.arange(4) + 1, 0))
    assert torch.equal(conv_taps(1000, 4, 3), table[:1000])
    past = (table[:1024, 4:] > 0).sum(1) - 1
    assert 3.5 < past.float().mean() < 4.1  # DESIGN.md: ~3.8 of the 8 neighbours are in the past
    assert conv_taps(5, 2, 0).shape == (5, 2)


def test_dilated_control_table_has_the_hilbert_tap_count_at_fixed_distances():
    table, hilbert = conv_taps(300, 4, 3, "dilated"), conv_taps(300, 4, 3)
    assert table.shape == hilbert.shape and torch.equal(table[:, :4], hilbert[:, :4])
    pos = torch.arange(300)[:, None]
    dists = 4 * torch.arange(1, 10)
    assert torch.equal(table[:, 4:], torch.where(pos - dists >= 0, pos - dists + 1, 0))
    assert torch.equal(conv_taps(9, 0, 3, "dilated")[:, 1], torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7]))


@pytest.mark.parametrize("bad", [dict(seq_len=MAX_SEQ_LEN + 1), dict(seq_len=0), dict(conv2d_k=4), dict(layout="spiral")])
def test_tap_table_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        conv_taps(**{**dict(seq_len=16, conv1d_k=4, conv2d_k=3), **bad})


def naive_gather_conv(u: torch.Tensor, weight: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """Straight from the definition: 1D taps t-j, then the KxK grid neighbours with index <= t."""
    B, T, C = u.shape
    x, y = hilbert_d2xy(HILBERT_SIDE, np.arange(MAX_SEQ_LEN))
    where = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(x, y))}
    out = torch.zeros(B, T, C, dtype=torch.float64)
    r = k2 // 2
    for t in range(T):
        for j in range(k1):
            if t - j >= 0:
                out[:, t] += weight[:, j] * u[:, t - j]
        offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)] if k2 else []
        for j, (dx, dy) in enumerate(offsets, start=k1):
            src = where.get((int(x[t]) + dx, int(y[t]) + dy))
            if src is not None and src <= t:
                out[:, t] += weight[:, j] * u[:, src]
    return out


@pytest.mark.parametrize("T,k1,k2", [(1, 4, 3), (37, 4, 3), (70, 2, 5), (17, 0, 3), (23, 3, 0)])
def test_gather_conv_matches_definition(T, k1, k2):
    torch.manual_seed(T)
    u = torch.randn(2, T, 5, dtype=torch.float64)
    w = torch.randn(5, k1 + k2 * k2, dtype=torch.float64)
    out = causal_gather_conv_ref(u, conv_taps(T, k1, k2), w)
    torch.testing.assert_close(out, naive_gather_conv(u, w, k1, k2), rtol=1e-12, atol=1e-12)


def test_gather_conv_1d_part_is_causal_conv1d():
    torch.manual_seed(0)
    u, w = torch.randn(3, 50, 6), torch.randn(6, 4)
    ref = F.conv1d(F.pad(u.transpose(1, 2), (3, 0)), w.flip(1)[:, None], groups=6).transpose(1, 2)
    torch.testing.assert_close(causal_gather_conv_ref(u, conv_taps(50, 4, 0), w), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0, 3, 14, 15, 16, 63, 64, 100])
def test_gather_conv_perturbation_and_gradient(t):
    torch.manual_seed(1)
    T = 129
    table, w = conv_taps(T, 4, 3), torch.randn(4, 13)
    u = torch.randn(1, T, 4, requires_grad=True)
    out = causal_gather_conv_ref(u, table, w)
    u2 = u.detach().clone()
    u2[:, t + 1:] = torch.randn_like(u2[:, t + 1:])
    assert torch.equal(causal_gather_conv_ref(u2, table, w)[:, :t + 1], out[:, :t + 1].detach())
    out[:, t].sum().backward()
    assert (u.grad[:, t + 1:] == 0).all() and (u.grad[:, t] != 0).any()


def brute_chunk_memory(q, k, v, chunk, topk):
    """Per (batch, head, query): rank complete earlier chunks by q . mean(k), attend over the chosen
    chunks plus the own chunk up to and including the query."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // group], v[b, h // group]
            for t in range(T):
                c = t // chunk
                chosen = []
                if c and topk:
                    means = torch.stack([kh[j * chunk:(j + 1) * chunk].mean(0) for j in range(c)])
                    chosen = (means @ q[b, h, t]).topk(min(topk, c)).indices.tolist()
                keys = [s for j in sorted(chosen) for s in range(j * chunk, (j + 1) * chunk)] + list(range(c * chunk, t + 1))
                att = torch.softmax(kh[keys] @ q[b, h, t] / math.sqrt(D), 0)
                out[b, h, t] = att @ vh[keys]
    return out


@pytest.mark.parametrize("T,chunk,topk,H,Hkv", [(37, 4, 1, 4, 2), (37, 4, 3, 2, 2), (40, 8, 2, 4, 1), (9, 4, 0, 2, 1),
                                               (33, 4, 100, 2, 1), (5, 8, 1, 2, 2), (1, 4, 2, 2, 2)])
def test_chunk_memory_matches_brute_force(T, chunk, topk, H, Hkv):
    torch.manual_seed(T * 7 + topk)
    q = torch.randn(2, H, T, 8, dtype=torch.float64)
    k, v = torch.randn(2, Hkv, T, 8, dtype=torch.float64), torch.randn(2, Hkv, T, 8, dtype=torch.float64)
    torch.testing.assert_close(chunk_memory_ref(q, k, v, chunk, topk), brute_chunk_memory(q, k, v, chunk, topk))


def test_chunk_memory_with_all_chunks_is_dense_causal_attention():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 70, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    n_past = 69 // 8
    assert torch.equal(chunk_memory_mask(q, k, 8, n_past)[0, 0], torch.ones(70, 70, dtype=torch.bool).tril())
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk_memory_mask(q, k, 8, n_past), enable_gqa=True)
    torch.testing.assert_close(chunk_memory_ref(q, k, v, 8, n_past), masked, rtol=1e-5, atol=1e-5)


def test_chunk_memory_routing_is_per_token():
    torch.manual_seed(3)
    q, k = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    mask = chunk_memory_mask(q, k, 8, 1)[0, 0]
    picked = {tuple(row[:48].nonzero().flatten().div(8, rounding_mode="floor").unique().tolist()) for row in mask[56:]}
    assert len(picked) > 1, "queries of one chunk must route independently"
    assert (mask[48:56, :48].sum(1) == 8).all()


@pytest.mark.parametrize("t", [7, 8, 9, 15, 16, 17, 20, 63, 64, 65])
def test_chunk_memory_perturbation_and_gradient(t):
    torch.manual_seed(4)
    T, chunk = 80, 8
    q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
    out = chunk_memory_ref(q, k, v, chunk, 2)
    later = [x.detach().clone() for x in (q, k, v)]
    for x in later:
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 10
    torch.testing.assert_close(chunk_memory_ref(*later, chunk, 2)[:, :, :t + 1], out[:, :, :t + 1].detach(), rtol=0, atol=1e-6)
    out[:, :, t].sum().backward()
    for x in (q, k, v):
        assert (x.grad[:, :, t + 1:] == 0).all()
    assert (v.grad[:, :, t] != 0).any()
