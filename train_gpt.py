"""ConvGPT-v2 parameter-golf trainer: train <= 600 s, export int6+zstd under 16,000,000 bytes, report val_bpb.

Commands
  8xH100 run:      torchrun --standalone --nproc_per_node=8 train_gpt.py
  one process:     python train_gpt.py             (CPU or one GPU; same global batch by accumulation)
  sweep:           NUM_LAYERS=11 MEM_TOPK=8 torchrun --standalone --nproc_per_node=8 train_gpt.py
  GPTQ export:     GPTQ=1 torchrun ...          (training stops GPTQ_RESERVE_SECONDS early; calibration fits in them)
  vocab 8192:      PRESET=sp8192 torchrun ...   (data/cached_challenge_fineweb.py --variant sp8192 first)
  re-evaluate:     EVAL_ONLY=1 ARTIFACT_PATH=final_model.int6.ptz python train_gpt.py   (the run's evaluation, TTT too)
  without TTT:     TTT_EPOCHS=0 ...                 (the sliding window is then the headline)
  CPU smoke run:   bash run.sh                      (synthetic sample, not FineWeb)

Settings are environment variables named after the Hyperparameters fields in upper case; every resolved
value is logged at start, and a name one typo away from a setting gets a warning. Rank 0 logs key:value
lines to stdout and logs/<RUN_ID>.txt: `artifact bytes_model:A bytes_code:B bytes_total:C limit:16000000`, then
final_int6_zstd_roundtrip(_exact), final_sliding_window(_exact), ttt_adapted, final_ttt(_exact) (the headline;
TTT_EPOCHS > 0, the default) and final_eval_time (the whole final evaluation).

Invariants
  * Causal: logits at t depend on tokens <= t only (tests/test_model.py, in every mixer configuration).
  * val_bpb is the challenge's: every validation target is scored exactly once, bytes come from the pieces.
  * TTT scores every target before any update trains on it, and LoRA TTT's adapters never cross a document
    boundary (tests/test_eval.py perturbs unscored tokens).
  * The final evaluation fits MAX_EVAL_SECONDS (600, the rules'): a budget that cannot fit plain scoring at the
    pace measured at start is refused before training; TTT adapts only while every rank predicts the rest, scored
    without adapting, still fits (LoraGuard), and then scores the rest as it stands, every target once.
  * Any world size dividing 8 trains the same global batch (8 micro-batches per step in total); DDP averages the
    gradients once per step, overlapped with the last backward (tests/test_train.py: 2 processes = 1).
  * The artifact is written atomically, only from finite weights and only under the cap.
  * QAT trains on the export grid: each block matrix row's step is MATRIX_CLIP_K x its rms / 31 in the fake
    quantizer and in the artifact alike (tests/test_model.py: QAT logits = the round trip's).
  * GPTQ reads training data (its Hessians) after the loop, so the loop ends GPTQ_RESERVE_SECONDS before the cap
    and calibration + GPTQ must finish inside the reserve, or no artifact is written (CHALLENGE.md: training).
  * With the Triton kernels on, each runs once against its reference before training (one error line naming
    CONVGPT_TRITON=0 if not); on CUDA the training step compiles with fullgraph=True: a graph break fails at once.
  * Bad input: one "error: ..." line on stderr, exit code 2, nothing overwritten.
  * `import train_gpt` has no side effects.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import inspect
import itertools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from convgpt_ops import (CONV2D_LAYOUTS, MAX_SEQ_LEN, check_memory_sizes, chunk_memory_ref, chunk_memory_triton,
                         conv_taps, conv_taps_inverse, gated_gather_conv, gated_gather_conv_ref, memory_is_dense,
                         self_test_kernels, triton_enabled)
from quantize import QMAX, dequantize_state_dict, fake_quant_int6, output_error, pack, quantize_state_dict, unpack

# ----------------------------------------------------------------------------- config

BOS_ID = 1  # challenge shards and sp1024: pad/bos/eos/unk = 0/1/2/3, every document starts with BOS
ARTIFACT_LIMIT_BYTES = 16_000_000  # challenge cap, decimal bytes: compressed model + counted code
COUNTED_CODE = ("train_gpt.py", "convgpt_ops.py", "quantize.py")
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024  # 256 little-endian int32
GLOBAL_MICROBATCHES = 8  # a step is 8 micro-batches in total; each rank runs 8 / WORLD_SIZE of them
TIED_EMBED_INIT_STD = 0.005  # baseline train_gpt.py
QK_GAIN_INIT = 1.5  # baseline train_gpt.py
SMEAR_INIT = -2.0  # sigmoid(-2) = 0.12 of the previous token at init
LEAKY_SLOPE = 0.5  # LeakyReLU(0.5)^2, record of 2026-03-23
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz, Muon (Keller Jordan, modded-nanogpt)
NS_EPS = 1e-7
EMA_WARMUP = 10  # EMA decay ramps as (1 + step) / (EMA_WARMUP + step) up to EMA_DECAY
EVAL_MARGIN = 1.25  # LoRA TTT's guard: the rest's scoring time, predicted from the pace so far, times this (padded
# short windows of the last, shortest documents run at a worse pace per token than the long ones measured first)
EVAL_RESERVE = 0.02  # of MAX_EVAL_SECONDS kept free (12 s of 600) for the final all-reduces, the logs and jitter
PACE_REPEATS = 4  # scoring_pace's runs of one batch
DELETED_TTT_SETTINGS = ("TTT_MODE", "TTT_CHUNK_TOKENS", "TTT_LR", "TTT_MOMENTUM")  # lost to LoRA TTT (issue 34)
DOC_CHUNK = 128  # LoRA TTT's default chunk, tokens (the records' 48-64 cost more updates; the proxy measured 128)
UNMEASURED_COST = 4.0  # a LoRA step's seconds per token and epoch, in plain scoring's, until measured
SCHEDULE_CHECK_STEP = 5  # timed steps after which the run's length in steps is predicted (schedule_warning)
BIGRAM_HASH = (36313, 27191)  # (current, previous) token multipliers of the BigramHash record, 2026-03-20
BIGRAM_SCALE_INIT = 0.05  # BigramHash record
PRESETS = {  # PRESET=name sets these defaults together; a setting given in the environment still wins
    "sp8192": {"VOCAB_SIZE": "8192", "DATA_PATH": "./data/datasets/fineweb10B_sp8192",
               "TOKENIZER_PATH": "./data/tokenizers/fineweb_8192_bpe.model", "NUM_LAYERS": "10", "EMBED_CLIP_K": "20"},
    # the 8192 x 512 int8 embedding is 4.2M parameters (2.5 MB at k = 20, the records'): 10 layers fit the cap
}
CHOICES = {
    "preset": ("none", *PRESETS),
    "mlp_act": ("relu2", "leaky_relu2"),
    "mem_rope": ("all", "half", "none"),
    "body_dtype": ("bf16", "fp32"),
    "conv2d_layout": CONV2D_LAYOUTS,
    "embed_quant": ("int8", "int6", "fp16"),
    "compile": ("auto", "0", "1"),
}


class FatalError(Exception):
    """A failure reported as one line on stderr with exit code 2: bad settings, data, artifact, NaN loss."""


@dataclass(frozen=True)
class Hyperparameters:
    # run and files
    preset: str = "none"  # a named set of defaults (PRESETS), applied under the other settings
    run_id: str = "convgpt"
    seed: int = 1337
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    artifact_path: str = "final_model.int6.ptz"
    eval_only: bool = False
    # schedule (steps, tokens, seconds)
    iterations: int = 20000
    warmup_steps: int = 20  # compile warm-up steps; model, optimizer and loader are reset afterwards
    warmdown_iters: int = 1200  # linear LR decay to 0, in steps; converted to time once the cap binds
    max_wallclock_seconds: float = 600.0  # training time cap, warm-up and validation excluded; 0 = none
    train_batch_tokens: int = 524_288  # tokens per optimizer step, all ranks together
    train_seq_len: int = 1024
    val_loss_every: int = 1000  # steps; 0 = final evaluation only
    train_log_every: int = 200  # steps
    val_batch_size: int = 524_288  # tokens per evaluation forward, all 8 micro-batches together
    # model
    vocab_size: int = 1024
    num_layers: int = 12  # 12 x MLP 4x: 35.5M parameters, 15.57 MB in the worst case on the rms grid (issue 33)
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0  # MLP width = round(mlp_mult * model_dim)
    mlp_act: str = "leaky_relu2"
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    smear_gate: bool = True
    conv1d_k: int = 4  # causal 1D taps (0 = no 1D branch)
    conv2d_k: int = 3  # Hilbert grid window side, odd (0 = no 2D branch)
    conv2d_layout: str = "hilbert"  # dilated = control: the same k*k taps at 1D distances conv1d_k * (1..k*k)
    bigram_buckets: int = 2048  # BigramHash embedding of (previous, current) token pairs; 0 = off
    bigram_dim: int = 128
    mem_every: int = 2  # every mem_every-th block mixes with ChunkMemory instead of ConvMix (0 = never)
    mem_chunk: int = 64  # tokens per memory chunk
    mem_topk: int = 4  # earlier chunks each query reads; >= seq_len / mem_chunk is dense causal attention
    mem_rope: str = "all"  # memory layers with RoPE: all, half (1st, 3rd, ...) or none
    parallel_from: int = -2  # blocks from this one (from 1) on add mixer and MLP of one input; -k: the last k; 0 = off
    body_dtype: str = "bf16"  # residual stream where autocast is on (CUDA); the baseline's is rms_norm's dtype
    # optimizer (learning rates are peak values)
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6
    head_lr: float = 0.008
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_weight_decay: float = 0.04  # decoupled: p *= 1 - lr * wd per step
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0  # 0 = off
    # quantization-aware training, EMA, export
    qat: bool = True
    qat_start_frac: float = 0.0  # fraction of the run (steps or wallclock, whichever is further) before QAT
    ema_decay: float = 0.997
    embed_quant: str = "int8"
    matrix_clip_k: float = 12.85  # int6 clip of a block matrix row, in multiples of its rms (QAT and export)
    bigram_clip_k: float = 12.85  # the same for BigramHash's table and projection (int6, no QAT)
    embed_clip_k: float = 6.0  # the same for the tied embedding (no QAT), at EMBED_QUANT's int8 or int6
    gptq: bool = False  # GPTQ at export, Hessians from training batches, inside the cap (its time is reserved)
    gptq_calib_batches: int = 2  # training batches (TRAIN_BATCH_TOKENS each) whose block inputs give the Hessians
    gptq_block: int = 128  # columns per lazy GPTQ update
    gptq_damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    gptq_reserve_seconds: float = 15.0  # training stops this much before the cap; calibration + GPTQ must fit in it
    # evaluation
    eval_seq_len: int = 0  # 0 = TRAIN_SEQ_LEN
    eval_stride: int = 64
    max_eval_seconds: float = 600.0  # the final evaluation's wallclock (CHALLENGE.md); TTT adapts while the rest fits
    ttt_epochs: int = 1  # legal score-first LoRA TTT: Adam steps on each scored chunk of a document; 0 = off
    ttt_lora_rank: int = 8
    ttt_lora_lr: float = 0.01
    ttt_doc_chunk: int = 0  # tokens of a document scored between two adapter updates; 0 = min(128, EVAL_SEQ_LEN)
    # device
    compile: str = "auto"  # auto = on with CUDA

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def eval_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def doc_chunk(self) -> int:
        return self.ttt_doc_chunk or min(DOC_CHUNK, self.eval_len)

    @property
    def train_seconds(self) -> float:
        """The training loop's wallclock cap: MAX_WALLCLOCK_SECONDS less GPTQ's reserve; 0 = none."""
        return self.max_wallclock_seconds - self.gptq * self.gptq_reserve_seconds if self.max_wallclock_seconds > 0 else 0.0

    @property
    def first_parallel(self) -> int:
        """Index (from 0) of the first block with parallel residuals; NUM_LAYERS when none has them."""
        p = self.parallel_from
        return p - 1 if p > 0 else self.num_layers + p if p < 0 else self.num_layers

    @property
    def max_seq_len(self) -> int:
        return max(self.train_seq_len, self.eval_len)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Hyperparameters:
        env = os.environ if env is None else env
        env = {**PRESETS.get(env.get("PRESET", "none"), {}), **env}
        values = {f.name: parse_value(f.name.upper(), env[f.name.upper()], type(f.default))
                  for f in fields(cls) if f.name.upper() in env}
        args = cls(**values)
        args.validate()
        return args

    def validate(self) -> None:
        micro_tokens = GLOBAL_MICROBATCHES * self.train_seq_len
        checks = [
            (1 <= self.train_seq_len <= MAX_SEQ_LEN and 0 <= self.eval_seq_len <= MAX_SEQ_LEN,
             f"TRAIN_SEQ_LEN={self.train_seq_len} / EVAL_SEQ_LEN={self.eval_seq_len} must lie in 1..{MAX_SEQ_LEN}, "
             f"the Hilbert grid (256 x 256)"),
            (self.train_batch_tokens > 0 and self.train_batch_tokens % micro_tokens == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a positive multiple of 8 * TRAIN_SEQ_LEN = {micro_tokens}"),
            (self.num_heads > 0 and self.model_dim % self.num_heads == 0 and self.head_dim % 2 == 0,
             f"MODEL_DIM={self.model_dim} must split into NUM_HEADS={self.num_heads} heads of even size"),
            (self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
             f"NUM_HEADS={self.num_heads} must be a multiple of NUM_KV_HEADS={self.num_kv_heads}"),
            (self.conv1d_k >= 0 and self.conv2d_k >= 0 and (self.conv2d_k % 2 == 1 or self.conv2d_k == 0),
             f"CONV1D_K={self.conv1d_k} must be >= 0 and CONV2D_K={self.conv2d_k} odd or 0"),
            (self.mem_every == 1 or self.conv1d_k + self.conv2d_k > 0, "CONV1D_K and CONV2D_K are both 0: ConvMix has no taps"),
            (self.mem_every >= 0 and self.mem_chunk >= 1 and self.mem_topk >= 0,
             f"MEM_EVERY={self.mem_every}, MEM_CHUNK={self.mem_chunk}, MEM_TOPK={self.mem_topk} must be >= 0, >= 1, >= 0"),
            (1 <= self.eval_stride <= self.eval_len, f"EVAL_STRIDE={self.eval_stride} must lie in 1..{self.eval_len}"),
            (2 <= self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} must lie in 2..65536 (uint16 shards)"),
            (self.num_layers >= 1 and self.model_dim >= 1 and self.mlp_mult > 0, "NUM_LAYERS, MODEL_DIM, MLP_MULT must be positive"),
            (self.iterations >= 1 and self.warmup_steps >= 0 and self.max_wallclock_seconds >= 0,
             "ITERATIONS must be >= 1, WARMUP_STEPS and MAX_WALLCLOCK_SECONDS >= 0"),
            (self.train_log_every >= 1 and self.val_loss_every >= 0 and self.val_batch_size >= 1,
             "TRAIN_LOG_EVERY and VAL_BATCH_SIZE must be >= 1, VAL_LOSS_EVERY >= 0"),
            (self.bigram_buckets == 0 or (self.bigram_buckets >= 2 and self.bigram_dim >= 1),
             f"BIGRAM_BUCKETS={self.bigram_buckets} must be 0 or >= 2, BIGRAM_DIM={self.bigram_dim} >= 1"),
            (self.ttt_epochs >= 0 and self.max_eval_seconds >= 0,
             f"TTT_EPOCHS={self.ttt_epochs} and MAX_EVAL_SECONDS={self.max_eval_seconds} must be >= 0"),
            (self.gptq_calib_batches >= 1 and self.gptq_block >= 1 and self.gptq_damp > 0 and self.gptq_reserve_seconds >= 0,
             f"GPTQ_CALIB_BATCHES={self.gptq_calib_batches} and GPTQ_BLOCK={self.gptq_block} must be >= 1, GPTQ_DAMP > 0 "
             f"and GPTQ_RESERVE_SECONDS >= 0"),
            (not self.gptq or self.max_wallclock_seconds == 0 or self.train_seconds > 0,
             f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time in MAX_WALLCLOCK_SECONDS="
             f"{self.max_wallclock_seconds}"),
            (self.ttt_lora_rank >= 1 and self.ttt_lora_lr > 0 and 0 <= self.ttt_doc_chunk <= self.eval_len,
             f"TTT_LORA_RANK={self.ttt_lora_rank} must be >= 1, TTT_LORA_LR > 0, TTT_DOC_CHUNK={self.ttt_doc_chunk} "
             f"in 0..{self.eval_len} (EVAL_SEQ_LEN; 0 = min({DOC_CHUNK}, EVAL_SEQ_LEN))"),
            (0 <= self.qat_start_frac <= 1 and 0 <= self.ema_decay < 1,
             f"QAT_START_FRAC={self.qat_start_frac} must lie in [0, 1] and EMA_DECAY={self.ema_decay} in [0, 1)"),
            (all(0 < k < math.inf for k in (self.matrix_clip_k, self.bigram_clip_k, self.embed_clip_k)),
             f"MATRIX_CLIP_K={self.matrix_clip_k}, BIGRAM_CLIP_K={self.bigram_clip_k} and EMBED_CLIP_K={self.embed_clip_k} "
             f"must be finite and > 0"),
            (-self.num_layers <= self.parallel_from <= self.num_layers,
             f"PARALLEL_FROM={self.parallel_from} must lie in -NUM_LAYERS..NUM_LAYERS={self.num_layers}"),
        ]
        checks += [(getattr(self, name) in allowed, f"{name.upper()}={getattr(self, name)!r} must be one of {', '.join(allowed)}")
                   for name, allowed in CHOICES.items()]
        for ok, message in checks:
            if not ok:
                raise FatalError(message)


def parse_value(name: str, raw: str, kind: type) -> str | int | float | bool:
    text = raw.strip().lower()
    if kind is bool and text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text in ("1", "true", "yes", "on")
    try:
        if kind is not bool:
            value = kind(raw.strip())
            if kind is not float or math.isfinite(value):
                return value
    except ValueError:
        pass
    raise FatalError(f"{name}={raw!r} is not a valid {'0/1' if kind is bool else kind.__name__}")


def one_edit_apart(a: str, b: str) -> bool:
    """One substitution, insertion, deletion or adjacent swap turns a into b (a != b)."""
    if len(a) > len(b):
        a, b = b, a
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if len(a) < len(b):
        return len(b) - len(a) == 1 and a[i:] == b[i + 1:]
    return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])


def typo_warnings(env: Mapping[str, str]) -> list[str]:
    names = [f.name.upper() for f in fields(Hyperparameters)]
    return [f"warning: env {key} is not a setting; did you mean {name}?"
            for key in sorted(env) if key not in names
            for name in names if key.upper() == name or one_edit_apart(key.upper(), name)] + \
        [f"warning: env {key} was deleted and does nothing (LoRA TTT is the one TTT, issue 34)" for key in sorted(env)
         if key in DELETED_TTT_SETTINGS]


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum(self) -> int:
        return GLOBAL_MICROBATCHES // self.world_size


def init_distributed(env: Mapping[str, str]) -> Dist:
    world_size = parse_value("WORLD_SIZE", env.get("WORLD_SIZE", "1"), int)
    rank = parse_value("RANK", env.get("RANK", "0"), int)
    local_rank = parse_value("LOCAL_RANK", env.get("LOCAL_RANK", "0"), int)
    if world_size < 1 or GLOBAL_MICROBATCHES % world_size:
        raise FatalError(f"WORLD_SIZE={world_size} must divide {GLOBAL_MICROBATCHES} (use 1, 2, 4 or 8 processes)")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def all_reduce(t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op)
    return t


def data_parallel(step_model: nn.Module, d: Dist) -> nn.Module:
    """With several ranks, DDP: gradients are averaged in buckets whose all-reduce overlaps the rest of the
    backward (under torch.compile, DDPOptimizer splits the graph at the bucket boundaries, as in the baseline).
    The only buffers are the constant tap tables, so nothing is broadcast before each forward (as the baseline);
    torch 2.13 renamed that switch forward_sync_buffers and warns on the old name."""
    if d.world_size == 1:
        return step_model
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(step_model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **{buffers: False})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


AUTOCAST_DTYPE = torch.bfloat16  # matmul dtype on CUDA; CPU runs (tests, smoke data) stay fp32 throughout


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPE, enabled=device.type == "cuda")


def body_dtype(args: Hyperparameters, device: torch.device) -> torch.dtype:
    """The residual stream's dtype: autocast's where autocast is on and BODY_DTYPE=bf16, else fp32. Weights and
    control tensors stay fp32 either way (QAT, EMA and export see the same parameters)."""
    return AUTOCAST_DTYPE if args.body_dtype == "bf16" and device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- data

DATA_HELP = "see README.md, section Data, for the FineWeb download and `python -m data.make_smoke_data` for the smoke sample"


def shard_paths(pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(pattern))
    if not paths:
        raise FatalError(f"no shards match {pattern}; {DATA_HELP}")
    return paths


def load_data_shard(path: Path, vocab_size: int) -> np.ndarray:
    """A challenge shard's tokens as uint16, after checking header, size and token range."""
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_BYTES // 4)
    if header.size < SHARD_HEADER_BYTES // 4 or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise FatalError(f"{path}: not a challenge shard (header needs magic {SHARD_MAGIC} and version {SHARD_VERSION})")
    n, size = int(header[2]), path.stat().st_size
    if n < 2 or size != SHARD_HEADER_BYTES + 2 * n:
        raise FatalError(f"{path}: {size} bytes but the header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes); truncated or corrupt")
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)
    if int(tokens.max()) >= vocab_size:
        raise FatalError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    return tokens


class TokenStream:
    """The training shards in order, wrapping around; take(n) returns the next n tokens."""

    def __init__(self, paths: list[Path], vocab_size: int):
        self.paths, self.vocab_size = paths, vocab_size
        self.index, self.pos = 0, 0
        self.tokens = load_data_shard(paths[0], vocab_size)

    def take(self, n: int) -> Tensor:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.index = (self.index + 1) % len(self.paths)
                self.tokens, self.pos = load_data_shard(self.paths[self.index], self.vocab_size), 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))


class DistributedTokenLoader:
    """Each micro-step takes one contiguous span of micro-batch tokens + 1 per rank from the shared stream,
    rank r the r-th span, so every world size dividing 8 sees the same 8 micro-batches per step."""

    def __init__(self, args: Hyperparameters, d: Dist):
        self.args, self.d = args, d
        self.stream = TokenStream(shard_paths(os.path.join(args.data_path, "fineweb_train_*.bin")), args.vocab_size)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        span = self.args.train_batch_tokens // GLOBAL_MICROBATCHES + 1
        chunk = self.stream.take(span * self.d.world_size)[self.d.rank * span:(self.d.rank + 1) * span]
        chunk = chunk.to(self.d.device, non_blocking=True)
        return chunk[:-1].view(-1, self.args.train_seq_len), chunk[1:].view(-1, self.args.train_seq_len)


def load_validation_tokens(args: Hyperparameters) -> Tensor:
    paths = shard_paths(os.path.join(args.data_path, "fineweb_val_*.bin"))
    return torch.from_numpy(np.concatenate([load_data_shard(p, args.vocab_size) for p in paths]).astype(np.int32))


def build_sentencepiece_luts(sp, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(base_bytes, has_leading_space, is_boundary_token) per token id, exactly as CHALLENGE.md defines them."""
    if sp.vocab_size() != vocab_size:
        raise FatalError(f"the tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    base_bytes = np.zeros(vocab_size, dtype=np.int64)
    has_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.ones(vocab_size, dtype=bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        has_space[i] = piece.startswith("\u2581")
        base_bytes[i] = len(piece[int(has_space[i]):].encode("utf-8"))
    return torch.from_numpy(base_bytes), torch.from_numpy(has_space), torch.from_numpy(is_boundary)


def load_tokenizer_luts(args: Hyperparameters) -> tuple[Tensor, Tensor, Tensor]:
    import sentencepiece as spm

    path = Path(args.tokenizer_path)
    if not path.is_file():
        raise FatalError(f"TOKENIZER_PATH={path} does not exist; {DATA_HELP}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise FatalError(f"TOKENIZER_PATH={path} is not a SentencePiece model ({e})") from None
    if sp.bos_id() != BOS_ID:
        raise FatalError(f"TOKENIZER_PATH={path} has BOS id {sp.bos_id()}, the shards use {BOS_ID}")
    return build_sentencepiece_luts(sp, args.vocab_size)


# ----------------------------------------------------------------------------- model

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear; the fp32 weight is cast to the activation dtype, STE int6 fake-quantized at clip clip_k
    when qat (set_qat sets both). Gaussian init with nn.Linear's variance."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat, self.clip_k = False, math.inf
        self.lora: tuple[Tensor, Tensor] | None = None  # LoRA TTT: A [B, r, in], B [B, out, r], one per sequence
        nn.init.normal_(self.weight, std=0.0 if zero_init else (3 * in_features) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        w = fake_quant_int6(self.weight, self.clip_k) if self.qat else self.weight
        y = F.linear(x, w.to(x.dtype))
        if self.lora is None:
            return y
        a, b = (t.to(x.dtype) for t in self.lora)
        return y + (x @ a.transpose(1, 2)) @ b.transpose(1, 2)


def apply_rotary(x: Tensor, base: float, start: int = 0) -> Tensor:
    """RoPE over the last dim of [B, H, T, D], positions start..start+T-1 of the window."""
    T, D = x.shape[-2:]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(start, start + T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), -1)


class TapTable(nn.Module):
    """The gather conv's source table for the longest sequence and its inverse (convgpt_ops.conv_taps), one
    instance shared by every ConvMix: a row depends only on its position, so table[:T] serves length T."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        table = conv_taps(args.max_seq_len, args.conv1d_k, args.conv2d_k, args.conv2d_layout)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("inverse", conv_taps_inverse(table), persistent=False)


class ConvMix(nn.Module):
    """[u, g] = W_in h; m = causal 1D conv and Hilbert 2D conv of u, fused by a per-channel sigmoid gate
    (one gather conv over both tap sets); y = W_out(silu(g) * m), the product in the conv kernel's epilogue.
    With a decoding cache, u of every earlier position stays in it: a Hilbert tap can reach far back."""

    def __init__(self, args: Hyperparameters, tap_table: TapTable):
        super().__init__()
        d, k1, k2 = args.model_dim, args.conv1d_k, args.conv2d_k
        self.k1, self.tap_table = k1, tap_table
        self.w_in = CastedLinear(d, 2 * d)
        self.w_out = CastedLinear(d, d, zero_init=True)
        self.taps = nn.Parameter(torch.cat((torch.randn(d, k1) / max(k1, 1) ** 0.5, torch.randn(d, k2 * k2) / max(k2, 1)), 1))
        self.fuse = nn.Parameter(torch.zeros(d))
        self.triton = False

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        u, g = self.w_in(x).chunk(2, -1)
        if cache:
            u = torch.cat((cache["u"], u), 1)
        if cache is not None:
            cache["u"] = u
        table = self.tap_table.table[u.shape[1] - x.shape[1]:u.shape[1]]
        f = torch.sigmoid(self.fuse)[:, None]
        w = torch.cat((self.taps[:, :self.k1] * f, self.taps[:, self.k1:] * (1 - f)), 1).to(u.dtype)
        if self.triton and cache is None:
            return self.w_out(gated_gather_conv(u, g, table, self.tap_table.inverse, w)[1])
        return self.w_out(gated_gather_conv_ref(u, g, table, w))


class ChunkMemory(nn.Module):
    """Grouped-head attention of each token over its own chunk (causally) and its top-k complete earlier
    chunks, ranked by mean key; QK RMSNorm, learned q gain, RoPE or no positions. A decoding cache holds the
    keys and values of every earlier position."""

    def __init__(self, args: Hyperparameters, use_rope: bool):
        super().__init__()
        self.args, self.use_rope = args, use_rope
        d = args.model_dim
        self.q = CastedLinear(d, d)
        self.kv = CastedLinear(d, 2 * args.num_kv_heads * args.head_dim)
        self.proj = CastedLinear(d, d, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((args.num_heads,), QK_GAIN_INIT))
        self.triton = False

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        a, (B, T, _), start = self.args, x.shape, cache["k"].shape[2] if cache else 0
        q = rms_norm(self.q(x).view(B, T, a.num_heads, a.head_dim).transpose(1, 2))
        k, v = self.kv(x).view(B, T, 2 * a.num_kv_heads, a.head_dim).transpose(1, 2).chunk(2, 1)
        k = rms_norm(k)
        if self.use_rope:
            q, k = apply_rotary(q, a.rope_base, start), apply_rotary(k, a.rope_base, start)
        q = q * self.q_gain.to(q.dtype)[:, None, None]
        q, k = q.to(v.dtype), k.to(v.dtype)  # CUDA autocast: rms_norm fp32 from torch 2.12; the ops take one dtype
        if cache:  # q holds the last T of k's positions: chunk_memory_ref takes that
            k, v = torch.cat((cache["k"], k), 2), torch.cat((cache["v"], v), 2)
        if cache is not None:
            cache.update(k=k, v=v)
        dense = memory_is_dense(T, a.mem_chunk, a.mem_topk)  # flash attention beats the kernel there
        memory = chunk_memory_triton if self.triton and not dense and cache is None else chunk_memory_ref
        y = memory(q, k, v, a.mem_chunk, a.mem_topk)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        hidden = round(args.mlp_mult * args.model_dim)
        self.fc = CastedLinear(args.model_dim, hidden)
        self.proj = CastedLinear(hidden, args.model_dim, zero_init=True)
        self.slope = LEAKY_SLOPE if args.mlp_act == "leaky_relu2" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


class Block(nn.Module):
    """Pre-norm residual block: x0 mix, token mixer, MLP, each branch with a learned per-channel scale. Parallel:
    the MLP reads the block's input, as the mixer does, instead of the mixer's output."""

    def __init__(self, args: Hyperparameters, mixer: nn.Module, parallel: bool = False):
        super().__init__()
        d = args.model_dim
        self.mixer, self.mlp, self.parallel = mixer, MLP(args), parallel
        self.mix_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x: Tensor, x0: Tensor, cache: dict | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        y = x + self.mix_scale.to(x.dtype) * self.mixer(rms_norm(x), cache)
        return y + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x if self.parallel else y))


class BigramHash(nn.Module):
    """Embedding of hash(previous token, token), projected to model_dim; position 0 has its own bucket."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.embed = nn.Embedding(args.bigram_buckets, args.bigram_dim)
        nn.init.normal_(self.embed.weight, std=TIED_EMBED_INIT_STD)
        self.proj = CastedLinear(args.bigram_dim, args.model_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(BIGRAM_SCALE_INIT))

    def forward(self, input_ids: Tensor) -> Tensor:
        mod = self.embed.num_embeddings - 1
        prev = F.pad(input_ids[:, :-1], (1, 0))
        h = torch.bitwise_xor(BIGRAM_HASH[0] * input_ids, BIGRAM_HASH[1] * prev) % mod
        h[:, 0] = mod
        return self.scale * self.proj(self.embed(h))


class ConvGPT(nn.Module):
    """Tied embedding + BigramHash -> SmearGate -> RMSNorm -> blocks (ConvMix, every MEM_EVERY-th ChunkMemory)
    -> RMSNorm -> head with tanh softcap."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.args = args
        d = args.model_dim
        self.tok_emb = nn.Embedding(args.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=TIED_EMBED_INIT_STD)
        self.bigram = BigramHash(args) if args.bigram_buckets else None
        self.smear = nn.Parameter(torch.full((d,), SMEAR_INIT)) if args.smear_gate else None
        blocks, n_mem = [], 0
        tap_table = TapTable(args) if args.mem_every != 1 else None
        for i in range(args.num_layers):
            parallel = i >= args.first_parallel
            if args.mem_every and (i + 1) % args.mem_every == 0:
                rope = args.mem_rope == "all" or (args.mem_rope == "half" and n_mem % 2 == 0)
                blocks.append(Block(args, ChunkMemory(args, rope), parallel))
                n_mem += 1
            else:
                blocks.append(Block(args, ConvMix(args, tap_table), parallel))
        self.blocks = nn.ModuleList(blocks)
        self.lm_head = None if args.tie_embeddings else CastedLinear(d, args.vocab_size, zero_init=True)
        self.body_dtype = torch.float32  # the residual stream's; build_model sets body_dtype(args, device)

    def smear_previous(self, x: Tensor, input_ids: Tensor) -> Tensor:
        """SmearGate: blend in the previous position, never into a BOS and never at position 0."""
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        blend = F.pad((input_ids[:, 1:] != BOS_ID).to(x.dtype), (1, 0))[..., None]
        return x + torch.sigmoid(self.smear).to(x.dtype) * blend * (prev - x)

    def forward_logits(self, input_ids: Tensor, cache: dict | None = None) -> Tensor:
        """Logits of every input position. Incremental decoding (tools/sample.py): pass {} as cache with the first
        tokens, then the same dict with each next token(s); the logits are those of the new positions only."""
        n = input_ids.shape[1]
        if cache:
            input_ids = torch.cat((cache["ids"], input_ids), 1)
        if input_ids.shape[1] > self.args.max_seq_len or not n:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens ({n} new) is longer than the model's "
                             f"{self.args.max_seq_len} or adds none")
        if cache is not None:
            cache["ids"] = input_ids
        input_ids = input_ids[:, -n - 2:]  # BigramHash and SmearGate of the first new position read two earlier tokens
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        if self.smear is not None:
            x = self.smear_previous(x, input_ids)
        x0 = x = rms_norm(x[:, -n:]).to(self.body_dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, x0, None if cache is None else cache.setdefault(i, {}))
        x = rms_norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight.to(x.dtype))
        cap = self.args.logit_softcap
        return cap * torch.tanh(logits.float() / cap)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten())


def block_matrices(model: ConvGPT) -> dict[str, CastedLinear]:
    """The 2-D block weights: Muon-trained, STE int6 during QAT, int6 in the artifact."""
    return {f"blocks.{name}.weight": m for name, m in model.blocks.named_modules() if isinstance(m, CastedLinear)}


def set_qat(model: ConvGPT, on: bool) -> None:
    for m in block_matrices(model).values():
        m.qat, m.clip_k = on, model.args.matrix_clip_k


def set_triton(model: ConvGPT, on: bool) -> None:
    """Token mixers use the Triton kernels (on) or the PyTorch reference (off) of convgpt_ops."""
    for m in model.modules():
        if isinstance(m, (ConvMix, ChunkMemory)):
            m.triton = on


# ----------------------------------------------------------------------------- optimizer

def zeropower_via_newtonschulz5(g: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalise g (U V^T of its SVD) with the quintic Newton-Schulz iteration."""
    a, b, c = NS_COEFFS
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm() + NS_EPS)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then Newton-Schulz orthogonalisation; rank r orthogonalises every world_size-th
    matrix and one all-reduce shares the updates. Decoupled weight decay."""

    def __init__(self, params: list[Tensor], lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 orthogonalize: Callable[[Tensor, int], Tensor] = zeropower_via_newtonschulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))
        self.orthogonalize = orthogonalize

    @torch.no_grad()
    def step(self) -> None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for group in self.param_groups:
            params, mom = group["params"], group["momentum"]
            offsets = [0, *itertools.accumulate(p.numel() for p in params)]
            flat = torch.zeros(offsets[-1], device=params[0].device, dtype=torch.bfloat16 if params[0].is_cuda else torch.float32)
            for j in range(rank, len(params), world):
                p = params[j]
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(mom).add_(p.grad)
                update = self.orthogonalize(p.grad.add(buf, alpha=mom), group["backend_steps"])
                flat[offsets[j]:offsets[j + 1]] = update.flatten() * max(1.0, p.size(0) / p.size(1)) ** 0.5
            all_reduce(flat)
            for j, p in enumerate(params):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offsets[j]:offsets[j + 1]].view_as(p).to(p.dtype), alpha=-group["lr"])


class Optimizers(NamedTuple):
    """Adam for the embeddings, the head and the control tensors; Muon for the 2-D matrices."""
    adam: torch.optim.Adam
    muon: Muon


def build_optimizers(model: ConvGPT, args: Hyperparameters, orthogonalize: Callable) -> Optimizers:
    matrices = [m.weight for m in block_matrices(model).values()]
    matrix_ids = {id(p) for p in matrices}
    scalars = [p for p in model.blocks.parameters() if id(p) not in matrix_ids]
    scalars += [model.smear] if model.smear is not None else []
    embeddings = [model.tok_emb.weight]
    if model.bigram is not None:
        matrices.append(model.bigram.proj.weight)
        embeddings.append(model.bigram.embed.weight)
        scalars.append(model.bigram.scale)
    groups = [dict(params=embeddings, lr=args.tied_embed_lr if args.tie_embeddings else args.embed_lr),
              dict(params=scalars, lr=args.scalar_lr)]
    groups += [dict(params=[model.lm_head.weight], lr=args.head_lr)] if model.lm_head is not None else []
    adam = torch.optim.Adam(groups, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=model.tok_emb.weight.is_cuda)
    muon = Muon(matrices, args.matrix_lr, args.muon_momentum, args.muon_backend_steps, args.muon_weight_decay, orthogonalize)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return Optimizers(adam, muon)


def lr_multiplier(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Linear warmdown to 0 over the last WARMDOWN_ITERS steps, or over as much time as they take once the
    wallclock cap is what ends the run (whichever schedule is further along)."""
    if args.warmdown_iters <= 0:
        return 1.0
    by_step = min((args.iterations - step) / args.warmdown_iters, 1.0)
    if args.train_seconds <= 0:
        return max(by_step, 0.0)
    warmdown_ms = args.warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(1000 * args.train_seconds - elapsed_ms, 0.0)
    return max(min(by_step, remaining_ms / max(warmdown_ms, 1e-9)), 0.0)


def schedule_warning(args: Hyperparameters, step: int, elapsed_ms: float) -> str | None:
    """A warning when ITERATIONS, or the wallclock cap at the step time so far, leaves fewer steps than
    WARMDOWN_ITERS: the warmdown then spans the whole run and the learning rate never reaches its peak."""
    steps = args.iterations
    if args.train_seconds > 0:
        steps = min(steps, int(1000 * args.train_seconds * step / max(elapsed_ms, 1e-9)))
    if steps >= args.warmdown_iters:
        return None
    return (f"warning: about {steps} steps fit in this run, fewer than WARMDOWN_ITERS={args.warmdown_iters}: the "
            f"learning rate never reaches its peak (it starts at {steps / args.warmdown_iters:.0%} of it); set "
            f"WARMDOWN_ITERS below {steps}")


# ----------------------------------------------------------------------------- evaluation

def eval_windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) over input positions: window inputs [start, end) score the targets of
    positions [first_scored, end). Ends advance by stride, so each target is scored exactly once with at
    least seq_len - stride tokens of context; every window is seq_len long unless fewer targets exist."""
    ends = [*range(min(seq_len, n_targets), n_targets, stride), n_targets]
    return [(max(0, end - seq_len), end, prev) for prev, end in zip([0, *ends[:-1]], ends)]


def window_batch(val_tokens: Tensor, windows: list[tuple[int, int, int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs and targets [n, longest] of windows (start, end, first_scored), shorter ones padded at the end with
    their last target (causal: padding reaches no real position), and the mask of the targets each one scores."""
    w = torch.tensor(windows)
    pos = torch.arange(int((w[:, 1] - w[:, 0]).max()) + 1)
    tokens = val_tokens[torch.minimum(w[:, :1] + pos, w[:, 1:2])].to(device).long()
    rel = pos[:-1].to(device)
    scored = (rel >= (w[:, 2:] - w[:, :1]).to(device)) & (rel < (w[:, 1:2] - w[:, :1]).to(device))
    return tokens[:, :-1], tokens[:, 1:], scored


def window_sums(logits: Tensor, x: Tensor, y: Tensor, scored: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """float64 [n, 3]: [nll, targets, bytes] of each window's scored targets."""
    base_bytes, has_space, is_boundary = (t.to(x.device) for t in luts)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    n_bytes = base_bytes[y] + (has_space[y] & ~is_boundary[x])
    m = scored.double()
    return torch.stack(((nll.double() * m).sum(1), m.sum(1), (n_bytes.double() * m).sum(1)), 1)


@torch.no_grad()
def score_windows(model: nn.Module, val_tokens: Tensor, luts: tuple[Tensor, Tensor, Tensor],
                  windows: list[tuple[int, int, int]], batch_seqs: int) -> Tensor:
    """float64 [nll, targets, bytes] summed over the scored targets of windows (see eval_windows)."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i in range(0, len(windows), batch_seqs):
        x, y, scored = window_batch(val_tokens, windows[i:i + batch_seqs], device)
        with autocast(device):
            logits = model.forward_logits(x)
        sums += window_sums(logits, x, y, scored, luts).sum(0)
    return sums


def loss_and_bpb(sums: Tensor) -> tuple[float, float]:
    loss = (sums[0] / sums[1]).item()
    return loss, loss / math.log(2) * (sums[1] / sums[2]).item()


def eval_val(model: nn.Module, val_tokens: Tensor, luts: tuple[Tensor, Tensor, Tensor], seq_len: int,
             stride: int | None = None, batch_seqs: int = 8, rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """(val_loss in nats, val_bpb) of model.forward_logits over val_tokens; plain windows when stride is
    None or seq_len, sliding ones otherwise. Sums are float64 and all-reduced across ranks."""
    windows = eval_windows(val_tokens.numel() - 1, seq_len, stride or seq_len)
    sums = score_windows(model, val_tokens, luts, shard(windows, rank, world_size), batch_seqs)
    return loss_and_bpb(all_reduce(sums))


def shard(items: list, rank: int, world_size: int) -> list:
    return items[rank * len(items) // world_size:(rank + 1) * len(items) // world_size]


def documents(val_tokens: Tensor) -> list[tuple[int, int]]:
    """Input-position spans [start, end) of the BOS-delimited documents; a document's targets run to the next
    document's BOS, so together they score every target once."""
    n = val_tokens.numel() - 1
    starts = (val_tokens[:n] == BOS_ID).nonzero().flatten().tolist()
    starts = starts if starts[:1] == [0] else [0, *starts]
    return list(zip(starts, [*starts[1:], n]))


def document_windows(doc: tuple[int, int], chunk: int, seq_len: int) -> list[tuple[int, int, int]]:
    """The document's chunks as windows (start, end, first_scored) over its own tokens only, at most seq_len long."""
    lo, hi = doc
    return [(max(lo, min(s + chunk, hi) - seq_len), min(s + chunk, hi), s) for s in range(lo, hi, chunk)]


def attach_lora(model: ConvGPT, n: int, rank: int, seed: int) -> list[tuple[CastedLinear, Tensor, Tensor]]:
    """Fresh adapters for n sequences on every block matrix: A Gaussian (seeded), B zero, so the model is unchanged."""
    device, g = next(model.parameters()).device, torch.Generator().manual_seed(seed)
    return [(m, (torch.randn(n, rank, m.in_features, generator=g) / m.in_features ** 0.5).to(device).requires_grad_(),
             torch.zeros(n, m.out_features, rank, device=device, requires_grad=True)) for m in block_matrices(model).values()]


def lora_forward(model: ConvGPT, adapters: list, val_tokens: Tensor, windows: list, rows: list[int],
                 luts) -> tuple[Tensor, Tensor]:
    """Per-window sums (window_sums) and mean scored nll per window, window i with the adapters of row rows[i]."""
    for m, a, b in adapters:
        m.lora = (a[rows], b[rows])
    x, y, scored = window_batch(val_tokens, windows, next(model.parameters()).device)
    with autocast(x.device):
        sums = window_sums(ConvGPT.forward_logits(model, x), x, y, scored, luts)  # eager: hooks on lora, any shape
    return sums, sums[:, 0] / sums[:, 1]


class LoraPlan(NamedTuple):
    windows: list[list[tuple[int, int, int]]]  # each document's chunks (document_windows)
    first: list[int]  # index of each document's first chunk among all chunks, documents in order
    steps: list[list[list[int]]]  # steps[s][rank]: the documents that rank scores in step s (maybe none)


def lora_plan(val_tokens: Tensor, args: Hyperparameters, batch_seqs: int, world_size: int) -> LoraPlan:
    """Documents longest first, batch_seqs at a time; in step s, rank r takes batch s * world_size + r."""
    windows = [document_windows(doc, args.doc_chunk, args.eval_len) for doc in documents(val_tokens)]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    batches = [order[i:i + batch_seqs] for i in range(0, len(order), batch_seqs)]
    steps = [[*batches[i:i + world_size], *[[]] * world_size][:world_size] for i in range(0, len(batches), world_size)]
    return LoraPlan(windows, list(itertools.accumulate(map(len, windows), initial=0)), steps)


def batch_tokens(windows: list[list[tuple[int, int, int]]]) -> int:
    """Input tokens one forward pass per chunk reads for documents' windows run as a batch (padded to the longest)."""
    return sum(len(live) * max(end - start for start, end, _ in live)
               for live in ([w[c] for w in windows if c < len(w)] for c in range(max(map(len, windows), default=0))))


class LoraGuard:
    """MAX_EVAL_SECONDS for LoRA TTT: before each step (one batch of documents per rank), adapt only if every rank
    predicts that adapting this step and then scoring the rest without adapting still fits: elapsed + step +
    EVAL_MARGIN x rest x scoring pace <= budget. Paces are seconds per input token on this rank, measured on the
    steps so far: scoring's on their forward passes (at first scoring_pace's eager one), adapting's in all (at
    first UNMEASURED_COST x epochs x scoring's). Once a step is scored without adapting, the rest are too."""

    def __init__(self, budget: EvalBudget, step_tokens: list[int], epochs: int):
        self.budget, self.rest = budget, list(itertools.accumulate(step_tokens[::-1], initial=0))[::-1]
        self.guess = {"score": 1.0, "adapt": UNMEASURED_COST * epochs}  # times the eager scoring pace
        self.step_tokens, self.spent = step_tokens, {"score": [0.0, 0], "adapt": [0.0, 0]}
        self.stopped_at, self.why = None, ""

    def pace(self, kind: str) -> float:
        seconds, tokens = self.spent[kind]
        return seconds / tokens if tokens else self.guess[kind] * self.budget.score_pace

    def adapt(self, step: int) -> bool:
        if self.stopped_at is None:
            need = self.pace("adapt") * self.step_tokens[step] + EVAL_MARGIN * self.pace("score") * self.rest[step + 1]
            if not self.budget.fits(need):
                self.stopped_at = step
                self.why = f" stop_elapsed:{self.budget.elapsed():.1f}s stop_need:{need:.1f}s budget:{self.budget.seconds:g}s"
        return self.stopped_at is None

    def timed(self, kind: str, tokens: int, seconds: float) -> None:
        self.spent[kind][0] += seconds
        self.spent[kind][1] += tokens


def score_lora_batch(model: ConvGPT, val_tokens: Tensor, luts, windows: list[list], rows: list[int], sums: Tensor,
                     args: Hyperparameters, adapt: bool, forward_seconds: list[float]) -> None:
    """Score documents' chunks left to right as one batch into sums[rows[i] + c]; when adapting, after each chunk
    is scored, its adapters take TTT_EPOCHS Adam steps on it, the first from the forward that scored it; else the
    plain model scores them. Adds the scoring forwards' seconds to forward_seconds[0]."""
    adapters = attach_lora(model, len(windows), args.ttt_lora_rank, args.seed) if adapt else []
    opt = torch.optim.Adam([t for _, a, b in adapters for t in (a, b)], lr=args.ttt_lora_lr) if adapt else None
    try:
        for c in range(max(map(len, windows))):
            live = [i for i, w in enumerate(windows) if c < len(w)]
            going_on = torch.tensor([c + 1 < len(windows[i]) for i in live], device=sums.device)
            with torch.set_grad_enabled(adapt and bool(going_on.any())):
                for epoch in range(args.ttt_epochs if torch.is_grad_enabled() else 1):
                    t0 = time.perf_counter()
                    chunk_sums, nll = lora_forward(model, adapters, val_tokens, [windows[i][c] for i in live], live, luts)
                    if epoch == 0:
                        sums[[rows[i] + c for i in live]] = chunk_sums.detach()
                        sync(sums.device)
                        forward_seconds[0] += time.perf_counter() - t0
                    if torch.is_grad_enabled():
                        opt.zero_grad()
                        (nll * going_on).sum().backward()
                        opt.step()
    finally:
        for m in block_matrices(model).values():
            m.lora = None


def eval_lora_ttt(model: ConvGPT, val_tokens: Tensor, luts: tuple[Tensor, Tensor, Tensor], args: Hyperparameters,
                  batch_seqs: int, rank: int = 0, world_size: int = 1, budget: EvalBudget | None = None,
                  log: Callable[[str], None] | None = None, plan: LoraPlan | None = None) -> tuple[float, float, Tensor]:
    """Legal per-document LoRA TTT: each document is scored in TTT_DOC_CHUNK-token chunks, left to right, with at
    most EVAL_SEQ_LEN tokens of its own context; after a chunk is scored, rank-TTT_LORA_RANK adapters on the block
    matrices take TTT_EPOCHS Adam steps on that chunk's targets. Every document starts from fresh adapters, so no
    token is trained on before it is scored and no document sees another; the model's weights do not change.
    Documents run as lora_plan orders them (plan: one built before). With a budget, adapting stops where LoraGuard
    says, and the rest is scored by the plain model. Returns (val_loss, val_bpb, the all-reduced [nll, targets, bytes] of every chunk,
    documents in order)."""
    windows, first, steps = plan or lora_plan(val_tokens, args, batch_seqs, world_size)
    guard = LoraGuard(budget, [batch_tokens([windows[i] for i in step[rank]]) for step in steps], args.ttt_epochs) if budget else None
    sums = torch.zeros(first[-1], 3, dtype=torch.float64, device=next(model.parameters()).device)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for s, step in enumerate(steps):
            adapt = args.ttt_epochs > 0 and (guard is None or guard.adapt(s))
            t0, forward_seconds = time.perf_counter(), [0.0]
            if mine := step[rank]:
                score_lora_batch(model, val_tokens, luts, [windows[i] for i in mine], [first[i] for i in mine], sums,
                                 args, adapt, forward_seconds)
            if guard and adapt:
                sync(sums.device)
                guard.timed("adapt", guard.step_tokens[s], time.perf_counter() - t0)
                guard.timed("score", guard.step_tokens[s], forward_seconds[0])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if log:
        stop = guard.stopped_at if guard else None
        log(f"ttt_adapted steps:{len(steps) if stop is None else stop}/{len(steps)}" + (guard.why if guard else ""))
    sums = all_reduce(sums)
    return (*loss_and_bpb(sums.sum(0)), sums)


class EvalBudget:
    """MAX_EVAL_SECONDS over the whole final evaluation, from loading the artifact to the last score, and the pace of
    LoRA TTT's plain scoring forward on this rank (scoring_pace's eager seconds per input token)."""

    def __init__(self, seconds: float, device: torch.device, score_pace: float, t0: float | None = None):
        self.seconds, self.device, self.score_pace = seconds, device, score_pace
        self.t0 = time.perf_counter() if t0 is None else t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, seconds: float) -> bool:
        """Whether every rank predicts it ends inside the budget, less EVAL_RESERVE, after seconds more (one
        all-reduce: all ranks get the same answer)."""
        late = torch.tensor(float(self.elapsed() + seconds > (1 - EVAL_RESERVE) * self.seconds), device=self.device)
        return not all_reduce(late, dist.ReduceOp.MAX).item()


def eval_batch_seqs(args: Hyperparameters) -> int:
    return max(1, args.val_batch_size // (GLOBAL_MICROBATCHES * args.eval_len))


def scoring_pace(model: ConvGPT, device: torch.device) -> tuple[float, float]:
    """Seconds per input token of a plain scoring forward on this rank, through the compiled forward (the round trip's
    and the sliding window's) and eagerly (LoRA TTT's): one batch of EVAL_SEQ_LEN windows of random tokens (no
    validation data), the fastest of PACE_REPEATS runs but the first, which compiles: a refusal must not come from
    a slow moment, and the compile is a warm-up, as the records' TTT warm-up is."""
    args, batch_seqs = model.args, eval_batch_seqs(model.args)
    x = torch.randint(args.vocab_size, (batch_seqs, args.eval_len), generator=torch.Generator().manual_seed(args.seed)).to(device)
    paces = []
    for forward in (model.forward_logits, lambda t: ConvGPT.forward_logits(model, t)):
        seconds = []
        for _ in range(PACE_REPEATS):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad(), autocast(device):
                forward(x)
            sync(device)
            seconds.append(time.perf_counter() - t0)
        paces.append(min(seconds[1:]) / x.numel())
    return paces[0], paces[1]


def plain_tokens(args: Hyperparameters, val_tokens: Tensor, d: Dist, lora: LoraPlan | None) -> dict[str, int]:
    """Input tokens this rank reads in each pass of the final evaluation when nothing adapts."""
    n, seq_len = val_tokens.numel() - 1, args.eval_len
    tokens = {name: sum(end - start for start, end, _ in shard(eval_windows(n, seq_len, stride), d.rank, d.world_size))
              for name, stride in (("roundtrip", seq_len), ("sliding", args.eval_stride))}
    if lora:
        tokens["ttt"] = sum(batch_tokens([lora.windows[i] for i in step[d.rank]]) for step in lora.steps)
    return tokens


class EvalPlan(NamedTuple):
    score_pace: float  # scoring_pace's eager seconds per input token on this rank: LoRA TTT's plain scoring
    lora: LoraPlan | None  # TTT's documents in batches (TTT_EPOCHS > 0), built here, outside the clock


def check_eval_budget(model: ConvGPT, val_tokens: Tensor, d: Dist, log: Callable[[str], None]) -> EvalPlan | None:
    """Refuse, before anything runs, a MAX_EVAL_SECONDS that cannot fit even plain scoring of every pass: the round
    trip and the sliding window at the compiled pace, TTT's documents at the eager one. MAX_EVAL_SECONDS=0: no
    budget, nothing measured (None)."""
    args = model.args
    if args.max_eval_seconds <= 0:
        return None
    lora = lora_plan(val_tokens, args, eval_batch_seqs(args), d.world_size) if args.ttt_epochs else None
    (compiled, eager), tokens = scoring_pace(model, d.device), plain_tokens(args, val_tokens, d, lora)
    plain = compiled * (tokens["roundtrip"] + tokens["sliding"]) + eager * tokens.get("ttt", 0)
    log(f"eval_budget max_eval_seconds:{args.max_eval_seconds:g} plain_scoring_predicted:{plain:.1f}s "
        f"pace:{1e9 * compiled:.0f}ns_per_token eager_pace:{1e9 * eager:.0f}ns_per_token")
    if not EvalBudget(args.max_eval_seconds, d.device, eager).fits(plain):
        raise FatalError(f"MAX_EVAL_SECONDS={args.max_eval_seconds:g} cannot fit even plain scoring: the final "
                         f"evaluation's passes need {plain:.1f} s at the measured pace, and {EVAL_RESERVE:.0%} of it is "
                         f"reserved (raise it or EVAL_STRIDE, or set TTT_EPOCHS=0)")
    return EvalPlan(eager, lora)


def evaluate(model: ConvGPT, val_tokens: Tensor, luts, d: Dist, stride: int | None = None, ttt: bool = False,
             budget: EvalBudget | None = None, log: Callable[[str], None] | None = None,
             lora: LoraPlan | None = None) -> tuple[float, float, float]:
    """eval_val (or TTT) at EVAL_SEQ_LEN with this run's batch size and rank split: (val_loss, val_bpb, eval_ms)."""
    args = model.args
    t0 = time.perf_counter()
    batch_seqs = eval_batch_seqs(args)
    if ttt:
        loss, bpb, _ = eval_lora_ttt(model, val_tokens, luts, args, batch_seqs, d.rank, d.world_size, budget, log, lora)
    else:
        loss, bpb = eval_val(model, val_tokens, luts, args.eval_len, stride, batch_seqs, d.rank, d.world_size)
    return loss, bpb, 1000 * (time.perf_counter() - t0)


def final_evaluation(model: ConvGPT, val_tokens: Tensor, luts, d: Dist, log: Callable[[str], None],
                     plan: EvalPlan | None, t0: float) -> None:
    """The round trip, the sliding window and (TTT_EPOCHS > 0) TTT, inside MAX_EVAL_SECONDS (EvalBudget, when plan
    holds its pace) counted from t0, when the artifact's loading began."""
    args = model.args
    budget = EvalBudget(args.max_eval_seconds, d.device, plan.score_pace, t0) if plan else None
    loss, bpb, ms = evaluate(model, val_tokens, luts, d)
    log(f"final_int6_zstd_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
    log(f"final_int6_zstd_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    stride = model.args.eval_stride
    loss, bpb, ms = evaluate(model, val_tokens, luts, d, stride)
    log(f"final_sliding_window stride:{stride} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
    log(f"final_sliding_window_exact stride:{stride} val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    if args.ttt_epochs:
        loss, bpb, ms = evaluate(model, val_tokens, luts, d, stride, ttt=True, budget=budget, log=log,
                                 lora=plan.lora if plan else None)
        tag = f"mode:lora doc_chunk:{args.doc_chunk} rank:{args.ttt_lora_rank} epochs:{args.ttt_epochs}"
        log(f"final_ttt {tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
        log(f"final_ttt_exact {tag} val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    log(f"final_eval_time:{1000 * (time.perf_counter() - t0):.0f}ms max_eval_seconds:{args.max_eval_seconds:g}")


# ----------------------------------------------------------------------------- export

def quant_plan(model: ConvGPT) -> tuple[dict[str, str], dict[str, float]]:
    """(kind, clip k) of every tensor of the artifact: quantize_state_dict's plan and clip_k."""
    args = model.args
    kinds = {**{name: ("int6", args.matrix_clip_k) for name in block_matrices(model)},
             **{name: ("int6", args.bigram_clip_k) for name in ("bigram.embed.weight", "bigram.proj.weight")},
             **{name: (args.embed_quant, args.embed_clip_k) for name in ("tok_emb.weight", "lm_head.weight")}}
    plan = {name: kinds.get(name, ("fp16",))[0] for name in model.state_dict()}
    return plan, {name: kinds[name][1] for name, kind in plan.items() if kind in QMAX}


def code_files() -> list[Path]:
    """The counted code: the three files beside this one, or the one file tools/pack_code.py packed them into
    (its loader sets __packed__ before it runs this source)."""
    here = Path(__file__)
    return [here] if globals().get("__packed__") else [here.with_name(name) for name in COUNTED_CODE]


def code_bytes() -> int:
    return sum(path.stat().st_size for path in code_files())


def code_sha256() -> str:
    """sha256 of the counted code's bytes, file after file: tools/check_record.py matches a record's code with it."""
    digest = hashlib.sha256()
    for path in code_files():
        digest.update(path.read_bytes())
    return digest.hexdigest()


def collect_hessians(model: ConvGPT, d: Dist) -> dict[str, Tensor]:
    """GPTQ's H = E[x x^T] of every CastedLinear's input, over GPTQ_CALIB_BATCHES training batches from the start
    of the stream (all ranks), with the weights the model holds: training data, so it runs inside the cap."""
    args = model.args
    linears = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, CastedLinear)}
    sums = {name: torch.zeros(m.in_features, m.in_features, device=d.device) for name, m in linears.items()}

    def accumulate(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor]) -> None:
            x = inputs[0].detach().flatten(0, -2).float()
            sums[name].addmm_(x.T, x)
        return hook
    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in linears.items()]
    loader = DistributedTokenLoader(args, d)
    try:
        with torch.no_grad(), autocast(d.device):
            for _ in range(args.gptq_calib_batches * d.grad_accum):
                ConvGPT.forward_logits(model, loader.next_batch()[0])  # the class's: no compiled graph, hooks run
    finally:
        for handle in handles:
            handle.remove()
    return {name: all_reduce(h) / (args.gptq_calib_batches * args.train_batch_tokens) for name, h in sums.items()}


def relative_output_error(state: Mapping[str, Tensor], qsd: Mapping, hessians: Mapping[str, Tensor]) -> float:
    """sum of ||(W_q - W) x||^2 over sum of ||W x||^2 on the calibration inputs, over the matrices in hessians."""
    err = base = 0.0
    restored = dequantize_state_dict({name: qsd[name] for name in hessians})
    for name, h in hessians.items():
        w, h = state[name].float(), h.cpu()
        err += output_error(restored[name].float() - w, h).sum().item()
        base += output_error(w, h).sum().item()
    return err / base


def quantize_model(model: ConvGPT, d: Dist, log: Callable[[str], None]) -> dict:
    """The artifact's tensors: round to nearest on each row's grid, or GPTQ (GPTQ=1), whose output error is logged
    next to rounding's and whose time (calibration included) must fit in GPTQ_RESERVE_SECONDS when the cap is on."""
    args, t0 = model.args, time.perf_counter()
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    plan, clip_k = quant_plan(model)
    if not args.gptq:
        return quantize_state_dict(state, plan, clip_k)
    hessians = collect_hessians(model, d)
    try:
        qsd = quantize_state_dict(state, plan, clip_k, hessians, args.gptq_block, args.gptq_damp)
    except ValueError as e:
        raise FatalError(f"GPTQ: {e}; no artifact written") from None
    ms = 1000 * (time.perf_counter() - t0)
    rounded = quantize_state_dict({name: state[name] for name in hessians}, plan, clip_k)
    log(f"gptq matrices:{len(hessians)} calib_tokens:{args.gptq_calib_batches * args.train_batch_tokens} "
        f"output_err_round:{relative_output_error(state, rounded, hessians):.4e} "
        f"output_err_gptq:{relative_output_error(state, qsd, hessians):.4e} time:{ms:.0f}ms")
    if args.max_wallclock_seconds > 0 and ms > 1000 * args.gptq_reserve_seconds:
        raise FatalError(f"calibration + GPTQ took {ms / 1000:.1f} s, over GPTQ_RESERVE_SECONDS={args.gptq_reserve_seconds}: "
                         f"the run broke the training cap; no artifact written (raise the reserve)")
    return qsd


def export_artifact(model: ConvGPT, d: Dist, log: Callable[[str], None]) -> None:
    """Quantize, pack and atomically write the artifact on rank 0, only from finite weights; an artifact over
    the cap goes to ARTIFACT_PATH.oversize instead, and the run stops with an error."""
    args = model.args
    blob = pack(quantize_model(model, d, log))
    total = len(blob) + code_bytes()
    log(f"artifact bytes_model:{len(blob)} bytes_code:{code_bytes()} bytes_total:{total} limit:{ARTIFACT_LIMIT_BYTES}")
    if not all(t.isfinite().all() for t in dequantize_state_dict(unpack(blob)).values()):
        raise FatalError("the quantized weights are not finite; no artifact written")
    path = Path(args.artifact_path)
    oversize = total > ARTIFACT_LIMIT_BYTES
    if oversize:
        path = path.with_name(f"{path.name}.oversize")
    if d.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    if oversize:
        raise FatalError(f"artifact of {total} bytes is over the {ARTIFACT_LIMIT_BYTES}-byte cap: ARTIFACT_PATH left untouched, "
                         f"weights kept in {path} (not a valid submission; shrink NUM_LAYERS, MODEL_DIM or MLP_MULT)")


def load_artifact(model: ConvGPT) -> int:
    """Load ARTIFACT_PATH into model (dequantized); returns its size in bytes."""
    path = Path(model.args.artifact_path)
    if not path.is_file():
        raise FatalError(f"ARTIFACT_PATH={path} does not exist")
    blob = path.read_bytes()
    try:
        state = dequantize_state_dict(unpack(blob))
    except ValueError as e:
        raise FatalError(f"ARTIFACT_PATH={path}: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise FatalError(f"ARTIFACT_PATH={path} does not match the model settings: {detail}") from None
    set_qat(model, False)  # the weights are the artifact's; fake-quantizing them again would change them
    return len(blob)


# ----------------------------------------------------------------------------- training loop

def train_step(model: ConvGPT, step_model: nn.Module, loader: DistributedTokenLoader, optimizers: Optimizers, d: Dist,
               step: int, lr_mul: float) -> Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's mean loss (not reduced)."""
    args = model.args
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=d.device)
    for i in range(d.grad_accum):
        x, y = loader.next_batch()
        if isinstance(step_model, DDP):
            step_model.require_backward_grad_sync = i == d.grad_accum - 1  # one all-reduce, in the last backward
        with autocast(d.device):
            loss = step_model(x, y)
        (loss / d.grad_accum).backward()
        total += loss.detach()
    if args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
    warm = min(step / max(args.muon_momentum_warmup_steps, 1), 1.0)
    optimizers.muon.param_groups[0]["momentum"] = (1 - warm) * args.muon_momentum_warmup_start + warm * args.muon_momentum
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_mul
        opt.step()
    return total / d.grad_accum


def warmup_and_reset(model: ConvGPT, step_model: nn.Module, optimizers: Optimizers, d: Dist) -> None:
    """Run WARMUP_STEPS steps (compilation, with QAT on for the second half when QAT starts late), then put
    model and optimizers back to their initial state."""
    args = model.args
    if args.warmup_steps == 0:
        return
    model_state = copy.deepcopy(model.state_dict())
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader = DistributedTokenLoader(args, d)
    for i in range(args.warmup_steps):
        set_qat(model, args.qat and (args.qat_start_frac == 0 or 2 * i >= args.warmup_steps))
        train_step(model, step_model, loader, optimizers, d, 0, 1.0)
    model.load_state_dict(model_state)
    for opt, state in zip(optimizers, opt_states):
        opt.load_state_dict(state)


def check_finite(first_bad_step: Tensor) -> None:
    bad = int(all_reduce(first_bad_step.clone(), dist.ReduceOp.MAX).item())
    if bad >= 0:
        raise FatalError(f"non-finite training loss at step {bad}; stopped, no artifact written")


def train(model: ConvGPT, step_model: nn.Module, optimizers: Optimizers, d: Dist, val_tokens: Tensor, luts,
          log: Callable[[str], None]) -> None:
    """The timed training loop; the model leaves it holding the EMA of its weights, QAT off."""
    args = model.args
    loader = DistributedTokenLoader(args, d)
    params = list(model.parameters())
    ema = [p.detach().float().clone() for p in params]
    max_ms = 1000 * args.train_seconds if args.train_seconds > 0 else math.inf
    first_bad = torch.full((), -1, dtype=torch.int64, device=d.device)
    train_ms, step, stop_after = 0.0, 0, None
    sync(d.device)
    t0 = time.perf_counter()
    while step < args.iterations and step != stop_after:
        elapsed_ms = train_ms + 1000 * (time.perf_counter() - t0)
        set_qat(model, args.qat and max(step / args.iterations, elapsed_ms / max_ms) >= args.qat_start_frac)
        loss = train_step(model, step_model, loader, optimizers, d, step, lr_multiplier(args, step, elapsed_ms))
        first_bad = torch.where(loss.isfinite() | (first_bad >= 0), first_bad, step + 1)
        decay = min(args.ema_decay, (1 + step) / (EMA_WARMUP + step))
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        step += 1
        sync(d.device)
        approx_ms = train_ms + 1000 * (time.perf_counter() - t0)
        if step == min(SCHEDULE_CHECK_STEP, args.iterations) and (warning := schedule_warning(args, step, approx_ms)):
            log(warning)
        if step % args.train_log_every == 0 or step == args.iterations:
            check_finite(first_bad)
            mean_loss = all_reduce(loss.clone()).item() / d.world_size
            log(f"step:{step}/{args.iterations} train_loss:{mean_loss:.4f} train_time:{approx_ms:.0f}ms "
                f"step_avg:{approx_ms / step:.2f}ms tok_s:{args.train_batch_tokens * step / approx_ms * 1000:.0f}")
        if args.val_loss_every and step % args.val_loss_every == 0:
            train_ms = approx_ms
            val_loss, val_bpb, _ = evaluate(model, val_tokens, luts, d)
            log(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{train_ms:.0f}ms")
            t0 = time.perf_counter()
        reached = torch.tensor(float(approx_ms >= max_ms), device=d.device)
        if stop_after is None and all_reduce(reached, dist.ReduceOp.MAX).item() > 0:
            stop_after = step
    check_finite(first_bad)
    train_ms = train_ms + 1000 * (time.perf_counter() - t0)
    peak = f" peak_mem_mib:{torch.cuda.max_memory_allocated(d.device) >> 20}" if d.device.type == "cuda" else ""
    log(f"stopping_early:{stop_after is not None} step:{step} train_time:{train_ms:.0f}ms "
        f"step_avg:{train_ms / max(step, 1):.2f}ms{peak}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    set_qat(model, False)


# ----------------------------------------------------------------------------- main

def make_logger(args: Hyperparameters, d: Dist) -> Callable[[str], None]:
    if not d.is_main:
        return lambda message: None
    path = Path("logs") / f"{args.run_id}.txt"
    path.parent.mkdir(exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)
        with path.open("a") as f:
            print(message, file=f)
    return log


def build_model(args: Hyperparameters, d: Dist, log: Callable[[str], None]) -> tuple[ConvGPT, nn.Module]:
    """The model on its device, and the callable that training steps through (compiled on request)."""
    torch.manual_seed(args.seed)
    model = ConvGPT(args).to(d.device)
    model.body_dtype = body_dtype(args, d.device)
    try:
        use_triton = triton_enabled(d.device)
        if use_triton and args.mem_every:
            check_memory_sizes(args.mem_chunk, args.head_dim)
    except ValueError as e:
        raise FatalError(str(e)) from None
    if use_triton:
        check_kernels_on_device(model, d, log)
    set_triton(model, use_triton)
    use_compile = compile_enabled(args, d.device)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} "
        f"block_matrix_params:{sum(m.weight.numel() for m in block_matrices(model).values())} compile:{use_compile} "
        f"triton:{use_triton} body_dtype:{str(model.body_dtype)[6:]}")
    if not use_compile:
        return model, data_parallel(model, d)
    # the step (which traces forward_logits too) fails on a graph break; evaluation recompiles per batch shape, grad
    # mode and QAT flag, and past the recompile limit a fullgraph function raises where this one falls back to eager
    model.forward_logits = torch.compile(model.forward_logits, dynamic=False)
    return model, data_parallel(torch.compile(model, dynamic=False, fullgraph=True), d)


def compile_enabled(args: Hyperparameters, device: torch.device) -> bool:
    return args.compile == "1" or (args.compile == "auto" and device.type == "cuda")


def check_kernels_on_device(model: ConvGPT, d: Dist, log: Callable[[str], None]) -> None:
    """Compile and run every Triton kernel the model uses once, at its shapes and dtype, against its reference,
    so that a broken GPU setup fails here in one line instead of minutes into training."""
    a, t0 = model.args, time.perf_counter()
    tables = next(((m.tap_table.table, m.tap_table.inverse) for m in model.modules() if isinstance(m, ConvMix)), None)
    memory = (a.num_heads, a.num_kv_heads, a.head_dim, a.mem_chunk) if a.mem_every else None
    try:
        self_test_kernels(d.device, torch.bfloat16 if d.device.type == "cuda" else torch.float32, tables, a.model_dim,
                          memory)
    except Exception as e:  # noqa: BLE001 - compile errors, launch failures and wrong results alike stop the run
        detail = " ".join(str(e).split())[:300]
        raise FatalError(f"the Triton kernels fail on {d.device} ({type(e).__name__}: {detail}); "
                         f"CONVGPT_TRITON=0 trains on the PyTorch reference path instead") from None
    log(f"triton_self_test:ok time:{1000 * (time.perf_counter() - t0):.0f}ms")


def run(env: Mapping[str, str]) -> None:
    args = Hyperparameters.from_env(env)
    d = init_distributed(env)
    log = make_logger(args, d)
    for warning in typo_warnings(env):
        log(warning)
    for key, value in sorted(asdict(args).items()):
        log(f"hp {key}:{value}")
    log(f"code bytes_code:{code_bytes()} sha256:{code_sha256()} files:{','.join(p.name for p in code_files())}")
    name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    log(f"world_size:{d.world_size} grad_accum:{d.grad_accum} device:{d.device} device_name:{name.replace(' ', '_')} "
        f"torch:{torch.__version__} triton:{triton.__version__} cuda:{torch.version.cuda}")
    luts = load_tokenizer_luts(args)
    val_tokens = load_validation_tokens(args)
    log(f"val_tokens:{val_tokens.numel()}")
    model, step_model = build_model(args, d, log)
    plan = check_eval_budget(model, val_tokens, d, log)
    if not args.eval_only:
        orthogonalize = torch.compile(zeropower_via_newtonschulz5) if compile_enabled(args, d.device) else zeropower_via_newtonschulz5
        optimizers = build_optimizers(model, args, orthogonalize)
        t0 = time.perf_counter()
        warmup_and_reset(model, step_model, optimizers, d)
        log(f"warmup_steps:{args.warmup_steps} warmup_time:{1000 * (time.perf_counter() - t0):.0f}ms")
        train(model, step_model, optimizers, d, val_tokens, luts, log)
        loss, bpb, ms = evaluate(model, val_tokens, luts, d)
        log(f"final_ema_prequant val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
        export_artifact(model, d, log)
    t0 = time.perf_counter()  # the final evaluation's clock (MAX_EVAL_SECONDS)
    bytes_model = load_artifact(model)
    if args.eval_only:
        total = bytes_model + code_bytes()
        log(f"artifact bytes_model:{bytes_model} bytes_code:{code_bytes()} bytes_total:{total} limit:{ARTIFACT_LIMIT_BYTES}")
    final_evaluation(model, val_tokens, luts, d, log, plan, t0)


def main() -> None:
    try:
        run(os.environ)
        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another is still in a collective (an abort at exit)
    except FatalError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
