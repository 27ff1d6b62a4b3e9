"""Shared fixtures: the repo on sys.path, Triton's interpreter on CPU-only machines, a small generated dataset,
and a runner for train_gpt.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: its kernels then run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Threads for each test process and the trainers it starts. Under `pytest -n N` the cores are shared out: OpenMP's
# spinning threads, oversubscribed, made the 2-thread FineWeb run 7x slower (51 s -> 345 s on 2 cores).
TEST_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
    torch.set_num_threads(TEST_THREADS)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
SP1024 = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
FINEWEB_SAMPLE = SHARED_DATA / "datasets" / "fineweb_sample_sp1024"
NO_SHARED = f"real data absent: {SHARED_DATA} (the challenge tokenizer and FineWeb sample live in ../shared/data)"

# A model small enough that a few CPU steps take about a second; grad accumulation 8 x [2, 64]. TTT is off here
# (a few seconds a run); the runs that stand for the default turn it on with TTT_ON.
TINY_ENV = dict(
    NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="1", NUM_KV_HEADS="1", MLP_MULT="2", TRAIN_SEQ_LEN="64",
    TRAIN_BATCH_TOKENS="1024", MEM_CHUNK="16", MEM_TOPK="1", ITERATIONS="6", WARMUP_STEPS="1",
    WARMDOWN_ITERS="3", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0", VAL_BATCH_SIZE="8192", EVAL_STRIDE="32",
    MAX_WALLCLOCK_SECONDS="0", COMPILE="0", SEED="7", BIGRAM_BUCKETS="64", BIGRAM_DIM="16", TTT_EPOCHS="0",
)


TTT_ON = dict(TTT_EPOCHS="1", TTT_DOC_CHUNK="32")  # the default's LoRA TTT, in chunks that fit a TINY_ENV window


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic dataset (about 65k train / 13k val tokens) and its vocab-1024 tokenizer."""
    from data.make_smoke_data import make_smoke_dataset

    root = tmp_path_factory.mktemp("smoke")
    make_smoke_dataset(root / "ds", root / "tok.model", seed=3, train_docs=300, val_docs=60, log=None)
    return {"data": root / "ds", "tokenizer": root / "tok.model"}


def trainer_env(smoke_data: dict[str, Path], workdir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TINY_ENV, DATA_PATH=str(smoke_data["data"]), TOKENIZER_PATH=str(smoke_data["tokenizer"]),
               ARTIFACT_PATH=str(workdir / "model.ptz"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def run_trainer(env: dict[str, str], workdir: Path, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train_gpt.py in workdir (logs land in workdir/logs); with nproc > 1 through torchrun (gloo)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / "train_gpt.py")], env=env, cwd=workdir, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(smoke_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished TINY_ENV run (EMA, QAT, export, evaluation): its artifact, log and tokenizer, for the tools that
    read artifacts (tools/sample.py, tools/export_hf.py). Routing runs: 64 tokens are 4 chunks of 16, top-1."""
    root = tmp_path_factory.mktemp("tiny_run")
    result = run_trainer(trainer_env(smoke_data, root, RUN_ID="tiny", **TTT_ON), root)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"artifact": root / "model.ptz", "log": root / "logs" / "tiny.txt", "tokenizer": smoke_data["tokenizer"]}


def log_values(text: str, prefix: str) -> dict[str, str]:
    """key:value pairs of the last log line whose first word is prefix."""
    lines = [line for line in text.splitlines() if line.split(" ", 1)[0] == prefix]
    assert lines, f"no line starting with {prefix!r} in:\n{text}"
    return dict(re.findall(r"(\w+):(\S+)", lines[-1]))


def train_losses(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step:\d+/\d+ train_loss:(\S+)", text, re.M)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (stable otherwise): `pytest -n N` hands tests out in this order, so the long ones start
    early and the short ones fill the gaps at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs, long interpreter runs and compiles; the everyday tier "
                                       "is `pytest -m 'not slow'`, the full suite (README, CI) runs them too")
