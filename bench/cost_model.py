"""Cost model: predicted 8xH100 ms per training step for any configuration, next to the attention baseline's, and
the final evaluation's seconds (--eval).

Three columns: default (the settings from the environment), attention (the same settings with dense causal
attention as every block's mixer: what the conv and memory mixers buy at equal shape) and baseline (the naive
attention baseline the calibration is solved on: MLP 2x relu^2, no BigramHash or SmearGate, bf16 parameters).

Runbook
  python bench/cost_model.py                                     # the three columns at seq 1024 and 2048
  python bench/cost_model.py --routing proxy.ptz --routing-env "NUM_LAYERS=5 MODEL_DIM=128 NUM_HEADS=2 NUM_KV_HEADS=1"
                                                                 # memory work measured on a trained model's routing
  MEM_TOPK=8 python bench/cost_model.py --json                   # one JSON object (settings from the environment)
  BODY_DTYPE=fp32 python bench/cost_model.py                     # the prediction with an fp32 residual stream
  python bench/cost_model.py --rms-norm-fp32                     # under torch >= 2.12's autocast (rms_norm fp32)
  python bench/cost_model.py --eval                              # the final evaluation's seconds (TTT included)

This is a model, not a measurement: a GPU step time replaces it (bench/gpu_preflight.py). What it does:
  1. Work per token, per component, from one meta-device forward (nothing is computed):
     * matmul FLOPs are bench/flops.py's count (the same code as the ablation table's column);
     * attention FLOPs: FlashAttention does the causal work (t + 1 keys per query). The chunk memory kernel is
       key-chunk-major: key chunk j runs against the queries that read it (its own chunk's and those that picked
       it) in tiles of 64, so its work is the (query, chunk) pairs rounded up to whole 64 x 64 blocks:
       memory_work_over_ideal x (top-k + 1) blocks per 64 queries, taken from the kernel's own schedule
       (convgpt_ops.memory_schedule) on routing from a trained model (--routing). Without one it is the schedule's bound:
       at most one partly filled tile per picked key chunk (schedule_bound_ratio);
     * bytes: every non-matmul aten op's inputs plus outputs (views, aliases such as matmul outputs' _unsafe_view,
       and factories move nothing), as eager PyTorch would move them. The custom ops count what their kernels read
       and write, plus the .contiguous() copies that their wrappers make of strided inputs. The chunk memory's
       per-pair traffic is counted apart, for the whole step (partial_bytes): each (query, chunk) pair's gathered q
       row (and q and dO in the backward), its partial output (q's dtype) and lse written and merged, its dQ share
       (fp32) written and read once by the slot sum (unused slots are neither zeroed nor read). dK and dV are summed
       over the GQA group in the backward kernel's registers, so they move nothing beyond the op's own outputs.
  2. Training multipliers: matmuls 3x the forward (forward, grad of input, grad of weight); FlashAttention and the
     chunk memory 3.5x (2 forward + 5 backward matmul passes, over 2: the memory's one backward kernel recomputes
     S and P, then dV, dP, dK and dQ); bytes 3x (the backward reads what the forward saved and writes gradients),
     except the routing's, 1x (FORWARD_ONLY_PARTS).
  3. Time per step on one GPU of 8 (65,536 tokens each at 524,288 per step):
       matmul FLOPs / (peak x MATMUL_EFFICIENCY) + attention FLOPs / attention rate + bytes / byte rate
       + routing FLOPs / matmul rate + Muon (each rank orthogonalises 1/8 of the matrices) + the two all-reduces.
  4. Calibration on the baseline (9 x 512, GQA 8/4, MLP 2x relu^2, bf16 stream): its two measured steps, 43.54 ms
     at seq 1024 and 51.9 ms at 2048, are solved for two unknowns, the attention rate and the byte rate, after
     matmuls at the assumed efficiency. The two lengths differ almost only in attention FLOPs per token, which fixes
     the attention rate. The byte rate absorbs torch.compile's fusion, which the eager byte count does not see, and
     launch overheads, so it is not a bandwidth.

  5. The final evaluation (--eval), per GPU of 8: the round trip reads each validation token once; the sliding
     window reads EVAL_SEQ_LEN tokens per EVAL_STRIDE targets; LoRA TTT reads, per step of lora_plan (the slowest
     rank's), each chunk's window padded to its batch's longest, forward and backward (LORA_X) for TTT_EPOCHS.
     Documents: VAL_DOCS of them, shaped
     like the shared sample's val documents, scaled to VAL_TOKENS in all. Seconds = tokens x token_seconds x
     eval_efficiency, which EVAL_CALIBRATION's measured sliding pass fixes (an evaluation pass ran 2.5x slower
     than its forward work at the training step's rates), and x EAGER_X for LoRA TTT, which runs eagerly.

Assumptions that could be wrong, each a named constant below:
  * MATMUL_EFFICIENCY 0.6 of bf16 peak for K = 512 matmuls; a lower value moves time from bytes to matmuls.
  * The chunk memory kernel runs at FlashAttention's calibrated rate. It is younger code: likely slower.
  * Our model fuses as well as the baseline under torch.compile (one byte rate for both).
  * Bytes are counted at the dtypes CUDA autocast gives (CudaAutocastDtypes) in the torch the baseline was timed
    on and the challenge image runs (2.9.1; 2.11 has the same rules): rms_norm keeps its input's dtype. Torch 2.12
    put rms_norm on autocast's fp32 list (pytorch#174824); --rms-norm-fp32 predicts both rows under that rule, with
    the same calibration. The baseline keeps a bf16 embedding, fp32 matrices (cast to bf16 per matmul) and fp32
    control tensors cast to x's dtype; the stand-in holds every parameter in bf16, which leaves out those
    per-forward weight casts (a few MB per step). So its residual stream is bf16 (fp32 from torch 2.12 on, where
    rms_norm returns fp32). Ours keeps fp32 parameters and casts the residual stream to train_gpt.body_dtype
    (BODY_DTYPE, bf16 by default; BODY_DTYPE=fp32 gives an fp32 stream).
  * EAGER_X 2: LoRA TTT's eager passes against compiled ones; never measured. The guard (train_gpt.LoraGuard)
    measures the real pace during the run, so a wrong EAGER_X moves where adapting stops, not the limit. The
    val set's document lengths are the sample's shape at the real mean (the sample leans to long legal texts).
  * All-reduces are charged in full (ring time over NVLINK_BYTES_S): the fp32 gradients and Muon's bf16 updates.
    Both trainers reduce gradients through DDP, in buckets that overlap the backward, so the charge treats them
    alike and overstates both; the exposed part needs a GPU to measure.
  * Routing (q @ mean keys, bf16 under autocast) runs at the matmul rate, forward only: it is computed without
    gradient. Its bytes and the schedule's (the "routing" part: means, scores, top-k, sorts, searches) are counted
    once, with no backward; eager, they are 40% of a memory layer's forward bytes. Under torch.compile, the pointwise
    ones fuse but top-k, sort and searchsorted stay kernels of their own, so the byte rate may flatter them; and
    the compiler may recompute some of the schedule in the backward instead of saving it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from bench.configs import CONFIGS  # noqa: E402
from bench.flops import count_forward_flops, memory_keys  # noqa: E402
from convgpt_ops import chunk_memory_ref, chunk_picks, memory_is_dense, memory_schedule  # noqa: E402
from train_gpt import ChunkMemory, FatalError, Hyperparameters  # noqa: E402

H100_BF16_FLOPS = 989e12  # H100 SXM5 dense bf16 tensor-core peak, NVIDIA datasheet
NVLINK_BYTES_S = 450e9  # H100 NVLink 4, per direction per GPU (900 GB/s both ways), NVIDIA datasheet
MATMUL_EFFICIENCY = 0.6  # assumed share of bf16 peak for [65536 x 512] @ [512 x N] matmuls
BASELINE_MS = {1024: 43.54, 2048: 51.9}  # naive baseline, 8xH100, measured (CHALLENGE.md, issue 12)
GPUS, TOKENS_PER_STEP, TIME_BUDGET_S = 8, 524_288, 600.0
TRAIN_X = {"matmul": 3.0, "flash": 3.5, "memory": 3.5, "bytes": 3.0}  # training work / forward work
FORWARD_X = {"matmul": 1.0, "flash": 1.0, "memory": 1.0, "bytes": 1.0}
LORA_X = {**TRAIN_X, "matmul": 2.0}  # a LoRA TTT step / its forward: the base matrices take no weight gradient
VAL_TOKENS, VAL_DOCS = 62_021_846, 50_000  # the challenge's validation set (CHALLENGE.md)
EVAL_CALIBRATION = ({"NUM_LAYERS": "11", "MLP_MULT": "3"}, 1024, 64, 72.611)  # (settings over BASELINE_ENV, seq,
# stride, seconds): records/track_10min_16mb/2026-03-19_MLP3x_QAT_Int6_SlidingWindow/train.log, final_sliding_window
# eval_time:72611ms on 8xH100 (11 x 512 GQA 8/4 transformer, MLP 3x relu^2)
EAGER_X = 2.0  # assumed: LoRA TTT runs eagerly (per-sequence adapters through hooks, any shape),
# at this many times the time of the same work compiled (the scoring passes compile; nothing has measured it)
FORWARD_ONLY_PARTS = {"routing"}  # bytes of work done without gradient: no backward, counted once
ATTENTION_ENV = CONFIGS["dense"]  # every mixer dense causal attention: the ablation's and the preflight's dense
BASELINE_ENV = {**ATTENTION_ENV, "MEM_ROPE": "all", "MLP_MULT": "2", "MLP_ACT": "relu2", "BIGRAM_BUCKETS": "0",
                "SMEAR_GATE": "0"}  # the baseline's transformer
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm"}
NO_TRAFFIC_OPS = MATMUL_OPS | {"_unsafe_view"}  # matmuls (counted as FLOPs); an alias not marked a view


class ByteCounter(TorchDispatchMode):
    """Bytes read plus written by every non-matmul, non-view, non-factory aten op, at the dtypes they have."""

    def __init__(self):
        super().__init__()
        self.labels, self.by_part = ["other"], {}

    def add(self, *tensors: torch.Tensor) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        self.by_part[self.labels[-1]] = self.by_part.get(self.labels[-1], 0) + size

    def label(self, module: torch.nn.Module, name: str) -> None:
        """Attribute the bytes of module's own forward to name (the innermost labelled module wins)."""
        module.register_forward_pre_hook(lambda *_: self.labels.append(name))
        module.register_forward_hook(lambda *_: self.labels.pop() and None)  # a hook's non-None return replaces the output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_TRAFFIC_OPS and not name.startswith(("empty", "zeros", "full")):
            self.add(*(t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)))
        return out


def cast_floats(tree, dtype: torch.dtype):
    return torch.utils._pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


class CudaAutocastDtypes(TorchFunctionMode):
    """The dtypes CUDA bf16 autocast gives the trainer's activations: matmuls bf16; softmax, log-softmax,
    cross-entropy, sum and pow/square fp32 (what tools/cuda_autocast.py reads from CUDA's autocast kernels of torch
    2.9.1, 2.11 and 2.13). rms_norm, fp32 from torch 2.12 on, is forward_work's stand-in."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in BF16_FUNCTIONS:
            args, kwargs = cast_floats(args, torch.bfloat16), cast_floats(kwargs, torch.bfloat16)
        elif func in FP32_FUNCTIONS:
            args, kwargs = cast_floats(args, torch.float32), cast_floats(kwargs, torch.float32)
        return func(*args, **kwargs)


BF16_FUNCTIONS = {F.linear, torch.matmul, torch.Tensor.__matmul__, torch.einsum, torch.mm, torch.bmm}
FP32_FUNCTIONS = {F.softmax, F.log_softmax, F.cross_entropy, torch.sum, torch.Tensor.sum, torch.pow,
                  torch.Tensor.pow, torch.square, torch.Tensor.square}


@dataclass(frozen=True)
class Work:
    """Forward work per token of one configuration at one sequence length."""
    matmul_flops: float
    flash_flops: float
    memory_flops: float  # what the chunk memory kernel executes
    route_flops: float
    partial_bytes: float  # the chunk memory's partial results, per token, for the whole training step
    bytes_by_part: dict[str, float]  # moved by non-matmul ops in the forward, per token: embed, conv, memory,
    # routing (the memory's, no gradient), mlp, block (norms, residual and branch scales), other (embedding,
    # SmearGate, final norm, softcap, loss)
    matrix_params: int
    params: int

    @property
    def bytes(self) -> float:
        return sum(self.bytes_by_part.values())

    @property
    def train_bytes(self) -> float:
        """Bytes per token of the training step, by part times its training factor (partial_bytes excluded)."""
        return sum(train_factor(part) * n for part, n in self.bytes_by_part.items())


def train_factor(part: str) -> float:
    return 1.0 if part in FORWARD_ONLY_PARTS else TRAIN_X["bytes"]


def strided_copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """What the kernel wrappers' copies read and write: an input whose last dimension is strided is copied
    (convgpt_ops.channels_last_contiguous); the kernels take every other stride as it is."""
    return [t for t in tensors if t.stride(-1) != 1 for _ in range(2)]


def ideal_blocks(seq_len: int, chunk: int, topk: int) -> int:
    """Key blocks a query tile needs, summed over tiles: its own chunk and min(top-k, earlier chunks)."""
    return sum(min(topk, i) + 1 for i in range(-(-seq_len // chunk)))


def schedule_bound_ratio(seq_len: int, chunk: int, topk: int) -> float:
    """An upper bound on memory_work_over_ideal for any routing: key chunk j's list is its own chunk (one full
    tile) and the queries that picked it, so rounding up wastes less than one tile per pickable chunk."""
    ideal = ideal_blocks(seq_len, chunk, topk)
    return (ideal + (seq_len - 1) // chunk * (chunk - 1) / chunk) / ideal


def partial_bytes(seq_len: int, chunk: int, topk: int, head_dim: int, elem: int) -> int:
    """Bytes per (batch, head) per training step that the chunk memory moves beyond q, k, v and out once: for each
    (query, chunk) pair it reads, the gathered q row (forward) and q and dO rows (backward), its partial output
    and lse written and merged, and its dQ share (fp32) written and summed."""
    pairs = ideal_blocks(seq_len, chunk, topk) * chunk - (-seq_len % chunk) * (min(topk, (seq_len - 1) // chunk) + 1)
    return pairs * (3 * head_dim * elem + 2 * (head_dim * elem + 4) + 2 * head_dim * 4)


def forward_work(args: Hyperparameters, seq_len: int, work_over_ideal: float | None, bf16_params: bool,
                 rms_norm_fp32: bool = False) -> Work:
    """One meta forward with the kernels' stand-ins under CUDA autocast's dtypes (rms_norm_fp32: torch >= 2.12's)
    and the trainer's body dtype on CUDA; bf16_params: every parameter bf16 and no body cast, the baseline's
    stand-in (docstring, assumptions). work_over_ideal None = the schedule's bound."""
    T, counter, partial = seq_len, ByteCounter(), [0.0]
    args = replace(args, train_seq_len=T, eval_seq_len=0)
    flops = count_forward_flops(args, T)
    attn = {"flash": 0.0, "memory": 0.0}

    def memory(q, k, v, chunk, topk):
        counter.add(*strided_copies(q, k, v), q, k, v, q)  # q, k, v in, out
        flops_per_key = 4 * q.shape[0] * q.shape[1] * q.shape[3]
        if memory_is_dense(T, chunk, topk):
            attn["flash"] += flops_per_key * memory_keys(T, chunk, topk)
            return torch.empty_like(q)
        counter.labels.append("routing")
        with torch.no_grad():  # run for their bytes: the routing and the kernel's schedule are real per-step work
            memory_schedule(chunk_picks(q, k, chunk, topk), chunk)
        counter.labels.pop()
        partial[0] += q.shape[0] * q.shape[1] * partial_bytes(T, chunk, topk, q.shape[3], q.element_size())
        ratio = work_over_ideal if work_over_ideal is not None else schedule_bound_ratio(T, chunk, topk)
        attn["memory"] += flops_per_key * chunk * chunk * ideal_blocks(T, chunk, topk) * ratio
        return torch.empty_like(q)

    def rms_norm(x):  # one pass, as CUDA's fused kernel and inductor run it (eager CPU decomposes it into 5 to 7)
        y = torch.empty_like(x, dtype=torch.float32 if rms_norm_fp32 else x.dtype)
        counter.add(x, y)
        return y

    def gated_gather_conv(u, g, table, inverse, w):  # reads u and the gate, writes m (kept for backward) and y
        counter.add(*strided_copies(u, g), u, g, u, u)
        return torch.empty_like(u), torch.empty_like(u)

    model = train_gpt.ConvGPT(args)
    train_gpt.set_triton(model, True)
    model = model.to("meta", torch.bfloat16 if bf16_params else torch.float32)
    if bf16_params:  # the baseline casts nothing: its stream has rms_norm's dtype, the bf16 embedding's before 2.12
        model.body_dtype = torch.float32 if rms_norm_fp32 else torch.bfloat16
    else:
        model.body_dtype = train_gpt.body_dtype(args, torch.device("cuda"))
    if model.bigram is not None:
        counter.label(model.bigram, "embed")
    for block in model.blocks:
        counter.label(block, "block")
        counter.label(block.mixer, "memory" if isinstance(block.mixer, ChunkMemory) else "conv")
        counter.label(block.mlp, "mlp")
    tokens = torch.zeros((TOKENS_PER_STEP // GPUS // T, T), dtype=torch.long, device="meta")  # one GPU's micro-batch
    with mock.patch.object(train_gpt, "chunk_memory_triton", memory), \
            mock.patch.object(train_gpt, "chunk_memory_ref", memory), \
            mock.patch.object(train_gpt, "gated_gather_conv", gated_gather_conv), counter, CudaAutocastDtypes(), \
            mock.patch.object(train_gpt, "rms_norm", rms_norm):
        model(tokens, tokens)
    per_token, n = flops.per_token, tokens.numel()
    matrices = [m.weight for m in train_gpt.block_matrices(model).values()]
    return Work(matmul_flops=flops.total - per_token["memory_attn"] - per_token["memory_route"],
                flash_flops=attn["flash"] / n, memory_flops=attn["memory"] / n, route_flops=per_token["memory_route"],
                partial_bytes=partial[0] / n,
                bytes_by_part={k: v / n for k, v in counter.by_part.items()}, matrix_params=sum(p.numel() for p in matrices),
                params=sum(p.numel() for p in model.parameters()))


def muon_flops(args: Hyperparameters) -> float:
    """Newton-Schulz FLOPs per step on one rank: per iteration 4 m^2 n + 2 m^3 (m <= n) per matrix, 1/GPUS of them."""
    model = train_gpt.ConvGPT(args).to("meta")
    total = 0.0
    for m in train_gpt.block_matrices(model).values():
        small, big = sorted(m.weight.shape)
        total += args.muon_backend_steps * (4 * small * small * big + 2 * small ** 3)
    return total / GPUS


@dataclass(frozen=True)
class Rates:
    flash_flops_s: float
    bytes_s: float


def token_seconds(work: Work, rates: Rates, x: dict[str, float]) -> float:
    """Seconds per token on one GPU of a pass whose work is x times the forward's (FORWARD_X, LORA_X, TRAIN_X):
    routing and its bytes once, the memory's partial traffic x["bytes"] / TRAIN_X["bytes"] of the training step's."""
    matmul_rate = H100_BF16_FLOPS * MATMUL_EFFICIENCY
    moved = sum((1.0 if part in FORWARD_ONLY_PARTS else x["bytes"]) * n for part, n in work.bytes_by_part.items())
    return ((x["matmul"] * work.matmul_flops + work.route_flops) / matmul_rate
            + (x["flash"] * work.flash_flops + x["memory"] * work.memory_flops) / rates.flash_flops_s
            + (moved + x["bytes"] / TRAIN_X["bytes"] * work.partial_bytes) / rates.bytes_s)


def step_ms(work: Work, args: Hyperparameters, rates: Rates) -> dict[str, float]:
    """Milliseconds per step on one GPU, by part."""
    tokens = TOKENS_PER_STEP / GPUS
    ring = 2 * (GPUS - 1) / GPUS / NVLINK_BYTES_S
    return {
        "matmul": 1e3 * tokens * TRAIN_X["matmul"] * work.matmul_flops / (H100_BF16_FLOPS * MATMUL_EFFICIENCY),
        "attention": 1e3 * tokens * (TRAIN_X["flash"] * work.flash_flops + TRAIN_X["memory"] * work.memory_flops)
        / rates.flash_flops_s,
        "routing": 1e3 * tokens * work.route_flops / (H100_BF16_FLOPS * MATMUL_EFFICIENCY),  # no_grad: no backward
        "bytes": 1e3 * tokens * (work.train_bytes + work.partial_bytes) / rates.bytes_s,
        "optimizer": 1e3 * muon_flops(args) / (H100_BF16_FLOPS * MATMUL_EFFICIENCY),
        "all_reduce": 1e3 * ring * (4 * work.params + 2 * work.matrix_params),
    }


def calibrate() -> Rates:
    """Solve the baseline's two measured steps for the attention rate and the byte rate: per step, attention FLOPs x
    (1 / attention rate) + bytes x (1 / byte rate) = measured ms - the rest of the model's parts."""
    args = Hyperparameters.from_env(BASELINE_ENV)
    tokens, rows, rhs = TOKENS_PER_STEP / GPUS, [], []
    for T in (1024, 2048):
        work = forward_work(args, T, None, bf16_params=True)
        parts = step_ms(work, args, Rates(float("inf"), float("inf")))
        rows.append([tokens * TRAIN_X["flash"] * work.flash_flops, tokens * work.train_bytes])
        rhs.append(1e-3 * (BASELINE_MS[T] - sum(parts.values())))
    inv_flash, inv_bytes = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)).tolist()
    if inv_flash <= 0 or inv_bytes <= 0:
        raise FatalError(f"calibration failed: rates 1/{inv_flash:.3g}, 1/{inv_bytes:.3g} FLOP/s and B/s are not positive")
    return Rates(1 / inv_flash, 1 / inv_bytes)


def scheduled_blocks(picks: torch.Tensor, chunk: int, topk: int) -> tuple[int, int]:
    """(key blocks the kernel executes, ideal blocks) for one routing (chunk_picks, [B, H, T, P]): the executed
    count is the kernel's own schedule (convgpt_ops.memory_schedule: each key chunk's listed queries in tiles of chunk)."""
    _, starts, _, _ = memory_schedule(picks, chunk)
    executed = int(((starts[:, 1:] - starts[:, :-1] + chunk - 1) // chunk).sum())
    return executed, picks.shape[0] * picks.shape[1] * ideal_blocks(picks.shape[2], chunk, topk)


def memory_work_over_ideal(artifact: Path, env: dict[str, str], seq_len: int, val_tokens: torch.Tensor) -> float:
    """Executed over ideal key blocks of the chunk memory kernel on the routing that a trained model's memory
    layers produce over full val windows of seq_len tokens."""
    args = replace(Hyperparameters.from_env(env), artifact_path=str(artifact), eval_seq_len=seq_len)
    model = train_gpt.ConvGPT(args)
    train_gpt.load_artifact(model)
    blocks = [0, 0]

    def counting(q, k, v, chunk, topk):
        for i, n in enumerate(scheduled_blocks(chunk_picks(q, k, chunk, topk), chunk, topk)):
            blocks[i] += n
        return chunk_memory_ref(q, k, v, chunk, topk)  # the real output: later layers route on it

    n = val_tokens.numel() // seq_len
    if n == 0:
        raise FatalError(f"the validation tokens hold no full window of {seq_len}")
    with torch.no_grad(), mock.patch.object(train_gpt, "chunk_memory_ref", counting):
        for batch in val_tokens[: n * seq_len].view(n, seq_len).long().split(8):
            model.forward_logits(batch)
    if blocks[1] == 0:
        raise FatalError("the model has no sparse chunk memory layer at this length (dense or none)")
    return blocks[0] / blocks[1]


def predict(env: dict[str, str], seq_len: int, rates: Rates, work_over_ideal: float | None, bf16_params: bool,
            rms_norm_fp32: bool = False) -> dict:
    args = Hyperparameters.from_env({**env, "TRAIN_SEQ_LEN": str(seq_len)})
    work = forward_work(args, seq_len, work_over_ideal, bf16_params, rms_norm_fp32)
    parts = step_ms(work, args, rates)
    ms = sum(parts.values())
    per_byte = 1e3 * TOKENS_PER_STEP / GPUS / rates.bytes_s
    bytes_ms = {k: per_byte * train_factor(k) * v for k, v in work.bytes_by_part.items()}
    bytes_ms["partial"] = per_byte * work.partial_bytes  # the chunk memory's partial results
    return {"ms_per_step": ms, "parts_ms": parts, "bytes_ms": bytes_ms, "steps_in_600s": int(TIME_BUDGET_S * 1e3 / ms),
            "tokens_seen": int(TIME_BUDGET_S * 1e3 / ms) * TOKENS_PER_STEP,
            "fwd_flops_per_token": work.matmul_flops + work.flash_flops + work.memory_flops + work.route_flops}


def sample_val_lengths(path: Path) -> list[int]:
    """Document lengths of a val shard (the shared FineWeb sample's by default)."""
    tokens = torch.from_numpy(train_gpt.load_data_shard(path, Hyperparameters.vocab_size).astype("int64"))
    return [b - a for a, b in train_gpt.documents(tokens)]


def golf_val_stream(lengths: list[int]) -> torch.Tensor:
    """A stand-in for the validation set's BOS layout: VAL_DOCS documents whose lengths cycle through lengths,
    scaled to VAL_TOKENS in all (the sample's shape, the real mean); only where each document starts matters."""
    scale = VAL_TOKENS / (sum(lengths) * VAL_DOCS / len(lengths))
    sizes = [max(1, round(lengths[i % len(lengths)] * scale)) for i in range(VAL_DOCS)]
    stream = torch.zeros(sum(sizes) + 1, dtype=torch.uint8)
    stream[torch.tensor([0, *itertools.accumulate(sizes[:-1])])] = train_gpt.BOS_ID
    return stream


def eval_tokens(args: Hyperparameters, stream: torch.Tensor) -> dict[str, float]:
    """Tokens one GPU of 8 reads in each pass of the final evaluation (the slowest rank's per LoRA step): forward
    only (roundtrip, sliding) or forward + backward (ttt: LoRA TTT, all epochs)."""
    n, seq_len = stream.numel() - 1, args.eval_len
    tokens = {"roundtrip": n / GPUS, "sliding": len(train_gpt.eval_windows(n, seq_len, args.eval_stride)) * seq_len / GPUS}
    if args.ttt_epochs:
        batch_seqs = train_gpt.eval_batch_seqs(args)
        plan = train_gpt.lora_plan(stream, args, batch_seqs, GPUS)
        tokens["ttt"] = args.ttt_epochs * sum(max(train_gpt.batch_tokens([plan.windows[i] for i in batch]) for batch in step)
                                              for step in plan.steps)
    return tokens


def eval_efficiency(rates: Rates) -> float:
    """Measured over predicted seconds of EVAL_CALIBRATION's sliding-window pass: what an evaluation pass loses to
    batch shapes, the per-window loss and its float64 sums beside the forward's work."""
    settings, seq_len, stride, seconds = EVAL_CALIBRATION
    args = Hyperparameters.from_env({**BASELINE_ENV, **settings, "TRAIN_SEQ_LEN": str(seq_len), "EVAL_STRIDE": str(stride)})
    work = forward_work(args, seq_len, None, bf16_params=True)
    sliding = len(train_gpt.eval_windows(VAL_TOKENS, seq_len, stride)) * seq_len / GPUS
    return seconds / (sliding * token_seconds(work, rates, FORWARD_X))


def predict_eval(env: dict[str, str], rates: Rates, stream: torch.Tensor) -> dict[str, float]:
    """Predicted seconds of each pass of the final evaluation on 8xH100, and their total."""
    args = Hyperparameters.from_env(env)
    work = forward_work(args, args.eval_len, None, bf16_params=False)
    factor = eval_efficiency(rates)
    x = {"roundtrip": FORWARD_X, "sliding": FORWARD_X, "ttt": LORA_X}
    seconds = {name: factor * (EAGER_X if name == "ttt" else 1.0) * n * token_seconds(work, rates, x[name])
               for name, n in eval_tokens(args, stream).items()}
    return {**seconds, "total": sum(seconds.values())}


def routing_ratios(cli: argparse.Namespace, seq_lens: list[int]) -> dict[int, float]:
    env = dict(item.split("=", 1) for item in shlex.split(cli.routing_env))
    paths = sorted(Path(cli.routing_data).glob("fineweb_val_*.bin"))
    if not paths:
        raise FatalError(f"no fineweb_val_*.bin in {cli.routing_data}")
    val = torch.from_numpy(train_gpt.load_data_shard(paths[0], Hyperparameters.vocab_size).astype("int64"))
    return {T: memory_work_over_ideal(cli.routing, env, T, val[: cli.routing_tokens]) for T in seq_lens}


def report(cli: argparse.Namespace, env: dict[str, str]) -> dict:
    rates = calibrate()
    seq_lens = sorted({cli.seq_len, 1024, 2048})
    ratios = routing_ratios(cli, seq_lens) if cli.routing else {}
    rows = {T: {"default": predict(env, T, rates, ratios.get(T), False, cli.rms_norm_fp32),
                "attention": predict({**env, **ATTENTION_ENV}, T, rates, None, False, cli.rms_norm_fp32),
                "baseline": predict(BASELINE_ENV, T, rates, None, True, cli.rms_norm_fp32)} for T in seq_lens}
    return {"rates": rates, "ratios": ratios, "rows": rows}


def json_object(cli: argparse.Namespace, env: dict[str, str], result: dict) -> dict:
    row, T = result["rows"][cli.seq_len], cli.seq_len
    args = Hyperparameters.from_env({**env, "TRAIN_SEQ_LEN": str(T)})
    sparse = args.mem_every > 0 and not memory_is_dense(T, args.mem_chunk, args.mem_topk)
    ratio = result["ratios"].get(T, schedule_bound_ratio(T, args.mem_chunk, args.mem_topk)) if sparse else None
    return {"seq_len": T, "settings": env,
            "predicted_ms_per_step": {name: r["ms_per_step"] for name, r in row.items()},
            "ratio_to_baseline": row["default"]["ms_per_step"] / row["baseline"]["ms_per_step"],
            "ratio_to_attention": row["default"]["ms_per_step"] / row["attention"]["ms_per_step"],
            "memory_work_over_ideal": {"default": ratio},
            "memory_work_source": None if not sparse else f"routing of {cli.routing}" if cli.routing
            else "bound: the schedule's worst case",
            "parts_ms": {name: r["parts_ms"] for name, r in row.items()},
            "steps_in_600s": {name: r["steps_in_600s"] for name, r in row.items()},
            "calibration": {"flash_flops_s": result["rates"].flash_flops_s, "bytes_s": result["rates"].bytes_s},
            "body_dtype": args.body_dtype, "autocast_rules": autocast_rules(cli.rms_norm_fp32)}


def autocast_rules(rms_norm_fp32: bool) -> str:
    return "torch >= 2.12 (rms_norm fp32)" if rms_norm_fp32 else "torch < 2.12 (rms_norm keeps its dtype)"


def print_eval(cli: argparse.Namespace, env: dict[str, str]) -> int:
    if not cli.val_lengths.is_file():
        raise FatalError(f"--val-lengths {cli.val_lengths}: no such shard")
    rates = calibrate()
    seconds = predict_eval(env, rates, golf_val_stream(sample_val_lengths(cli.val_lengths)))
    if cli.json:
        print(json.dumps({"settings": env, "eval_seconds": seconds, "eval_efficiency": eval_efficiency(rates),
                          "eager_x": EAGER_X, "limit_s": TIME_BUDGET_S}))
        return 0
    print(f"final evaluation on 8xH100, predicted (a model, not a measurement; MAX_EVAL_SECONDS's guard is what keeps "
          f"a run inside the limit); settings: {' '.join(f'{k}={v}' for k, v in env.items()) or 'trainer defaults'}")
    print(f"evaluation passes at {eval_efficiency(rates):.2f}x their forward work's time (EVAL_CALIBRATION), LoRA TTT "
          f"{EAGER_X:g}x more (EAGER_X, eager)")
    for name, s in seconds.items():
        print(f"  {name:10}{s:8.1f} s  {s / TIME_BUDGET_S:6.1%} of {TIME_BUDGET_S:.0f} s")
    return 0


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length of the --json object")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--routing", type=Path, help="a trained artifact whose memory routing sets the kernel's work")
    parser.add_argument("--routing-env", default="", help="the settings that artifact was trained with, KEY=VALUE ...")
    parser.add_argument("--routing-data", default=str(ROOT.parent / "shared/data/datasets/fineweb_sample_sp1024"))
    parser.add_argument("--routing-tokens", type=int, default=131_072, help="val tokens routed (full windows)")
    parser.add_argument("--eval", action="store_true", help="predict the final evaluation's seconds instead (sliding "
                        "window and TTT over the 62M-token validation set, documents shaped as --val-lengths')")
    parser.add_argument("--val-lengths", type=Path, default=ROOT.parent / "shared/data/datasets/fineweb_sample_sp1024/"
                        "fineweb_val_000000.bin", help="a val shard whose document lengths, scaled, stand in for the real set's")
    parser.add_argument("--rms-norm-fp32", action="store_true", help="both rows under torch >= 2.12's CUDA autocast, "
                        "which returns rms_norm in fp32 (default: the challenge image's torch 2.9.1 and 2.11)")
    cli = parser.parse_args(argv)
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if k.lower() in Hyperparameters.__dataclass_fields__}
    try:
        if cli.eval:
            return print_eval(cli, env)
        result = report(cli, env)
    except (FatalError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cli.json:
        print(json.dumps(json_object(cli, env, result)))
        return 0
    rates = result["rates"]
    print(f"calibration: attention {rates.flash_flops_s / 1e12:.0f} TFLOP/s, bytes {rates.bytes_s / 1e12:.2f} TB/s "
          f"(eager-count bytes; matmuls at {MATMUL_EFFICIENCY:.0%} of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s)")
    print(f"settings: {' '.join(f'{k}={v}' for k, v in env.items()) or 'trainer defaults'}; "
          f"body {Hyperparameters.from_env(env).body_dtype} (fp32 parameters, CUDA autocast dtypes of "
          f"{autocast_rules(cli.rms_norm_fp32)}); memory work: "
          + (", ".join(f"{r:.2f}x ideal at {T}" for T, r in result["ratios"].items()) if result["ratios"]
             else "the schedule's bound (no --routing)"))
    for T, row in result["rows"].items():
        print(f"\nseq_len {T}")
        print(f"  {'part (ms/step)':16}" + "".join(f"{name:>12}" for name in row))
        for part in row["default"]["parts_ms"]:
            print(f"  {part:16}" + "".join(f"{r['parts_ms'][part]:12.2f}" for r in row.values()))
        for part in sorted({p for r in row.values() for p in r["bytes_ms"]}):
            print(f"  {'  bytes: ' + part:16}" + "".join(f"{r['bytes_ms'].get(part, 0.0):12.2f}" for r in row.values()))
        print(f"  {'total':16}" + "".join(f"{r['ms_per_step']:12.2f}" for r in row.values()))
        print(f"  {'steps in 600 s':16}" + "".join(f"{r['steps_in_600s']:12,}" for r in row.values()))
        print(f"  {'tokens seen':16}" + "".join(f"{r['tokens_seen'] / 1e9:11.2f}B" for r in row.values()))
        print(f"  default / baseline: {row['default']['ms_per_step'] / row['baseline']['ms_per_step']:.3f}; "
              f"default / attention: {row['default']['ms_per_step'] / row['attention']['ms_per_step']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
