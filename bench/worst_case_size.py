"""Artifact bytes of a configuration in the worst case for int6 + zstd: every quantized matrix Gaussian.

Runbook
  python bench/worst_case_size.py                          # the trainer's defaults
  PRESET=sp8192 python bench/worst_case_size.py            # any setting, from the environment as the trainer reads it
  NUM_LAYERS=10 python bench/worst_case_size.py --json     # one JSON object

What it measures
  * The model is built from Hyperparameters; every tensor the artifact stores as int6 or int8 (block matrices,
    BigramHash, the embedding) is refilled with N(0, 1/cols), the most incompressible weights a row-scaled int
    code sees. Trained weights compress better: this is the upper bound a configuration must fit under.
  * The real export path runs (quant_plan, clip search, pack), and the counted code is added, so bytes_total
    is what export_artifact would check against the 16,000,000-byte cap.
  * bytes_code_packed and bytes_total_packed are the same with the code packed by tools/pack_code.py (minified,
    lzma, one file): what a record run from the packed file counts. headroom is the plain files' (the bound).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from quantize import QMAX, pack, quantize_state_dict  # noqa: E402
from tools import pack_code  # noqa: E402


def worst_case_bytes(args: tg.Hyperparameters, seed: int = 0) -> dict[str, int]:
    """params, bytes_model, bytes_code, bytes_total and headroom (to the cap) of args' Gaussian-weight artifact,
    and the code and total bytes when the code is packed."""
    torch.manual_seed(seed)
    model = tg.ConvGPT(args)
    plan, clip_k = tg.quant_plan(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if plan[name] in QMAX:
                p.normal_(0, p.shape[1] ** -0.5)
    model_bytes = len(pack(quantize_state_dict(model.state_dict(), plan, clip_k)))
    total = model_bytes + tg.code_bytes()
    packed = len(pack_code.pack(pack_code.sources(ROOT)).encode(pack_code.ENCODING))
    return {"params": sum(p.numel() for p in model.parameters()), "bytes_model": model_bytes,
            "bytes_code": tg.code_bytes(), "bytes_total": total, "headroom": tg.ARTIFACT_LIMIT_BYTES - total,
            "bytes_code_packed": packed, "bytes_total_packed": model_bytes + packed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    cli = parser.parse_args()
    try:
        args = tg.Hyperparameters.from_env()
    except tg.FatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = worst_case_bytes(args)
    print(json.dumps(size) if cli.json else " ".join(f"{k}:{v}" for k, v in size.items()))
    return 0 if size["headroom"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
