"""Artifact bytes of a configuration in the worst case for int6 + zstd: every quantized matrix Gaussian.

Runbook
  python bench/worst_case_size.py                          # the trainer's defaults
  PRESET=sp8192 python bench/worst_case_size.py            # any setting, from the environment as the trainer reads it
  NUM_LAYERS=10 python bench/worst_case_size.py --json     # one JSON object

What it measures
  * The model is built from Hyperparameters; every tensor the artifact stores as int6 or int8 (block matrices,
    BigramHash, the embedding) is refilled with Gaussian rows, each at its own log-normal scale, and every other
    parameter (the fp16 control tensors) with N(0, 1); the real export path runs (quant_plan, each row on its
    clip_k * rms grid, pack); the counted code is added, so bytes_total is what export_artifact would check against
    the 16,000,000-byte cap. Left at their init values (ones, zeros, one scale for every row), the control tensors
    and steps compress to almost nothing, and a trained proxy artifact came out 0.4% over that "worst case"
    (531,362 against 529,478 bytes).
  * Why Gaussian is the bound: each row's step is a fixed multiple of its rms, so a row's codes are its values in
    units of its rms, rounded. Among distributions of a given variance the Gaussian has the largest differential
    entropy, so its rounded codes have (to within the rounding) the largest entropy, which is what zstd's entropy
    coder approaches. Trained rows are heavier-tailed (more mass near zero at the same rms): fewer bytes.
    tests/test_bench.py holds the bound against Laplace, Student-t, uniform and mixed-scale rows.
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


def gaussian_state(args: tg.Hyperparameters, seed: int = 0) -> tuple[dict, dict[str, str], dict[str, float]]:
    """(state dict, plan, clip_k) of args' model with every int6/int8 row refilled with N(0, s^2 / cols), s log-normal
    per row (so the fp16 steps vary as trained ones do), and every other parameter with N(0, 1)."""
    torch.manual_seed(seed)
    model = tg.ConvGPT(args)
    plan, clip_k = tg.quant_plan(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if plan[name] in QMAX:
                p.normal_(0, p.shape[1] ** -0.5).mul_(torch.randn(p.shape[0], 1).exp())
            else:
                p.normal_()
    return model.state_dict(), plan, clip_k


def worst_case_bytes(args: tg.Hyperparameters, seed: int = 0) -> dict[str, int]:
    """params, bytes_model, bytes_code, bytes_total and headroom (to the cap) of args' Gaussian-weight artifact,
    and the code and total bytes when the code is packed."""
    state, plan, clip_k = gaussian_state(args, seed)
    model_bytes = len(pack(quantize_state_dict(state, plan, clip_k)))
    total = model_bytes + tg.code_bytes()
    packed = len(pack_code.pack(pack_code.sources(ROOT)).encode(pack_code.ENCODING))
    return {"params": sum(t.numel() for t in state.values()), "bytes_model": model_bytes,
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
