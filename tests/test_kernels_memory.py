"""The Triton chunk memory (sparse chunk attention) against chunk_memory_ref: on CPU in Triton's interpreter
(conftest switches it on), on a GPU with the compiled kernels."""

from __future__ import annotations

import os

import pytest
import torch

from convgpt_ops import (check_chunk_memory_inputs, check_memory_sizes, chunk_memory_from_picks, chunk_memory_op,
                         chunk_memory_ref, chunk_memory_triton, chunk_picks, chunk_routing, launch_sum_slots,
                         memory_schedule)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET is off and there is no CUDA device")

C = 16
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # atol = rtol, per dtype; bf16 is compared to fp32 on rounded inputs
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16  # compiled, the memory runs bf16/fp16 only
ALL = 10 ** 6  # topk >= n_past: dense causal attention (chunk_memory_ref's SDPA fast path)


def make(B: int, H: int, Hkv: int, T: int, D: int, dtype: torch.dtype = DTYPE, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=gen).to(DEVICE, dtype) for h in (H, Hkv, Hkv))
    return q, k, v, torch.randn(B, H, T, D, generator=gen).to(DEVICE, dtype)


def run(fn, q, k, v, grad, topk):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, C, topk)
    out.backward(grad)
    return out.detach(), [x.grad for x in leaves]


def assert_matches_ref(q, k, v, grad, topk):
    tol = TOL[q.dtype]
    out, grads = run(chunk_memory_triton, q, k, v, grad, topk)
    ref, ref_grads = run(chunk_memory_ref, *(x.float() for x in (q, k, v, grad)), topk)
    assert out.dtype == q.dtype and [g.dtype for g in grads] == [q.dtype] * 3
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,H,Hkv,T,D,topk", [
    (1, 4, 1, 63, 16, 1), (3, 4, 2, 65, 32, 4), (1, 4, 4, 129, 16, ALL), (1, 4, 2, 129, 32, 4),
    (3, 2, 1, 1, 16, 1), (1, 2, 1, C - 1, 16, 1), (1, 2, 2, C, 32, 1), (1, 2, 1, C + 1, 16, ALL),
    (1, 2, 1, 2 * C, 16, 1), (1, 2, 1, 40, 16, 0), pytest.param(1, 1, 1, 1000, 16, 1, marks=pytest.mark.slow)])
def test_matches_reference_on_odd_shapes(B, H, Hkv, T, D, topk):
    assert_matches_ref(*make(B, H, Hkv, T, D, seed=T + topk), topk)


@pytest.mark.parametrize("dtype,Hkv,T,D,topk", [(torch.bfloat16, 2, 65, 32, 1),
                                                 pytest.param(torch.bfloat16, 1, 129, 16, ALL, marks=pytest.mark.slow),
                                                 (torch.float16, 2, 33, 16, 1)])
def test_matches_reference_half(dtype, Hkv, T, D, topk):
    assert_matches_ref(*make(1, 4, Hkv, T, D, dtype, seed=T), topk)


def test_non_contiguous_inputs_from_model_layout():
    q, k, v, grad = make(2, 4, 2, 65, 16, seed=5)
    q_bthd = q.transpose(1, 2).contiguous().requires_grad_()  # [B, T, H, D], as the model's projections give
    kv_bthd = torch.cat([k, v], 1).transpose(1, 2).contiguous().requires_grad_()
    out = chunk_memory_triton(q_bthd.transpose(1, 2), *kv_bthd.transpose(1, 2).chunk(2, 1), C, 2)
    assert out.transpose(1, 2).is_contiguous()  # q's layout: the model's transpose + reshape after it is free
    out.backward(grad.transpose(1, 2).contiguous().transpose(1, 2))  # the gradient in that layout too
    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    ref = chunk_memory_ref(*ref_leaves, C, 2)
    ref.backward(grad.float())
    tol = TOL[DTYPE]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(q_bthd.grad.transpose(1, 2).float(), ref_leaves[0].grad, rtol=tol, atol=tol)
    torch.testing.assert_close(kv_bthd.grad.transpose(1, 2).float(), torch.cat([x.grad for x in ref_leaves[1:]], 1),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("t", [C - 1, 2 * C, 3 * C + 5])
def test_causal_outputs_and_gradients(t):
    q, k, v, _ = make(1, 2, 1, 4 * C + 1, 16, seed=9)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = chunk_memory_triton(*leaves, C, 1)
    later = [x.clone() for x in (q, k, v)]
    for x in later:
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 10
    torch.testing.assert_close(chunk_memory_triton(*later, C, 1)[:, :, :t + 1], out[:, :, :t + 1].detach(),
                               rtol=0, atol=1e-6)
    out[:, :, t].sum().backward()
    for x in leaves:
        assert (x.grad[:, :, t + 1:] == 0).all()
    assert (leaves[2].grad[:, :, t] != 0).any()


def test_schedule_lists_each_reading_query_once_and_tiles_cover_the_lists():
    T, topk = 100, 2  # 7 chunks of 16, the last one partial
    q, k, _, _ = make(2, 2, 1, T, 16, seed=3)
    picks = chunk_picks(q, k, C, topk)
    picked = chunk_routing(q, k, C, topk).cpu()
    pairs, starts, used, work = (x.cpu() for x in memory_schedule(picks, C))
    n_past, nt, S = picked.shape[-1], -(-T // C), topk + 1
    for b in range(2):
        for h in range(2):
            bh = b * 2 + h
            assert used[b, h].tolist() == [int(picked[b, h, t].sum()) + 1 for t in range(T)]
            for j in range(nt):
                readers = [t for t in range(T) if t // C == j or (j < n_past and picked[b, h, t, j])]
                listed = pairs[bh, starts[bh, j]:starts[bh, j + 1]].tolist()
                assert [p // S for p in listed] == readers
                assert [p % S for p in listed] == [int(picked[b, h, t, :j].sum()) for t in readers]
            items = [(int(w) // T, int(w) % T) for w in work[bh] if w >= 0]
            counts = (starts[bh, 1:] - starts[bh, :-1]).tolist()
            assert sorted(items) == [(j, f) for j in range(nt) for f in range(0, counts[j], C)]


def test_picks_at_or_after_the_own_chunk_repeated_or_negative_are_dropped():
    """The kernels stay causal and exact whatever picks they get: only strictly earlier chunks, each once, count."""
    q, k, v, _ = make(1, 2, 1, 5 * C, 16, seed=21)
    picks = chunk_picks(q, k, C, 1)
    n_past = picks.shape[2] // C  # 4, the empty-slot marker
    junk = torch.stack([picks[..., 0], picks[..., 0], torch.full_like(picks[..., 0], -3),
                        (torch.arange(5 * C, device=DEVICE) // C).expand_as(picks[..., 0]),
                        torch.full_like(picks[..., 0], n_past + 7)], -1)  # repeat, negative, own chunk, beyond
    results = []
    for p in (picks, junk):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = chunk_memory_from_picks(*leaves, p, C)
        (out * torch.arange(16, device=DEVICE)).sum().backward()
        results.append([out, lse, *(x.grad for x in leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_backward_is_bitwise_deterministic():
    q, k, v, grad = make(1, 4, 1, 65, 16, seed=11)
    first, second = (run(chunk_memory_triton, q, k, v, grad, 2)[1] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dq_slot_sum_reads_only_the_used_slots():
    """The backward's dQ slots are never zeroed: a query's slots from `used` on must not be read. Poisoned with NaN
    here, they must leave no trace."""
    gen = torch.Generator().manual_seed(29)
    B, H, T, S, D = 2, 3, 67, 5, 16
    used = torch.randint(1, S + 1, (B, H, T), generator=gen, dtype=torch.int32)
    slots = torch.randn(B, H, T, S, D, generator=gen)
    poisoned = slots.masked_fill(torch.arange(S)[:, None] >= used[..., None, None], float("nan"))
    out = launch_sum_slots(poisoned.to(DEVICE), used.to(DEVICE), torch.empty(B, H, T, D, device=DEVICE))
    torch.testing.assert_close(out.cpu(), torch.nan_to_num(poisoned).sum(3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("Hkv", [1, 2, 4])
def test_every_buffer_the_kernels_read_back_is_written_first(monkeypatch: pytest.MonkeyPatch, Hkv):
    """The partials, lse and dQ slots, and dK and dV, come from torch.empty: poisoned with NaN here, outputs and
    gradients still match the reference, so every slot read back was written (GQA groups of 4, 2 and 1, a partial
    last chunk, and top-k above the earlier chunks, so some slots stay unused)."""
    empty = torch.empty

    def poisoned(*size, **kwargs):
        x = empty(*size, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    q, k, v, grad = make(2, 4, Hkv, 67, 16, seed=31)
    want = run(chunk_memory_ref, q, k, v, grad, 5)
    monkeypatch.setattr(torch, "empty", poisoned)
    got = run(chunk_memory_triton, q, k, v, grad, 5)
    for name, a, b in zip(("out", "dq", "dk", "dv"), [got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(a, b, rtol=TOL[q.dtype], atol=TOL[q.dtype], msg=lambda m: f"{name}: {m}")


def test_lse_output_and_its_gradient():
    q, k, v, _ = make(1, 2, 1, 40, 16, seed=13)
    picked = chunk_routing(q, k, C, 1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = chunk_memory_from_picks(*leaves, chunk_picks(q, k, C, 1), C)
    tol = TOL[DTYPE]
    assert lse.shape == (1, 2, 40) and lse.dtype == torch.float32
    pos = torch.arange(40, device=DEVICE)
    own = (pos[:, None] // C == pos[None, :] // C) & (pos[None, :] <= pos[:, None])
    mask = own | (picked[..., (pos // C).clamp(max=picked.shape[-1] - 1)] & (pos < picked.shape[-1] * C))
    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    scores = ref_leaves[0] @ ref_leaves[1].transpose(-1, -2).repeat_interleave(2, 1) / 4.0
    ref_lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=tol / 10, atol=tol / 10)
    (out.sum() + lse.sum()).backward()
    ref_out = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ ref_leaves[2].repeat_interleave(2, 1)
    (ref_out.sum() + ref_lse.sum()).backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=tol, atol=tol)


def test_opcheck():
    q, k, v, _ = make(1, 2, 1, 33, 16, seed=17)
    picks = chunk_picks(q, k, C, 1)
    torch.library.opcheck(chunk_memory_op, ([x.requires_grad_() for x in (q, k, v)] + [*memory_schedule(picks, C), C]))


def test_torch_compile_fullgraph():
    q, k, v, grad = make(1, 2, 1, 33, 16, seed=19)
    compiled = torch.compile(chunk_memory_triton, fullgraph=True, backend="aot_eager")
    out, grads = run(compiled, q, k, v, grad, 1)
    want, want_grads = run(chunk_memory_triton, q, k, v, grad, 1)
    assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def good(**over):
    shapes = dict(q=(1, 4, 32, 16), k=(1, 2, 32, 16), v=(1, 2, 32, 16))
    dtypes = dict(q=DTYPE, k=DTYPE, v=DTYPE)
    shapes.update({n: s for n, s in over.items() if n in shapes and isinstance(s, tuple)})
    dtypes.update({n[:-6]: d for n, d in over.items() if n.endswith("_dtype")})
    return [torch.zeros(shapes[n], dtype=dtypes[n], device=DEVICE) for n in "qkv"]


@pytest.mark.parametrize("over,chunk,needle", [
    (dict(q=(4, 32, 16)), C, "4-D"), (dict(v=(1, 2, 31, 16)), C, "same shape"),
    (dict(k=(1, 2, 31, 16), v=(1, 2, 31, 16)), C, "match q"), (dict(k=(1, 3, 32, 16), v=(1, 3, 32, 16)), C, "Hkv=3"),
    (dict(v_dtype=torch.float16), C, "dtypes"), (dict(q_dtype=torch.float64, k_dtype=torch.float64,
                                                       v_dtype=torch.float64), C, "dtypes"),
    (dict(), 24, "chunk 24"), (dict(), 8, "chunk 8"), (dict(), 512, "chunk 512"),
    (dict(q=(1, 4, 32, 24), k=(1, 2, 32, 24), v=(1, 2, 32, 24)), C, "head dim 24"),
    (dict(q=(1, 4, 32, 256), k=(1, 2, 32, 256), v=(1, 2, 32, 256)), C, "head dim 256"),
])
def test_rejects_bad_inputs(over, chunk, needle):
    with pytest.raises(ValueError, match=needle):
        chunk_memory_triton(*good(**over), chunk, 1)


def test_rejects_bad_picks():
    q, k, v = good()
    with pytest.raises(ValueError, match="picks must be int32/int64"):
        chunk_memory_from_picks(q, k, v, torch.zeros(1, 4, 32, 1, dtype=torch.bool, device=DEVICE), C)
    with pytest.raises(ValueError, match=r"\[1, 4, 32, P\] on .*; got torch.int64 \(1, 4, 31, 1\)"):
        chunk_memory_from_picks(q, k, v, torch.zeros(1, 4, 31, 1, dtype=torch.long, device=DEVICE), C)


def test_rejects_a_schedule_that_is_not_memory_schedules():
    q, k, v = good()
    pairs, starts, used, work = memory_schedule(torch.zeros(1, 4, 32, 1, dtype=torch.long, device=DEVICE), C)
    with pytest.raises(ValueError, match=r"schedule pairs must be contiguous int32 \[4, 64\]"):
        chunk_memory_op(q, k, v, pairs.long(), starts, used, work, C)
    with pytest.raises(ValueError, match=r"schedule work must be contiguous int32 \[4, 6\]"):
        chunk_memory_op(q, k, v, pairs, starts, used, work[:, :-1], C)
    with pytest.raises(ValueError, match=r"schedule starts must be contiguous"):
        chunk_memory_op(q, k, v, pairs, starts.t().contiguous().t(), used, work, C)


def test_one_schedule_serves_forward_and_backward(monkeypatch: pytest.MonkeyPatch):
    import convgpt_ops
    calls = []
    monkeypatch.setattr(convgpt_ops, "memory_schedule", lambda *a: calls.append(1) or memory_schedule(*a))
    q, k, v, grad = make(1, 2, 1, 48, 16, seed=23)
    run(chunk_memory_triton, q, k, v, grad, 1)
    assert len(calls) == 1


def test_refuses_what_cannot_launch_on_hopper():
    """check_memory_sizes admits exactly the tiles whose kernels fit a Hopper block (tests/test_kernel_resources.py
    compiles both sides of the bound for sm_90)."""
    for chunk, head_dim in ((16, 128), (64, 128), (128, 64), (256, 32)):
        check_memory_sizes(chunk, head_dim)
    for chunk, head_dim in ((128, 128), (256, 64)):
        with pytest.raises(ValueError, match=f"chunk {chunk} x head dim {head_dim} needs more than the 227 KB"):
            check_memory_sizes(chunk, head_dim)


def test_compiled_path_refuses_fp32(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 2, 32, 16)
    with pytest.raises(ValueError, match="fp32 q, k, v: the compiled chunk memory runs bf16/fp16 only"):
        check_chunk_memory_inputs(q, q[:, :1], q[:, :1], C)
    check_chunk_memory_inputs(q.bfloat16(), q[:, :1].bfloat16(), q[:, :1].bfloat16(), C)
