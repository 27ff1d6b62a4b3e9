"""The Triton gather conv (gated_gather_conv: the conv m, and silu(gate) * m from its epilogue) against
causal_gather_conv_ref and gated_gather_conv_ref (forward, grad_u, grad_gate, grad_weight).

On CPU the kernels run in Triton's interpreter (conftest switches it on before triton is imported); on a GPU the
compiled kernels run on CUDA tensors.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import convgpt_ops as kc
from convgpt_ops import causal_gather_conv_ref, conv_taps

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET is off and there is no CUDA device")
T_LONG = 1024  # tables are built for this length and sliced, as the model does
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max |err| / max |ref|, ref in fp64 on the rounded inputs
KS = ((4, 3), (2, 5), (0, 3), (3, 0))


@functools.cache
def long_tables(k1: int, k2: int) -> tuple[torch.Tensor, torch.Tensor]:
    table = conv_taps(T_LONG, k1, k2).to(DEVICE)
    return table, kc.conv_taps_inverse(table)


def gather_conv(u: torch.Tensor, table: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The plain conv through the kernel op: its first output, the gate unused (and without a gradient)."""
    return kc.gated_gather_conv(u, torch.zeros_like(u), table, inv, weight)[0]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_both(u: torch.Tensor, k: tuple[int, int], dtype: torch.dtype, slicing: str = "none", seed: int = 0):
    """(triton out, grad_u, grad_w) and the fp64 reference's, for the same upstream gradient."""
    B, T, C = u.shape
    table, inv = long_tables(*k)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, table.shape[1], generator=gen).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(B, T, C, generator=gen).to(DEVICE, dtype)
    tab, inv_in = (table[:T] if slicing != "none" else table), (inv[:T] if slicing == "both" else inv)
    u = u.detach().requires_grad_()
    out = gather_conv(u, tab, inv_in, weight)
    out.backward(grad)
    u64, w64 = u.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = causal_gather_conv_ref(u64, table[:T], w64)
    ref.backward(grad.double())
    assert out.dtype == dtype and u.grad.dtype == dtype and weight.grad.dtype == dtype
    return (out, u.grad, weight.grad), (ref, u64.grad, w64.grad)


def assert_close(got: tuple, ref: tuple, dtype: torch.dtype) -> None:
    for name, g, r in zip(("out", "grad_u", "grad_w"), got, ref):
        assert g.shape == r.shape
        assert rel_err(g, r) <= TOL[dtype], f"{name}: rel err {rel_err(g, r):.2e} > {TOL[dtype]:.0e}"


def test_inverse_inverts_the_table_one_to_one():
    for k1, k2 in (*KS, (4, 7)):
        table = conv_taps(4096, k1, k2)
        J = table.shape[1]
        hit = table > 0
        keys = ((table - 1) * J + torch.arange(J))[hit]
        assert torch.bincount(keys).max() <= 1, "some (source, tap) pair is read by two positions"
        inv = kc.conv_taps_inverse(table)
        assert inv.shape == table.shape and inv.dtype == torch.int64
        assert int((inv > 0).sum()) == int(hit.sum())
        s, j = (inv > 0).nonzero(as_tuple=True)
        assert torch.equal(table[inv[s, j] - 1, j], s + 1)
        assert (inv[s, j] - 1 >= s).all(), "a source is only read at or after its own position"
        pos = torch.arange(4096)[:, None]
        one_d = torch.arange(k1)[None, :]
        assert torch.equal(inv[:, :k1], torch.where(pos + one_d < 4096, pos + one_d + 1, 0))
        assert torch.equal(kc.conv_taps_inverse(table[:100]), torch.where(inv[:100] <= 100, inv[:100], 0))
    with pytest.raises(ValueError, match="not invertible"):
        kc.conv_taps_inverse(torch.tensor([[1], [1]]))


@pytest.mark.parametrize("B,T,C,k,slicing", [
    (1, 1, 5, (4, 3), "none"),
    (3, 63, 33, (4, 3), "table"),
    (1, 65, 5, (2, 5), "both"),
    (3, 129, 5, (0, 3), "table"),
    (3, 65, 33, (3, 0), "none"),
    pytest.param(1, 1000, 5, (4, 3), "table", marks=pytest.mark.slow),
])
def test_fp32_matches_reference(B: int, T: int, C: int, k: tuple[int, int], slicing: str):
    u = torch.randn(B, T, C, generator=torch.Generator().manual_seed(T)).to(DEVICE)
    assert_close(*run_both(u, k, torch.float32, slicing), torch.float32)


@pytest.mark.parametrize("B,T,C,k", [(3, 65, 33, (4, 3)), (1, 129, 5, (2, 5))])
def test_bf16_matches_reference_on_rounded_inputs(B: int, T: int, C: int, k: tuple[int, int]):
    u = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    assert_close(*run_both(u, k, torch.bfloat16, "table"), torch.bfloat16)


def test_weight_grad_with_few_programs_crossing_batch_rows(monkeypatch: pytest.MonkeyPatch):
    """Each wgrad program loops over several row blocks, some straddling two batch rows (T = 63)."""
    monkeypatch.setattr(kc, "WGRAD_MAX_PROGRAMS", 3)
    u = torch.randn(3, 63, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert_close(*run_both(u, (4, 3), torch.float32, "table"), torch.float32)


@pytest.mark.parametrize("view", ["transposed", "strided", "model_layout", "sliced"])
def test_non_contiguous_u(view: str):
    """Channels with stride != 1 are copied; the rest go to the kernels as they are: the model's u is one half of
    W_in's output (rows 2C apart), and a sequence slice has a batch stride that is not T * C."""
    gen = torch.Generator().manual_seed(3)
    if view == "transposed":
        u = torch.randn(2, 33, 65, generator=gen).to(DEVICE).transpose(1, 2)
    elif view == "strided":
        u = torch.randn(2, 65, 66, generator=gen).to(DEVICE)[:, :, ::2]
    elif view == "model_layout":
        u = torch.randn(2, 65, 2 * 33, generator=gen).to(DEVICE).chunk(2, -1)[1]
    else:
        u = torch.randn(3, 80, 33, generator=gen).to(DEVICE)[1:, 7:72]
    assert not u.is_contiguous() and (kc.channels_last_contiguous(u) is u) == (view in ("model_layout", "sliced"))
    assert_close(*run_both(u, (4, 3), torch.float32, "table"), torch.float32)


def test_backward_is_bitwise_deterministic():
    u = torch.randn(2, 65, 33, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (_, gu1, gw1), _ = run_both(u, (4, 3), torch.float32, seed=5)
    (_, gu2, gw2), _ = run_both(u, (4, 3), torch.float32, seed=5)
    assert torch.equal(gu1, gu2) and torch.equal(gw1, gw2)


def test_compiles_fullgraph():
    table, inv = long_tables(4, 3)
    fn = torch.compile(lambda u, w: gather_conv(u * 2, table[:33], inv, w).square().sum(),
                       fullgraph=True, backend="aot_eager")
    u = torch.randn(2, 33, 5, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, table.shape[1], device=DEVICE, requires_grad=True)
    fn(u, weight).backward()
    u64, w64 = u.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    causal_gather_conv_ref(u64 * 2, table[:33], w64).square().sum().backward()
    assert rel_err(u.grad, u64.grad) <= TOL[torch.float32] and rel_err(weight.grad, w64.grad) <= TOL[torch.float32]


def test_bad_inputs_raise_value_errors():
    table, inv = long_tables(4, 3)
    u, weight = torch.randn(1, 8, 5, device=DEVICE), torch.randn(5, 13, device=DEVICE)
    cases = [
        ((u.double(), table, inv, weight), "u must be"),
        ((u.long(), table, inv, weight), "u must be"),
        ((u[0], table, inv, weight), "u must be"),
        ((u, table, inv, weight[:4]), "weight has 4 channels"),
        ((u, table, inv, weight[:, :12]), "table must be"),
        ((u, table.int(), inv, weight), "table must be"),
        ((u, table, inv[:7], weight), "inv must be"),
        ((u, table, inv, weight.long()), "weight must be"),
        ((u.bfloat16(), table, inv, weight), "weight must be .* in u's dtype"),
        ((u.to("meta"), table, inv, weight), "table is on"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            gather_conv(*args)


@pytest.mark.parametrize("B,T,C,k,dtype,layout", [
    (2, 65, 33, (4, 3), torch.float32, "model"), (1, 17, 5, (2, 5), torch.float32, "contiguous"),
    (1, 40, 70, (3, 0), torch.float32, "mixed"), (2, 33, 16, (4, 3), torch.bfloat16, "model")])
def test_gated_conv_matches_silu_gate_times_the_reference(B, T, C, k, dtype, layout):
    """gated_gather_conv's (m, silu(g) * m) against the fp64 reference, with every gradient (u, g, weight) through
    both outputs; layouts: u and g as the two halves of one projection (ConvMix), separate tensors, or one of each."""
    table, inv = long_tables(*k)
    gen = torch.Generator().manual_seed(T + C)
    both = torch.randn(B, T, 2 * C, generator=gen).to(DEVICE, dtype)
    u, g = both.chunk(2, -1) if layout == "model" else (both[..., :C].contiguous(), both[..., C:].contiguous())
    if layout == "mixed":
        u = both[..., :C]
    weight = torch.randn(C, table.shape[1], generator=gen).to(DEVICE, dtype)
    up_m, up_y = (torch.randn(B, T, C, generator=gen).to(DEVICE, dtype) for _ in range(2))
    leaves = [x.detach().clone().requires_grad_() for x in (u, g, weight)]
    m, y = kc.gated_gather_conv(leaves[0], leaves[1], table[:T], inv, leaves[2])
    ((m * up_m).sum() + (y * up_y).sum()).backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in (u, g, weight)]
    ref_m = causal_gather_conv_ref(ref_leaves[0], table[:T], ref_leaves[2])
    ref_y = kc.gated_gather_conv_ref(ref_leaves[0], ref_leaves[1], table[:T], ref_leaves[2])
    ((ref_m * up_m.double()).sum() + (ref_y * up_y.double()).sum()).backward()
    for name, got, want in zip(("m", "y", "grad_u", "grad_g", "grad_w"), [m, y, *(x.grad for x in leaves)],
                               [ref_m, ref_y, *(x.grad for x in ref_leaves)]):
        assert got.dtype == dtype and rel_err(got, want) <= TOL[dtype], f"{name}: {rel_err(got, want):.2e}"
    g_only, g64 = g.detach().clone().requires_grad_(), g.detach().double().requires_grad_()
    kc.gated_gather_conv(u, g_only, table[:T], inv, weight)[1].sum().backward()  # m unused: its gradient is None
    kc.gated_gather_conv_ref(u.double(), g64, table[:T], weight.double()).sum().backward()
    assert rel_err(g_only.grad, g64.grad) <= TOL[dtype]
    g_unused = g.detach().clone().requires_grad_()
    kc.gated_gather_conv(u, g_unused, table[:T], inv, weight)[0].sum().backward()  # y unused: no gate gradient
    assert g_unused.grad is None


def test_gated_conv_opcheck_and_bad_gate():
    table, inv = long_tables(4, 3)
    u, g = (torch.randn(2, 17, 5, device=DEVICE, requires_grad=True) for _ in range(2))
    weight = torch.randn(5, table.shape[1], device=DEVICE, requires_grad=True)
    torch.library.opcheck(kc.gated_gather_conv, (u, g, table[:17], inv, weight))
    with pytest.raises(ValueError, match="gate must match u"):
        kc.gated_gather_conv(u, g[:, :16], table[:17], inv, weight)
    with pytest.raises(ValueError, match="gate must match u"):
        kc.gated_gather_conv(u, g.bfloat16(), table[:17], inv, weight)
