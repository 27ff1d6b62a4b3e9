"""bench/gpu_preflight.py on CPU: arguments, failure ranking, the report, and a whole --dry-run."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bench import gpu_preflight as pf
from conftest import FINEWEB_SAMPLE, NO_SHARED, ROOT, SP1024


def stage(name: str, status: str, note: str = "", **facts: str) -> pf.Stage:
    return pf.Stage(name, status, 1.0, note, facts=dict(facts))


def test_failures_are_ranked_by_severity_and_skips_are_not_failures():
    stages = [stage("env", "ok"), stage("aot", "FAILED", "ptxas failed"), stage("train:dense", "FAILED", "error: boom"),
              stage("parity", "FAILED", "FAILED tests/test_ops.py::x"), stage("bench", "skipped", "no time"),
              stage("train:conv1d_only", "cut short", "the budget ran out after 90 s")]
    assert pf.rank_failures(stages) == ["**parity**: FAILED tests/test_ops.py::x", "**train:dense**: error: boom",
                                        "**aot**: ptxas failed"]


def test_first_error_prefers_the_error_line_then_the_exception():
    assert pf.first_error("step:1 ...", "warning: x\nerror: the Triton kernels fail on cuda:0 (...)\n", 2).startswith(
        "error: the Triton kernels")
    assert pf.first_error("", "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA error: out of memory", 1) \
        == "RuntimeError: CUDA error: out of memory"
    assert pf.first_error("", "", 3) == "exit code 3"


def test_report_lists_failures_first_then_environment_stages_and_runs(tmp_path):
    cli = argparse.Namespace(dry_run=True, data=tmp_path, tokenizer=tmp_path / "tok.model", val_tokens=8192,
                             train_seconds=5.0, budget=480.0)
    stages = [pf.Stage("env", "ok", facts={"gpu": "1 x NVIDIA H200", "torch": "2.11.0"}),
              stage("train:default", "ok", **{"ms/step": "300.0", "tokens/s": "1,747,626"}),
              stage("train:dense", "FAILED", "error: the Triton kernels fail on cuda:0"),
              stage("aot", "skipped", "10 s of the budget left, needs at least 10 s")]
    text = pf.render(stages, cli, "python bench/gpu_preflight.py", "2026-12-01T00:00:00")
    assert text.startswith("# GPU preflight (dry run): 1 x NVIDIA H200")
    assert text.index("## What failed") < text.index("1. **train:dense**: error: the Triton kernels") < text.index("## Environment")
    assert "Not run to the end: aot skipped (10 s of the budget left" in text and "| torch | 2.11.0 |" in text
    assert "| default | 300.0 | 1,747,626 |" in text and "default / dense" not in text  # dense has no step time
    stages[2] = stage("train:dense", "ok", **{"ms/step": "400.0", "tokens/s": "1,310,720"})
    assert "default / dense ms/step: **0.750** measured here" in pf.render(stages, cli, "x", "2026-12-01T00:00:00")


@pytest.mark.parametrize("args,needle", [(["--skip", "tests"], "unknown stage(s) in --skip: tests"),
                                         (["--data", "/nonexistent"], "no data at /nonexistent"),
                                         (["--val-tokens", "10"], "--val-tokens at least 4096")])
def test_bad_arguments_exit_2_with_the_reason(args, needle):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_preflight.py"), *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and needle in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not FINEWEB_SAMPLE.is_dir() or not SP1024.is_file(), reason=NO_SHARED)
def test_dry_run_writes_a_complete_report_on_cpu(tmp_path):
    report = tmp_path / "preflight.md"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_preflight.py"), "--dry-run", "--train-seconds", "3",
                          "--val-tokens", "8192", "--skip", "aot", "--out", str(report)], capture_output=True, text=True,
                         timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = report.read_text()
    assert "Nothing failed." in text and "Not run to the end: aot skipped (--skip)." in text
    for section in ("## Environment", "## Stages", "## Training runs", "## Parity tests on the device",
                    "## Kernel benchmark (bench/bench_ops.py)"):
        assert section in text
    rows = [line for line in text.splitlines() if line.startswith(("| default |", "| dense |", "| conv1d_only |"))]
    assert len(rows) == 3 and all(float(row.split("|")[3]) > 0 for row in rows)
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("preflight [")] == [
        f"preflight [{i}/7] {name}" for i, name in enumerate(["env", "parity", "train", "train", "bench", "train", "aot"], 1)]
