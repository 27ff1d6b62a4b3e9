"""The GPU's rules on CPU: CUDA autocast's dtypes, the kernel path under them, the trainer's compile (fullgraph), and
the kernels' self-test. On a CUDA machine the same tests run the real thing: bf16 autocast and compiled kernels."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.backends.distributed import DDPOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import convgpt_ops as ops
import train_gpt as tg
from tools.cuda_autocast import UNPROBED, emulate_cuda_autocast
from test_model import CONFIGS, TRITON_EDGES, random_model, token_batch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device and TRITON_INTERPRET is off: the kernels cannot run")
SMALL_BUCKET_BYTES = 100_000  # the test model holds 0.74 MB of fp32 gradients: several DDP buckets
TORCH = tuple(int(part) for part in torch.__version__.split(".")[:2])  # 2.12.0.dev... counts as 2.12
# functions the emulation may leave unprobed, because both autocasts give them the same dtype: indexing, which no
# list casts, and before torch 2.11 SDPA, bf16 in both (torch 2.9.1 cannot run it on fake CUDA tensors)
SAME_ON_CPU = {"__getitem__", "__setitem__"} | ({"scaled_dot_product_attention"} if TORCH < (2, 11) else set())
RMS_NORM_FP32 = TORCH >= (2, 12)  # CUDA autocast's fp32 list has rms_norm from 2.12 on (pytorch#174824)


def gpu_autocast():
    """The dtype rules a GPU run trains under: CUDA's autocast, emulated on CPU."""
    return tg.autocast(DEVICE) if DEVICE.type == "cuda" else emulate_cuda_autocast()


def gpu_model(name: str) -> tg.ConvGPT:
    """random_model with the residual stream a GPU run gives it (build_model's body_dtype on CUDA: bf16)."""
    model = random_model(CONFIGS[name]).to(DEVICE)
    model.body_dtype = tg.body_dtype(model.args, torch.device("cuda"))
    return model


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def norm_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU emulation of CUDA autocast; a GPU has the real one")
def test_emulation_gives_cuda_autocast_dtypes_where_cpu_autocast_differs():
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(64, 64)
    q = torch.randn(1, 2, 16, 64).bfloat16()
    cases = {
        "rms_norm": (lambda: F.rms_norm(x, (64,)), torch.float32 if RMS_NORM_FP32 else torch.bfloat16, torch.bfloat16),
        "softmax": (lambda: x.softmax(-1), torch.float32, torch.bfloat16),
        "log_softmax": (lambda: F.log_softmax(x, -1), torch.float32, torch.bfloat16),
        "square": (lambda: x.square(), torch.float32, torch.bfloat16),
        "sum": (lambda: x.sum(-1), torch.float32, torch.bfloat16),
        "linear": (lambda: F.linear(x.float(), w), torch.bfloat16, torch.bfloat16),
        "sdpa": (lambda: F.scaled_dot_product_attention(q.float(), q, q), torch.bfloat16, torch.bfloat16),
        "mul": (lambda: x * 2, torch.bfloat16, torch.bfloat16),
    }
    for name, (fn, cuda_dtype, cpu_dtype) in cases.items():
        with emulate_cuda_autocast():
            assert fn().dtype == cuda_dtype, name
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fn().dtype == cpu_dtype, name
    t = torch.tensor([1.0001])
    with emulate_cuda_autocast():
        assert t.to(torch.bfloat16).item() == 1.0 and t.to(torch.float32).item() == t.item()  # casts keep their dtype


@pytest.mark.parametrize("name", ["default", pytest.param("rope_half_untied_relu2", marks=pytest.mark.slow)])
def test_kernel_path_under_cuda_autocast_is_as_accurate_as_the_reference(name):
    """The crash this guards against: rms_norm returns fp32 q and k under CUDA autocast (torch >= 2.12), v stays
    bf16, and the chunk memory refused the mix. Sparse memory is active (T 128, chunks of 16, top-1 or top-2). bf16
    noise in a random model is large (the reference path itself is 5-40% off fp32 in some gradients), so the kernel
    path is held to the reference path's error against an fp32 run without autocast."""
    ids, targets = token_batch(1).to(DEVICE), token_batch(2).to(DEVICE)
    results = []
    for triton, rules in ((False, contextlib.nullcontext), (False, gpu_autocast), (True, gpu_autocast)):
        model = gpu_model(name) if triton or rules is gpu_autocast else random_model(CONFIGS[name]).to(DEVICE)
        tg.set_qat(model, True)
        tg.set_triton(model, triton)
        with rules():
            loss = model(ids, targets)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (fp32_loss, fp32_grads), (ref_loss, ref_grads), (loss, grads) = results
    assert math.isfinite(loss) and abs(loss - fp32_loss) <= 2 * abs(ref_loss - fp32_loss) + 1e-3
    assert all(g.isfinite().all() for g in grads.values())
    kernel_err, ref_err = ([norm_err(g[n], fp32_grads[n]) for n in fp32_grads] for g in (grads, ref_grads))
    assert sum(kernel_err) <= 1.5 * sum(ref_err), (sum(kernel_err), sum(ref_err))
    assert UNPROBED <= SAME_ON_CPU, f"functions whose CUDA dtype the emulation could not learn: {UNPROBED}"


def test_bf16_body_keeps_parameters_fp32_and_the_residual_stream_bf16():
    """BODY_DTYPE=bf16 under CUDA autocast: every block takes and returns bf16, logits and every gradient stay fp32,
    and the loss moves by bf16 rounding only against the fp32 stream (same weights, same autocast)."""
    assert tg.body_dtype(tg.Hyperparameters(), torch.device("cpu")) == torch.float32  # CPU runs have no autocast
    assert tg.body_dtype(tg.Hyperparameters(body_dtype="fp32"), torch.device("cuda")) == torch.float32
    ids, targets = token_batch(1).to(DEVICE), token_batch(2).to(DEVICE)
    losses = {}
    for body in (torch.bfloat16, torch.float32):
        model = gpu_model("default")
        model.body_dtype = body
        seen = []
        for block in model.blocks:
            block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, args[1].dtype, out.dtype)))
        with gpu_autocast():
            logits = model.forward_logits(ids)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        assert seen == [(body, body, body)] * len(model.blocks) and logits.dtype == torch.float32
        assert all(p.dtype == p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())
        losses[body] = loss.item()
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 2e-3 * losses[torch.float32], losses


@pytest.mark.slow
def test_kernel_path_under_cuda_autocast_is_causal():
    """Perturbing tokens after t leaves logits <= t bit-identical; the gradient of logits at t with respect to
    later embeddings is exactly zero. On a GPU this is the compiled kernels' causality test."""
    model = gpu_model("default")
    tg.set_triton(model, True)
    ids = token_batch().to(DEVICE)
    with torch.no_grad(), gpu_autocast():
        full = model.forward_logits(ids)
        for t in TRITON_EDGES:
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, 1024, changed[:, t + 1:].shape, device=DEVICE)
            out = model.forward_logits(changed)
            assert torch.equal(out[:, :t + 1], full[:, :t + 1]), f"position <= {t} saw a later token"
            assert not torch.equal(out[:, t + 1:], full[:, t + 1:])
    captured = {}
    model.tok_emb.register_forward_hook(lambda module, args, out: captured.setdefault("emb", out))
    with gpu_autocast():
        logits = model.forward_logits(ids)
    for t in TRITON_EDGES:
        (grad,) = torch.autograd.grad(logits[:, t].sum(), captured["emb"], retain_graph=True)
        assert (grad[:, t + 1:] == 0).all() and (grad[:, t] != 0).any(), f"logits at {t}"


def compiled_kernel_model(monkeypatch: pytest.MonkeyPatch, **overrides: str) -> tuple[tg.ConvGPT, torch.nn.Module]:
    """build_model as a GPU run does it: COMPILE on, kernels on (interpreted on CPU, through their fake
    registrations while tracing), torch.compile(fullgraph=True) with inductor, so any graph break fails."""
    monkeypatch.setenv("CONVGPT_TRITON", "1")
    env = dict(NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2", TRAIN_SEQ_LEN="128",
               TRAIN_BATCH_TOKENS="1024", MEM_CHUNK="16", MEM_TOPK="2", BIGRAM_BUCKETS="64", BIGRAM_DIM="16",
               COMPILE="1", SEED="3", **overrides)
    args = tg.Hyperparameters.from_env(env)
    lines: list[str] = []
    model, step_model = tg.build_model(args, tg.Dist(0, 1, DEVICE), lines.append)
    assert step_model is not model and any("triton:True" in line and "compile:True" in line for line in lines)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.5)
    tg.set_qat(model, True)
    return model, step_model


def assert_step_matches_eager(model: tg.ConvGPT, step_model: torch.nn.Module) -> None:
    """The step's loss and every gradient equal the eager kernel model's."""
    ids, targets = token_batch(1).to(DEVICE), token_batch(2).to(DEVICE)
    losses, grads = [], []
    for fn in (step_model, model):
        model.zero_grad()
        with tg.autocast(DEVICE):
            loss = fn(ids, targets) if fn is step_model else F.cross_entropy(
                tg.ConvGPT.forward_logits(model, ids).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert all(rel_err(a, b) <= 1e-3 for a, b in zip(*grads))


@pytest.mark.slow
def test_trainer_compiles_the_kernel_model_fullgraph(monkeypatch: pytest.MonkeyPatch):
    """The compiled step equals the eager kernel model in loss and gradients, and so does the compiled
    evaluation forward."""
    model, step_model = compiled_kernel_model(monkeypatch)
    assert_step_matches_eager(model, step_model)
    ids = token_batch(1).to(DEVICE)
    with torch.no_grad(), tg.autocast(DEVICE):
        torch.testing.assert_close(model.forward_logits(ids), tg.ConvGPT.forward_logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_step_split_into_ddp_buckets_keeps_its_gradients(monkeypatch: pytest.MonkeyPatch):
    """What overlaps the gradient all-reduce with the backward on 8 GPUs: the compiled step inside DDP, whose
    DDPOptimizer splits the graph at bucket boundaries (fullgraph still). Small buckets in a one-rank group
    force several splits here; the split graphs keep the loss and every gradient. With parallel blocks (issue 25's
    lever) from block 3 on."""
    torch._dynamo.reset()  # else dynamo reuses an earlier test's graph of this model, which DDP never split
    model, step_model = compiled_kernel_model(monkeypatch, PARALLEL_FROM="3")
    splits: list[int] = []
    compile_fn = DDPOptimizer.compile_fn

    def counting_compile_fn(self, *args, **kwargs):
        compiled = compile_fn(self, *args, **kwargs)
        splits.append(len(self.buckets))
        return compiled

    monkeypatch.setattr(DDPOptimizer, "compile_fn", counting_compile_fn)
    monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", SMALL_BUCKET_BYTES)  # the first bucket's cap (1 MiB)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DDP(step_model, bucket_cap_mb=SMALL_BUCKET_BYTES / 2**20)
        assert_step_matches_eager(model, ddp)
    finally:
        dist.destroy_process_group()
    assert splits and min(splits) >= 3, splits


def test_self_test_passes_on_this_device_and_catches_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch):
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    table = ops.conv_taps(128, 4, 3)
    tables, memory = (table, ops.conv_taps_inverse(table)), (2, 1, 16, 16)
    ops.self_test_kernels(DEVICE, dtype, tables, 32, memory)
    real = ops.launch_gather
    monkeypatch.setattr(ops, "launch_gather", lambda *a: tuple(x * 1.1 for x in real(*a)))
    with pytest.raises(RuntimeError, match="gather_conv on .* differs from its reference"):
        ops.self_test_kernels(DEVICE, dtype, tables, 32, None)
    monkeypatch.setattr(ops, "launch_gather", real)
    real_wgrad = ops.launch_gather_wgrad
    monkeypatch.setattr(ops, "launch_gather_wgrad", lambda *a: real_wgrad(*a) * 1.1)  # a wrong backward only
    with pytest.raises(RuntimeError, match="gather_conv on .* differs from its reference"):
        ops.self_test_kernels(DEVICE, dtype, tables, 32, None)
    monkeypatch.setattr(ops, "launch_memory_forward", lambda *a: (_ for _ in ()).throw(RuntimeError("launch failed")))
    with pytest.raises(RuntimeError, match="launch failed"):
        ops.self_test_kernels(DEVICE, dtype, None, 32, memory)
