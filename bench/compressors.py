"""Artifact bytes under other compressors, body layouts and transforms of the int codes: is zstd-22 the right choice?

Runbook
  python bench/compressors.py --artifact final_model.int6.ptz            # a trained artifact
  NUM_LAYERS=5 MODEL_DIM=128 python bench/compressors.py --gaussian      # the worst case of a configuration
  python bench/compressors.py --gaussian --artifact A.ptz --json         # both, one JSON object per row
  python bench/compressors.py --gaussian --compressors zstd,brotli       # a subset (lzma is the standard library's)

What it measures
  * The body of quantize.pack (payload | JSON header | uint32 length, FORMAT_VERSION 3) is rebuilt from the
    artifact, or from the Gaussian worst case of the configuration the environment gives (bench/worst_case_size.py),
    in each layout and transform, and compressed by each compressor. Rows give the compressed bytes, bits per
    quantized weight, and the change against the artifact as packed (zstd-22, header last, codes as stored).
  * Layouts: header_last (today's), header_first (FORMAT_VERSION 2's). Transforms of every int code part: none,
    offset (q + qmax as unsigned bytes), transposed (each matrix column-major: codes of one input feature together).
  * Compressors: zstd level 22 (the artifact's), brotli quality 11 with a 16 MiB window (PyPI brotli), lzma
    preset 9 extreme (xz, the standard library).
The decision rule (issue 33): zstd stays unless another wins by at least 1% on both Gaussian and trained weights.
"""

from __future__ import annotations

import argparse
import json
import lzma
import struct
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import quantize as Q  # noqa: E402
import train_gpt as tg  # noqa: E402
from bench.worst_case_size import gaussian_state  # noqa: E402

BROTLI_QUALITY, BROTLI_LGWIN = 11, 24  # brotli's maximum quality, a 16 MiB window (its largest standard one)
LZMA_PRESET = 9 | lzma.PRESET_EXTREME


def _brotli(data: bytes) -> bytes:
    import brotli  # optional: only this benchmark uses it (requirements.txt)

    return brotli.compress(data, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": lambda data: zstandard.ZstdCompressor(level=Q.ZSTD_LEVEL, write_checksum=True).compress(data),
    "brotli": _brotli,
    "lzma": lambda data: lzma.compress(data, preset=LZMA_PRESET),
}
LAYOUTS = ("header_last", "header_first")
TRANSFORMS = ("none", "offset", "transposed")


def split_body(blob: bytes) -> tuple[dict, bytes, bytes]:
    """(parsed header, header bytes, payload) of a FORMAT_VERSION 3 artifact."""
    Q.unpack(blob)  # refuses anything but an intact artifact of this version
    body = zstandard.ZstdDecompressor().decompress(blob[len(Q.MAGIC) + 1 :])
    (hlen,) = struct.unpack_from("<I", body, len(body) - 4)
    header = body[len(body) - 4 - hlen : -4]
    return json.loads(header), header, body[: len(body) - 4 - hlen]


def transform(header: dict, payload: bytes, how: str) -> bytes:
    """The payload with every int code part rewritten as `how` says (same length)."""
    if how == "none":
        return payload
    out = bytearray(payload)
    for t in header["tensors"]:
        if "q" not in t["parts"]:
            continue
        offset, length = t["parts"]["q"]
        q = np.frombuffer(payload, np.int8, length, offset).reshape(t["shape"])
        new = (q.astype(np.int16) + Q.QMAX[t["kind"]]).astype(np.uint8) if how == "offset" else np.ascontiguousarray(q.T)
        out[offset : offset + length] = new.tobytes()
    return bytes(out)


def measure(blob: bytes, source: str, names: list[str]) -> list[dict]:
    """One row per (layout, transform, compressor) for one artifact."""
    header, raw_header, payload = split_body(blob)
    weights = sum(int(np.prod(t["shape"])) for t in header["tensors"] if "q" in t["parts"])
    rows = []
    for layout in LAYOUTS:
        for how in TRANSFORMS:
            body = transform(header, payload, how)
            length = struct.pack("<I", len(raw_header))
            body = body + raw_header + length if layout == "header_last" else length + raw_header + body
            for name in names:
                size = len(Q.MAGIC) + 1 + len(COMPRESSORS[name](body))
                rows.append({"source": source, "layout": layout, "transform": how, "compressor": name, "bytes": size,
                             "bits_per_weight": 8 * size / weights, "vs_artifact": size / len(blob) - 1})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", action="append", default=[], help="a FORMAT_VERSION 3 artifact (repeatable)")
    parser.add_argument("--gaussian", action="store_true", help="the worst case of the configuration in the environment")
    parser.add_argument("--compressors", default=",".join(COMPRESSORS))
    parser.add_argument("--json", action="store_true")
    cli = parser.parse_args(argv)
    names = cli.compressors.split(",")
    unknown = [n for n in names if n not in COMPRESSORS]
    try:
        if unknown:
            raise ValueError(f"unknown compressor {unknown[0]!r}; choose from {','.join(COMPRESSORS)}")
        if "brotli" in names:
            _brotli(b"")
        if not (cli.artifact or cli.gaussian):
            raise ValueError("nothing to measure: give --artifact PATH and/or --gaussian")
        sources = [(path, Path(path).read_bytes()) for path in cli.artifact]
        if cli.gaussian:
            sources.append(("gaussian", Q.pack(Q.quantize_state_dict(*gaussian_state(tg.Hyperparameters.from_env())))))
        rows = [row for source, blob in sources for row in measure(blob, source, names)]
    except ImportError:
        print("error: brotli is not installed (pip install brotli, or --compressors zstd,lzma)", file=sys.stderr)
        return 2
    except (OSError, ValueError, tg.FatalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row) if cli.json else f"{row['source']} {row['layout']:12} {row['transform']:10} "
              f"{row['compressor']:6} bytes:{row['bytes']} bits_per_weight:{row['bits_per_weight']:.4f} "
              f"vs_artifact:{100 * row['vs_artifact']:+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
