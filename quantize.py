"""Weight quantization and artifact format for ConvGPT-v2 (pure functions, no I/O).

The trainer writes ``pack(quantize_state_dict(sd, plan, clip_k, hessians))`` (hessians: GPTQ's E[x x^T] per
weight, optional) and restores with ``dequantize_state_dict(unpack(blob))``; ``fake_quant_int6`` is the matching
straight-through fake quantizer for quantization-aware training.
plan[name]: "int6"/"int8" = per-row (dim 0) symmetric quantization of a 2-D tensor to int8 values in
[-31, 31]/[-127, 127] plus one fp16 scale per row; "fp16"/"fp32" = plain cast. clip_k[name] (every int6/int8
tensor): the row's clip in multiples of its root mean square, so the step is clip_k * rms(row) / qmax (row_step).
A clip far beyond the row's max (12.85 rms against ~3.3 for a Gaussian row of 512) is a coarse grid, and a coarse
grid's codes have low entropy: ~3.4 bits per Gaussian weight after zstd against ~5.4 with the clip at the row's
max (bench/compressors.py). The rms, not the standard deviation: the grid is centred on zero, so a row of one
constant keeps its value, and only a zero row has a zero clip (it comes back exactly zero). qsd: {name: {"kind",
"shape": list[int], "dtype": "float32" | "float16" | "bfloat16" (restored on dequantize), "q": int8 [rows, cols],
"scale": fp16 [rows]}}, with "data" (fp16/fp32, original shape) instead of q/scale for casts.

Byte layout (FORMAT_VERSION 3): bytes 0-2 b"CGQ", byte 3 the version, then one zstd frame (level 22, content
size and checksum recorded) holding: payload | H bytes of UTF-8 JSON | uint32 LE H. JSON (keys sorted):
{"tensors": [{"name", "kind", "shape", "dtype", "parts": {part: [offset, length]}}]} in name order; parts "q"
(int8) + "scale" (fp16 LE) or "data" (fp16/fp32 LE) tile the payload contiguously from offset 0: first every "q"
part in entry order, then every other part in entry order. Version 2 put the header first, and zstd-22's
statistics primed on the JSON cost ~10% of the coarse grid's frame; version 1 interleaved q and fp16 parts per
tensor (tests/test_quantize.py measures both).

Invariants:
  - pack is deterministic; unpack(pack(qsd)) dequantizes bit-identically to qsd.
  - every q is round(w / step) clamped to [-qmax, qmax], step = row_step(w, clip_k, qmax): within half a step of
    w where |w| <= clip; zero rows come back exactly zero; fp32 passthrough is bit-exact, fp16 equals t.half().
  - fake_quant_int6(w, k) forward equals the int6 round trip of w at clip k, also when compiled.
  - GPTQ (hessians given): per row, output_error is at most round-to-nearest's on the calibration inputs.
  - unpack raises ValueError on a foreign, truncated, corrupt or other-version blob.

Tests: python -m pytest -q tests/test_quantize.py
"""
import json
import math
import struct
from typing import Mapping, Sequence

import numpy as np
import torch
import zstandard

FORMAT_VERSION = 3  # bump when the byte layout changes
MAGIC = b"CGQ"  # ConvGPT Quantized; followed by one FORMAT_VERSION byte
INT6_MAX = 31  # symmetric int6 levels: [-31, 31], 63 values
INT8_MAX = 127  # symmetric int8 levels: [-127, 127], 255 values
QMAX = {"int6": INT6_MAX, "int8": INT8_MAX}
PASSTHROUGH = {"fp16": torch.float16, "fp32": torch.float32}
ZSTD_LEVEL = 22  # zstd's maximum level: artifact bytes matter more than pack time
MAX_BODY = 1 << 31  # bytes; refuse frames that declare a larger decompressed size
FP16 = torch.finfo(torch.float16)  # scales are stored as fp16: keep them in [tiny, max]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORAGE = {torch.int8: np.dtype("i1"), torch.float16: np.dtype("<f2"), torch.float32: np.dtype("<f4")}


def row_step(w: torch.Tensor, clip_k: float, qmax: int) -> torch.Tensor:
    """Per-row step clip_k * rms(row) / qmax of a 2-D float tensor, [rows, 1], rounded to the nearest fp16 normal
    (rounding error < 2**-11 relative; zero rows get the smallest, so they stay exact), as fp32; via frexp/ldexp
    because torch.compile elides .half().float()."""
    rms = w.square().mean(dim=1, keepdim=True).sqrt()
    significand, exponent = torch.frexp((clip_k * rms / qmax).clamp(FP16.tiny, FP16.max))
    return torch.ldexp(torch.round(significand * 2**11) / 2**11, exponent)


def fake_quant_int6(w: torch.Tensor, clip_k: float) -> torch.Tensor:
    """Per-row int6 fake quantization of a 2-D weight at clip clip_k (row_step) with a straight-through gradient."""
    wf = w.detach().float()
    step = row_step(wf, clip_k, INT6_MAX)
    deq = (torch.round(wf / step).clamp(-INT6_MAX, INT6_MAX) * step).to(w.dtype)
    return deq + (w - w.detach())


def _quantize_rows(w: torch.Tensor, qmax: int, clip_k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric round-to-nearest: (q int8, step fp16)."""
    step = row_step(w, clip_k, qmax)
    return torch.round(w / step).clamp(-qmax, qmax).to(torch.int8), step.flatten().half()


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row squared output error delta_r H delta_r^T of a weight error on inputs with H = E[x x^T]."""
    return ((delta @ hessian) * delta).sum(-1)


def _gptq_levels(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, qmax: int, block_size: int) -> torch.Tensor:
    """GPTQ's column sweep (Frantar et al. 2022, Algorithm 1, lazy block updates): w [..., rows, cols] in the
    Hessian's column order, scale [..., rows], u the upper Cholesky factor of the damped inverse Hessian."""
    w, q = w.clone(), torch.zeros_like(w)
    cols = w.shape[-1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        err = torch.zeros_like(w[..., i1:i2])
        for i in range(i1, i2):
            q[..., i] = torch.round(w[..., i] / scale).clamp(-qmax, qmax)
            err[..., i - i1] = (w[..., i] - q[..., i] * scale) / u[i, i]
            w[..., i:i2] -= err[..., i - i1, None] * u[i, i:i2]
        w[..., i2:] -= err @ u[i1:i2, i2:]
    return q


def gptq_quantize_rows(w: torch.Tensor, hessian: torch.Tensor, qmax: int, clip_k: float,
                       block_size: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of w [rows, cols] on row_step's grid by GPTQ with H = E[x x^T] [cols, cols]
    of its inputs, columns in descending order of H's diagonal; damp is the fraction of H's mean diagonal added to
    it. Per row, the one of GPTQ and round-to-nearest with the smaller output_error wins, so no row is worse on the
    calibration inputs than plain rounding. Returns _quantize_rows' (q int8, step fp16)."""
    h = hessian.float().clone()
    dead = h.diagonal() <= 0  # inputs that were always zero: plain rounding, no error feedback
    h[dead, :], h[:, dead] = 0, 0
    h.diagonal()[dead] = 1
    damped = h + damp * h.diagonal().mean() * torch.eye(len(h), device=h.device)
    order = torch.argsort(damped.diagonal(), descending=True)
    try:
        chol = torch.linalg.cholesky(damped[order][:, order].double())
        u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()
    except torch.linalg.LinAlgError:
        raise ValueError(f"the Hessian damped by {damp} of its mean diagonal is not positive definite; raise the "
                         f"damping") from None
    step = row_step(w, clip_k, qmax).flatten()
    gptq = _gptq_levels(w[:, order], u, step, qmax, block_size)[:, torch.argsort(order)]
    levels = torch.stack((gptq, torch.round(w / step[:, None]).clamp(-qmax, qmax)))
    best = output_error(levels * step[:, None] - w, h).argmin(0)
    rows = torch.arange(len(w), device=w.device)
    return levels[best, rows].to(torch.int8).cpu(), step.half().cpu()


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor], plan: Mapping[str, str], clip_k: Mapping[str, float],
    hessians: Mapping[str, torch.Tensor] | None = None, gptq_block: int = 128, gptq_damp: float = 0.01,
) -> dict:
    """Quantize every tensor as plan[name] says ("int6", "int8", "fp16" or "fp32"), an int6/int8 one at clip
    clip_k[name] (> 0); one with an entry in hessians (E[x x^T] of its inputs, on any device; GPTQ runs there)
    by GPTQ."""
    hessians = hessians or {}
    qsd = {}
    for name, t in state_dict.items():
        kind, dtype, t = plan.get(name), str(t.dtype).removeprefix("torch."), t.detach().cpu()
        if dtype not in DTYPES:
            raise ValueError(f"{name}: unsupported dtype {dtype}")
        entry = {"kind": kind, "shape": list(t.shape), "dtype": dtype}
        if kind in QMAX:
            k, h = clip_k.get(name), hessians.get(name)
            if t.dim() != 2:
                raise ValueError(f"{name}: {kind} needs a 2-D tensor, got shape {list(t.shape)}")
            if not (isinstance(k, (int, float)) and 0 < k < math.inf):
                raise ValueError(f"{name}: the clip k must be a finite number > 0, got {k!r}")
            if h is None:
                entry["q"], entry["scale"] = _quantize_rows(t.float(), QMAX[kind], k)
            elif tuple(h.shape) != (t.shape[1],) * 2:
                raise ValueError(f"{name}: Hessian of shape {list(h.shape)} for a weight of shape {list(t.shape)}")
            else:
                try:
                    entry["q"], entry["scale"] = gptq_quantize_rows(t.float().to(h.device), h, QMAX[kind], k,
                                                                    gptq_block, gptq_damp)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        elif kind in PASSTHROUGH:
            entry["data"] = t.to(PASSTHROUGH[kind], copy=True)
        else:
            raise ValueError(f"{name}: plan must be int6, int8, fp16 or fp32, got {kind!r}")
        qsd[name] = entry
    return qsd


def dequantize_state_dict(qsd: Mapping) -> dict[str, torch.Tensor]:
    """Rebuild name -> tensor in the original dtype and shape."""
    out = {}
    for name, e in qsd.items():
        t = e["q"].float() * e["scale"].float()[:, None] if e["kind"] in QMAX else e["data"]
        out[name] = t.to(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def _payload_order(parts: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
    """(entry index, part) in payload order: every "q" part first, then the others, each in entry order."""
    indexed = [(i, part) for i, names in enumerate(parts) for part in names]
    return [x for x in indexed if x[1] == "q"] + [x for x in indexed if x[1] != "q"]


def pack(qsd: Mapping) -> bytes:
    """Serialize a qsd to the versioned, zstd-compressed artifact described above."""
    entries, raws = [], []
    for name in sorted(qsd):
        e = qsd[name]
        tensors = {part: e[part].contiguous() for part in (("q", "scale") if e["kind"] in QMAX else ("data",))}
        raws.append({part: t.numpy().astype(STORAGE[t.dtype], copy=False).tobytes() for part, t in tensors.items()})
        entries.append({"name": name, "kind": e["kind"], "shape": list(e["shape"]), "dtype": e["dtype"], "parts": {}})
    chunks, offset = [], 0
    for i, part in _payload_order(raws):
        raw = raws[i][part]
        entries[i]["parts"][part], offset = [offset, len(raw)], offset + len(raw)
        chunks.append(raw)
    header = json.dumps({"tensors": entries}, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join(chunks) + header + struct.pack("<I", len(header))
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, threads=0).compress(body)
    return MAGIC + bytes([FORMAT_VERSION]) + frame


def _corrupt(why: str) -> ValueError:
    return ValueError(f"artifact is truncated or corrupt: {why}")


def _entry_spec(e: dict) -> dict[str, tuple[torch.dtype, list[int]]]:
    """{part: (dtype, shape)} that a header entry must hold, after checking its kind, shape and dtype."""
    kind, shape, dtype = e["kind"], e["shape"], e["dtype"]
    if dtype not in DTYPES or not all(type(n) is int and n >= 0 for n in shape):
        raise _corrupt(f"bad dtype or shape for {e['name']!r}")
    if kind in QMAX and len(shape) == 2:
        spec = {"q": (torch.int8, shape), "scale": (torch.float16, shape[:1])}
    elif kind in PASSTHROUGH:
        spec = {"data": (PASSTHROUGH[kind], shape)}
    else:
        raise _corrupt(f"bad kind {kind!r} for {e['name']!r}")
    if sorted(e["parts"]) != sorted(spec):
        raise _corrupt(f"bad parts for {e['name']!r}")
    return spec


def _read_payload(tensors: list[dict], payload: bytes) -> dict:
    """Decode the header entries, whose parts must tile the payload in _payload_order."""
    specs = [_entry_spec(e) for e in tensors]
    qsd = {}
    for e in tensors:
        if e["name"] in qsd:
            raise _corrupt(f"duplicate tensor {e['name']!r}")
        qsd[e["name"]] = {"kind": e["kind"], "shape": e["shape"], "dtype": e["dtype"]}
    cursor = 0
    for i, part in _payload_order(specs):
        e, (tdtype, pshape) = tensors[i], specs[i][part]
        np_dtype, count = STORAGE[tdtype], math.prod(pshape)
        nbytes = count * np_dtype.itemsize
        if e["parts"][part] != [cursor, nbytes] or cursor + nbytes > len(payload):
            raise _corrupt(f"{e['name']!r}.{part} does not match the payload")
        arr = np.frombuffer(payload, np_dtype, count, cursor).astype(np_dtype.newbyteorder("="))
        qsd[e["name"]][part], cursor = torch.from_numpy(arr).reshape(pshape), cursor + nbytes
    if cursor != len(payload):
        raise _corrupt(f"{len(payload) - cursor} unaccounted payload bytes")
    return qsd


def unpack(blob: bytes) -> dict:
    """Inverse of pack; raises ValueError for anything but an intact artifact of this version."""
    magic, version, frame = bytes(blob[: len(MAGIC)]), blob[len(MAGIC) : len(MAGIC) + 1], blob[len(MAGIC) + 1 :]
    if not version:
        raise _corrupt(f"only {len(blob)} bytes")
    if magic != MAGIC:
        raise ValueError(f"not a ConvGPT quantized artifact: magic {magic!r} != {MAGIC!r}")
    if version[0] != FORMAT_VERSION:
        raise ValueError(f"unsupported artifact format version {version[0]} (this code reads {FORMAT_VERSION})")
    try:
        size = zstandard.frame_content_size(frame)
        if not 0 <= size <= MAX_BODY:
            raise _corrupt(f"zstd frame declares {size} bytes")
        body = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as err:
        raise _corrupt(f"zstd: {err}") from None
    try:
        (hlen,) = struct.unpack_from("<I", body, max(0, len(body) - 4))
        if hlen + 4 > len(body):
            raise _corrupt("header length exceeds the data")
        header, payload = json.loads(body[len(body) - 4 - hlen : -4]), body[: len(body) - 4 - hlen]
        return _read_payload(header["tensors"], payload)
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as err:
        raise _corrupt(f"bad header ({type(err).__name__}: {err})") from None
