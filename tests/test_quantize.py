"""Tests for quantize.py: python -m pytest -q tests/test_quantize.py"""
import json
import math
import random
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quantize as Q  # noqa: E402


K = 12.85  # the default block matrix clip, in multiples of the row's rms


def ks(plan, k=K):
    return {name: k for name, kind in plan.items() if kind in Q.QMAX}


def roundtrip(sd, plan, k=K):
    qsd = Q.quantize_state_dict(sd, plan, ks(plan, k))
    return qsd, Q.dequantize_state_dict(qsd)


def rms(w):
    return w.float().square().mean(1, keepdim=True).sqrt()


def frame(body: bytes) -> bytes:
    return Q.MAGIC + bytes([Q.FORMAT_VERSION]) + zstandard.ZstdCompressor().compress(body)


def body_of(blob: bytes) -> tuple[dict, bytes]:
    body = zstandard.ZstdDecompressor().decompress(blob[len(Q.MAGIC) + 1 :])
    (hlen,) = struct.unpack_from("<I", body, len(body) - 4)
    return json.loads(body[len(body) - 4 - hlen : -4]), body[: len(body) - 4 - hlen]


def rebuild(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return frame(payload + raw + struct.pack("<I", len(raw)))


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g)
    w[3] = 0
    sd = {
        "embed": torch.randn(7, 13, generator=g).bfloat16(),
        "mlp.w": w,
        "tiny": torch.randn(1, 1, generator=g),
        "wide": torch.randn(3, 1000, generator=g) * 1e-3,
        "norm": torch.randn(13, generator=g),
        "bias": torch.randn(5, 2, generator=g),
        "gain": torch.randn(4, generator=g).bfloat16(),
    }
    plan = {"embed": "int8", "mlp.w": "int6", "tiny": "int6", "wide": "int8",
            "norm": "fp32", "bias": "fp16", "gain": "fp32"}
    return sd, plan


@pytest.mark.parametrize("k", [3.0, K, 20.0])
def test_fake_quant_matches_int6_roundtrip(k):
    w = torch.randn(32, 900, generator=torch.Generator().manual_seed(1)) * 0.05
    w[7, 3] = 2.0  # beyond the clip at every k here (the rms is ~0.083, so 20 rms is ~1.7): clamped alike
    out = Q.fake_quant_int6(w, k)
    qsd, ref = roundtrip({"w": w}, {"w": "int6"}, k)
    assert torch.equal(out, ref["w"])
    step = qsd["w"]["scale"].float()[:, None]
    inside = w.abs() <= Q.INT6_MAX * step
    assert ((out - w).abs() <= step / 2)[inside].all() and not inside.all()
    assert all(torch.unique(row).numel() <= 2 * Q.INT6_MAX + 1 for row in out)
    assert torch.equal(torch.round(out / step), qsd["w"]["q"].float())


def test_fake_quant_gradient_is_identity_and_zero_row_is_safe():
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    w[5] = 0
    w.requires_grad_(True)
    upstream = torch.randn(8, 24)
    out = Q.fake_quant_int6(w, K)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)
    assert torch.equal(out[5].detach(), torch.zeros(24))
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()


def test_fake_quant_bf16():
    w = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_(True)
    out = Q.fake_quant_int6(w, K)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.detach(), Q.fake_quant_int6(w.detach().float(), K).bfloat16())
    upstream = torch.randn(6, 50).bfloat16()
    out.backward(upstream)
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, upstream)


NO_CXX = not (shutil.which("g++") or shutil.which("c++"))


@pytest.mark.slow
@pytest.mark.skipif(NO_CXX, reason="torch.compile on CPU needs a C++ compiler")
def test_fake_quant_under_torch_compile():
    compiled = torch.compile(Q.fake_quant_int6, fullgraph=True)
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(4))
    w[0] = 0
    w.requires_grad_(True)
    out = compiled(w, K)
    upstream = torch.randn(16, 48)
    out.backward(upstream)
    assert torch.equal(out.detach(), Q.fake_quant_int6(w.detach(), K))
    assert torch.equal(out[0].detach(), torch.zeros(48))
    assert torch.equal(w.grad, upstream)


def test_roundtrip_dtypes_shapes_and_error_bounds(sample):
    sd, plan = sample
    qsd, out = roundtrip(sd, plan)
    assert set(out) == set(sd)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
    assert torch.equal(out["norm"], sd["norm"])
    assert torch.equal(out["gain"], sd["gain"])
    assert torch.equal(out["bias"], sd["bias"].half().float())
    for name in ("embed", "mlp.w", "tiny", "wide"):
        q, scale = qsd[name]["q"], qsd[name]["scale"]
        qmax = Q.QMAX[plan[name]]
        assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (q.shape[0],)
        want = K * rms(sd[name]) / qmax  # the step: the clip K * rms over qmax, to fp16 precision
        assert torch.allclose(scale.float()[:, None], want, rtol=2**-11, atol=0) or name == "mlp.w", name
        deq = q.float() * scale.float()[:, None]
        assert ((deq - sd[name].float()).abs() <= scale.float()[:, None] / 2).all(), name
        assert torch.equal(out[name], deq.to(sd[name].dtype)), name
    assert torch.equal(out["mlp.w"][3], torch.zeros(40))


@pytest.mark.parametrize("kind", ["int6", "int8"])
def test_zero_constant_and_tiny_rows(kind):
    """A zero row has zero rms and comes back exactly zero; a constant row (standard deviation 0) is not zeroed:
    the grid is centred on zero and scaled by the rms, which is the constant's size."""
    w = torch.zeros(5, 9)
    w[1, 2] = 1e-30
    w[2] = 1e-6
    w[3] = 3e5
    w[4] = -0.7
    qsd, out = roundtrip({"w": w}, {"w": kind})
    step = qsd["w"]["scale"].float()[:, None]
    assert torch.equal(out["w"][0], torch.zeros(9))
    assert (qsd["w"]["scale"] > 0).all() and torch.isfinite(qsd["w"]["scale"]).all()
    assert ((out["w"] - w).abs() <= step / 2).all()
    assert (out["w"][3:] != 0).all() and torch.equal(out["w"][4].sign(), w[4].sign())


@pytest.mark.parametrize("kind", ["int6", "int8"])
def test_row_with_one_huge_outlier(kind):
    """The outlier sets the rms, so the clip: it comes back at the clip with its sign, every other value within half
    a step, nothing overflows."""
    w = torch.randn(3, 512, generator=torch.Generator().manual_seed(9)) * 0.02
    w[1, 100] = 1e4
    w[2, 7] = -1e4
    qsd, out = roundtrip({"w": w}, {"w": kind})
    q, step = qsd["w"]["q"], qsd["w"]["scale"].float()
    qmax = Q.QMAX[kind]
    assert torch.isfinite(out["w"]).all() and q.abs().max() <= qmax
    assert q[1, 100] == qmax and q[2, 7] == -qmax
    assert out["w"][1, 100] == qmax * step[1] and 0 < qmax * step[1] <= 1e4
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[1, 100] = rest[2, 7] = False
    assert ((out["w"] - w).abs() <= step[:, None] / 2)[rest].all()


def test_coarser_grid_costs_fewer_bytes_more_error():
    """On Gaussian rows the clip k trades bytes for error: ~3.4 bits per weight at 12.85 (the records' 3.5)."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(10))
    bits, errs = {}, {}
    for k in (4.0, 8.0, K):
        qsd, out = roundtrip({"w": w}, {"w": "int6"}, k)
        bits[k] = 8 * len(Q.pack(qsd)) / w.numel()
        errs[k] = ((out["w"] - w) ** 2).mean().item()
    assert bits[4.0] > bits[8.0] > bits[K] and errs[4.0] < errs[8.0] < errs[K]
    assert 3.2 < bits[K] < 3.55 and bits[4.0] > 5.0


@pytest.mark.parametrize("kind,qmax", [("int6", 31), ("int8", 127)])
def test_values_in_range(kind, qmax):
    torch.manual_seed(8)
    w = torch.distributions.StudentT(1.0).sample((32, 128)) * 100
    for k in (1.0, K, 1000.0):
        q = Q.quantize_state_dict({"w": w}, {"w": kind}, {"w": k})["w"]["q"]
        assert q.dtype == torch.int8 and q.min() >= -qmax and q.max() <= qmax
    assert q.abs().max() < qmax  # a clip far beyond the heaviest tail leaves the end levels unused


def test_pack_deterministic_and_lossless(sample):
    sd, plan = sample
    qsd = Q.quantize_state_dict(sd, plan, ks(plan))
    blob = Q.pack(qsd)
    assert blob[:3] == Q.MAGIC and blob[3] == Q.FORMAT_VERSION
    assert blob == Q.pack(qsd) == Q.pack(Q.quantize_state_dict(sd, plan, ks(plan)))
    back = Q.unpack(blob)
    assert set(back) == set(qsd)
    want, got = Q.dequantize_state_dict(qsd), Q.dequantize_state_dict(back)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert Q.pack(back) == blob


def test_plan_errors():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="missing.w"):
        Q.quantize_state_dict({"ok": w, "missing.w": w}, {"ok": "int6"}, {"ok": K})
    with pytest.raises(ValueError, match="odd"):
        Q.quantize_state_dict({"odd": w}, {"odd": "int4"}, {"odd": K})
    with pytest.raises(ValueError, match="vec"):
        Q.quantize_state_dict({"vec": torch.randn(8)}, {"vec": "int6"}, {"vec": K})
    with pytest.raises(ValueError, match="conv"):
        Q.quantize_state_dict({"conv": torch.randn(2, 3, 4)}, {"conv": "int8"}, {"conv": K})
    for k in (0, -1.0, math.nan, math.inf, None, "12"):
        with pytest.raises(ValueError, match=r"^w: the clip k must be a finite number > 0"):
            Q.quantize_state_dict({"w": w}, {"w": "int6"}, {} if k is None else {"w": k})


def test_unpack_rejects_truncated_blobs(sample):
    blob = Q.pack(Q.quantize_state_dict(*sample, ks(sample[1])))
    for cut in (0, 1, 2, 3, 4, 5, 10, len(blob) // 2, len(blob) - 4, len(blob) - 1):
        with pytest.raises(ValueError, match="truncated or corrupt"):
            Q.unpack(blob[:cut])


def test_unpack_rejects_foreign_and_corrupt_blobs(sample):
    blob = Q.pack(Q.quantize_state_dict(*sample, ks(sample[1])))
    rng = random.Random(6)
    for foreign in (b"PK\x03\x04" + bytes(100), bytes(rng.getrandbits(8) for _ in range(300)), b"\x28\xb5\x2f\xfd" * 8):
        with pytest.raises(ValueError, match="not a ConvGPT"):
            Q.unpack(foreign)
    with pytest.raises(ValueError, match="version 1"):
        Q.unpack(blob[:3] + b"\x01" + blob[4:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Q.unpack(blob + b"\x00")
    for pos in (4, 9, len(blob) // 2, len(blob) - 2):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ValueError, match="truncated or corrupt"):
            Q.unpack(bytes(bad))
    short = struct.pack("<I", 2)
    for body in (b"", b"\x01\x00", struct.pack("<I", 99) + b"{}", short + b"{]", short + b"[]", short + b"{}"):
        with pytest.raises(ValueError, match="truncated or corrupt"):
            Q.unpack(frame(body))


def test_unpack_rejects_header_payload_mismatch(sample):
    header, payload = body_of(Q.pack(Q.quantize_state_dict(*sample, ks(sample[1]))))
    assert Q.unpack(rebuild(header, payload)).keys() == set(sample[0])

    def mutate(fn):
        h = json.loads(json.dumps(header))
        fn(h["tensors"])
        return h

    cases = [
        mutate(lambda ts: ts[0]["shape"].__setitem__(0, ts[0]["shape"][0] + 1)),
        mutate(lambda ts: ts[0]["parts"][next(iter(ts[0]["parts"]))].__setitem__(1, 1)),
        mutate(lambda ts: ts[-1]["parts"][next(iter(ts[-1]["parts"]))].__setitem__(0, 1)),
        mutate(lambda ts: ts[0].__setitem__("kind", "int4")),
        mutate(lambda ts: ts[0].__setitem__("dtype", "int64")),
        mutate(lambda ts: ts[0].pop("shape")),
        mutate(lambda ts: ts[0].__setitem__("shape", [-1, 5])),
        mutate(lambda ts: ts.append(dict(ts[0]))),
        mutate(lambda ts: ts[1].__setitem__("name", ts[0]["name"])),
        mutate(lambda ts: ts.pop()),
    ]
    for h in cases:
        with pytest.raises(ValueError, match="truncated or corrupt"):
            Q.unpack(rebuild(h, payload))
    for bad_payload in (payload[:-1], payload + b"\x00"):
        with pytest.raises(ValueError, match="truncated or corrupt"):
            Q.unpack(rebuild(header, bad_payload))


def test_compression_sanity():
    w = torch.randn(512, 1536, generator=torch.Generator().manual_seed(7))
    blob = Q.pack(Q.quantize_state_dict({"w": w}, {"w": "int6"}, {"w": K}))
    assert len(blob) / w.numel() < 0.45
    zeros = Q.pack(Q.quantize_state_dict({"w": torch.zeros(512, 1536)}, {"w": "int6"}, {"w": K}))
    assert len(zeros) < 500
    assert torch.equal(Q.dequantize_state_dict(Q.unpack(zeros))["w"], torch.zeros(512, 1536))


def test_int6_values_come_first_and_compress_better_than_interleaved():
    """Since FORMAT_VERSION 2 every q part precedes the fp16 parts; version 1's per-tensor interleaving costs bytes."""
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(512, 768, generator=g) / 30 if name.endswith(".w") else torch.rand(512, generator=g)
          for i in range(6) for name in (f"b{i}.w", f"b{i}.s")}
    plan = {k: "int6" if k.endswith(".w") else "fp16" for k in sd}
    qsd = Q.quantize_state_dict(sd, plan, ks(plan))
    blob = Q.pack(qsd)
    header, _ = body_of(blob)
    offsets = {(t["name"], part): off for t in header["tensors"] for part, (off, _) in t["parts"].items()}
    assert max(v for (n, p), v in offsets.items() if p == "q") < min(v for (n, p), v in offsets.items() if p != "q")
    interleaved = b"".join(qsd[n][p].numpy().tobytes() for n in sorted(qsd) for p in (("q", "scale") if "q" in qsd[n] else ("data",)))
    assert len(blob) < len(zstandard.ZstdCompressor(level=Q.ZSTD_LEVEL).compress(interleaved))


def correlated(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian E[x x^T] of strongly correlated inputs, some always zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols))
    x[:, :3] = 0
    return torch.randn(rows, cols, generator=g), x.T @ x / len(x)


def out_err(q, scale, w, h):
    return Q.output_error(q.float() * scale.float()[:, None] - w, h)


@pytest.mark.parametrize("k", [4.0, K])
def test_gptq_never_worse_per_row_and_much_better_on_correlated_inputs(k):
    w, h = correlated(48, 150, seed=1)
    rounded = Q._quantize_rows(w, Q.INT6_MAX, k)
    gptq = Q.gptq_quantize_rows(w, h, Q.INT6_MAX, k, block_size=32, damp=0.01)
    e_round, e_gptq = out_err(*rounded, w, h), out_err(*gptq, w, h)
    assert (e_gptq <= e_round * (1 + 1e-6)).all()
    assert e_gptq.sum() < 0.75 * e_round.sum()
    assert torch.equal(gptq[1], rounded[1])  # the same grid: GPTQ picks levels, not steps
    assert gptq[0].dtype == torch.int8 and gptq[1].dtype == torch.float16 and gptq[0].abs().max() <= Q.INT6_MAX


def test_gptq_with_uncorrelated_inputs_is_rounding():
    w, _ = correlated(20, 70, seed=2)
    gptq = Q.gptq_quantize_rows(w, torch.eye(70) * 3, Q.INT6_MAX, K, block_size=16, damp=0.01)
    rounded = Q._quantize_rows(w, Q.INT6_MAX, K)
    assert torch.equal(gptq[0], rounded[0]) and torch.equal(gptq[1], rounded[1])


def test_gptq_block_size_only_reorders_the_arithmetic():
    w, h = correlated(16, 90, seed=3)
    one, lazy = (Q.gptq_quantize_rows(w, h, Q.INT6_MAX, 4.0, block_size=b, damp=0.01) for b in (1, 37))
    assert torch.equal(one[1], lazy[1]) and (one[0] != lazy[0]).float().mean() < 0.01


def test_gptq_through_the_state_dict_and_its_errors(sample):
    sd, plan = sample
    w, h = correlated(16, 40, seed=4)
    sd = {**sd, "mlp.w": w}
    qsd = Q.quantize_state_dict(sd, plan, ks(plan), hessians={"mlp.w": h}, gptq_block=8)
    plain = Q.quantize_state_dict(sd, plan, ks(plan))
    assert out_err(qsd["mlp.w"]["q"], qsd["mlp.w"]["scale"], w, h).sum() < out_err(plain["mlp.w"]["q"], plain["mlp.w"]["scale"], w, h).sum()
    assert all(torch.equal(qsd[n]["q"], plain[n]["q"]) for n in ("embed", "tiny", "wide"))
    back = Q.dequantize_state_dict(Q.unpack(Q.pack(qsd)))
    assert torch.equal(back["mlp.w"], qsd["mlp.w"]["q"].float() * qsd["mlp.w"]["scale"].float()[:, None])
    with pytest.raises(ValueError, match=r"mlp.w: Hessian of shape \[39, 39\] for a weight of shape \[16, 40\]"):
        Q.quantize_state_dict(sd, plan, ks(plan), hessians={"mlp.w": h[:39, :39]})
    with pytest.raises(ValueError, match=r"mlp.w: the Hessian damped by 0.01 of its mean diagonal is not positive definite"):
        Q.quantize_state_dict(sd, plan, ks(plan), hessians={"mlp.w": torch.full_like(h, math.nan)})
