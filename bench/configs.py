"""Named configurations and scales for bench/ablate.py, bench/cost_model.py and bench/gpu_preflight.py.

A configuration is the settings it changes from the defaults; a scale is the base settings it runs on. One
module that the three import (no import cycle between them).
"""

from __future__ import annotations

from train_gpt import Hyperparameters

CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "conv1d_only": {"MEM_EVERY": "0", "CONV2D_K": "0"},
    "conv1d_2d": {"MEM_EVERY": "0"},
    "dense": {"MEM_EVERY": "1", "MEM_TOPK": "1000000"},  # same parameters: a memory block's mixer is 3d^2 like ConvMix
    **{f"topk{k}": {"MEM_TOPK": str(k)} for k in (1, 2, 4, 8)},
    **{f"chunk{c}": {"MEM_CHUNK": str(c)} for c in (32, 64, 128)},
    **{f"rope_{r}": {"MEM_ROPE": r} for r in ("all", "half", "none")},
    "relu2": {"MLP_ACT": "relu2"},
    "qat_late": {"QAT_START_FRAC": "0.7"},
    "no_qat": {"QAT": "0"},
    **{f"clip_k{k}": {"MATRIX_CLIP_K": k} for k in ("8", "10", "16")},  # the int6 grid of block matrices (default 12.85)
    "muon_wd_009": {"MUON_WEIGHT_DECAY": "0.09"},  # the records' 0.085-0.095, "so that weights compress well"
    "shape_9x3": {},  # the default before issue 33 (9 layers, MLP 3x at golf); each scale's share in SHAPES
    "gptq": {"GPTQ": "1"},
    "embed_fp16": {"EMBED_QUANT": "fp16"},
    "no_muon_wd": {"MUON_WEIGHT_DECAY": "0"},
    "ema_0999": {"EMA_DECAY": "0.999"},
    "no_bigram": {"BIGRAM_BUCKETS": "0"},
    "body_fp32": {"BODY_DTYPE": "fp32"},  # the residual stream fp32 on CUDA; on CPU only with --cuda-rules
    "dilated": {"CONV2D_LAYOUT": "dilated"},  # the 2D branch's taps as a plain dilated 1D conv: does Hilbert earn its place?
    "train_seq_x2": {},  # TRAIN_SEQ_LEN and EVAL_SEQ_LEN at twice the scale's TRAIN_SEQ_LEN (golf: 2048)
    "eval_seq_x2": {},  # EVAL_SEQ_LEN at twice the scale's TRAIN_SEQ_LEN
    "ttt": {"TTT_EPOCHS": "1"},  # the trainer's default TTT, which the proxy and tiny scales turn off
    "sequential": {"PARALLEL_FROM": "0"},  # no parallel residuals (the default has them in the last 2 blocks)
    "parallel3": {"PARALLEL_FROM": "-3"},  # parallel residuals in the last 3 blocks
}
VAL_SLICE_TOKENS = {"proxy": 131_072}  # validation targets the scale scores: the first N + 1 tokens of the val shards
SHAPES = {  # a configuration whose model differs by scale; golf's is what --equal-time predicts
    "shape_9x3": {"golf": {"NUM_LAYERS": "9", "MLP_MULT": "3"}, "proxy": {"NUM_LAYERS": "5", "MLP_MULT": "3"},
                  "tiny": {"NUM_LAYERS": "3", "MLP_MULT": "3"}},
}
NO_TTT = {"TTT_EPOCHS": "0"}  # CPU scales compare training at the sliding window (LoRA TTT is ~4x its time on CPU);
# TTT's own comparison: bench/results/ttt_proxy_cpu.md, configuration "ttt"
SEQ_DOUBLED = {"train_seq_x2": ("TRAIN_SEQ_LEN", "EVAL_SEQ_LEN"), "eval_seq_x2": ("EVAL_SEQ_LEN",)}
SCALES: dict[str, dict[str, str]] = {
    "golf": {},  # the trainer's defaults: d = 512, 12 layers, MLP 4x, seq 1024
    # golf sequence geometry (seq 1024, 16 chunks of 64, top-4), narrow and shallow: 7 layers, MLP 4x, the default's
    # shape scaled as its depth went 9 -> 12 (until 2026-12-06: 5 layers, MLP 3x, now config shape_9x3); two runs at
    # once on 2 cores took 7.4 s/step each at 7 layers (2.9-3.1 at 5), ~40 min a pair of 300-step runs with
    # evaluation; 8 sequences per step is the least
    # at seq 1024 (8 micro-batches of one sequence); sliding stride 256 (golf 64) keeps evaluation at a quarter of
    # the cost with >= 768 tokens of context per target
    "proxy": {"NUM_LAYERS": "7", "MODEL_DIM": "128", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "1024",
              "EVAL_SEQ_LEN": "1024", "EVAL_STRIDE": "256", "TRAIN_BATCH_TOKENS": "8192", "MEM_CHUNK": "64",
              "MEM_TOPK": "4", "ITERATIONS": "300", "WARMDOWN_ITERS": "180", "WARMUP_STEPS": "2",
              "TRAIN_LOG_EVERY": "25", "VAL_LOSS_EVERY": "75", "VAL_BATCH_SIZE": "65536", **NO_TTT},
    "tiny": {"NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "256",
             "TRAIN_BATCH_TOKENS": "8192", "MEM_CHUNK": "32", "ITERATIONS": "100000", "WARMDOWN_ITERS": "60",
             "WARMUP_STEPS": "2", "TRAIN_LOG_EVERY": "50", "VAL_LOSS_EVERY": "0", "VAL_BATCH_SIZE": "65536", **NO_TTT},
}


def config_env(name: str, scale: str) -> dict[str, str]:
    """A configuration's settings at a scale (the doubled sequence lengths depend on the scale's)."""
    seq = 2 * int(SCALES[scale].get("TRAIN_SEQ_LEN", Hyperparameters.train_seq_len))
    return {**CONFIGS[name], **SHAPES.get(name, {}).get(scale, {}), **{key: str(seq) for key in SEQ_DOUBLED.get(name, ())}}


