"""train_gpt.py on CPU under a GPU run's dtype rules: CUDA bf16 autocast (emulated, tools/cuda_autocast.py) and
the residual stream that build_model gives a CUDA device (train_gpt.body_dtype).

  python tools/cuda_rules.py                       # the same environment and outputs as `python train_gpt.py`
  python bench/ablate.py --cuda-rules ...          # every ablation run through it

On CPU the trainer otherwise runs fp32 throughout, so a switch that only matters in bf16 (BODY_DTYPE) shows no
effect there. This is slow (every torch call passes a Python dtype check), but the numbers are the GPU's dtypes.
Nothing changes on a machine with CUDA: the trainer's own rules already apply.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from tools.cuda_autocast import emulate_cuda_autocast  # noqa: E402


def apply() -> None:
    """Patch train_gpt's two device rules to the CUDA ones (on CPU; with CUDA they apply already), and log which
    (bench/ablate.py --resume reuses a log only with its cuda_rules: line)."""
    real_body_dtype, real_logger = train_gpt.body_dtype, train_gpt.make_logger
    native = torch.cuda.is_available()

    def make_logger(args: train_gpt.Hyperparameters, d: train_gpt.Dist):
        log = real_logger(args, d)
        log("cuda_rules:native (CUDA present)" if native
            else "cuda_rules:emulated autocast:cuda_bf16 body_dtype:as_on_cuda")
        return log
    train_gpt.make_logger = make_logger
    if not native:
        train_gpt.autocast = lambda device: emulate_cuda_autocast()
        train_gpt.body_dtype = lambda args, device: real_body_dtype(args, torch.device("cuda"))


if __name__ == "__main__":
    apply()
    train_gpt.main()
