"""bench/gpu_preflight.py on CPU: arguments, failure ranking, the report, and a whole --dry-run."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bench import gpu_preflight as pf
from conftest import FINEWEB_SAMPLE, NO_SHARED, ROOT, SP1024
from data.common import write_shard

# Stdout in the format of the upstream baseline (openai/parameter-golf train_gpt.py at 4908dc4), one process, 45 s.
BASELINE_LOG = """logs/preflight_baseline.txt
model_params:17059912
world_size:1 grad_accum_steps:8
train_batch_tokens:524288 train_seq_len:1024 iterations:20000 warmup_steps:3 max_wallclock_seconds:45.000
step:10/20000 train_loss:5.1234 train_time:3480ms step_avg:348.00ms
step:129/20000 val_loss:3.9000 val_bpb:2.3100 train_time:45150ms step_avg:350.00ms
stopping_early: wallclock_cap train_time:45150ms step:129/20000
peak memory allocated: 10240 MiB reserved: 10600 MiB
Total submission size int8+zlib: 9876543 bytes
final_int8_zlib_roundtrip val_loss:3.9100 val_bpb:2.3200 eval_time:900ms
final_int8_zlib_roundtrip_exact val_loss:3.91000000 val_bpb:2.32004321
"""
# A stand-in for the baseline on CPU: it checks the settings the preflight must give the real one, then prints its
# log lines (step_avg from FAKE_STEP_MS); FAKE_FAIL makes it die as the real one does without CUDA, FAKE_NO_VAL
# leaves out the line that closes training.
FAKE_BASELINE = textwrap.dedent("""
    import os
    from pathlib import Path
    if os.environ.get("FAKE_FAIL"):
        raise RuntimeError("CUDA is required")
    env = os.environ
    val = Path(env["DATA_PATH"], "fineweb_val_000000.bin")
    assert (val.stat().st_size - 1024) // 2 == int(env["FAKE_VAL_TOKENS"]), "not the preflight's validation slice"
    assert env["VAL_LOSS_EVERY"] == "0" and env["MAX_WALLCLOCK_SECONDS"] == env["FAKE_SECONDS"], "settings"
    assert Path(env["TOKENIZER_PATH"]).is_file() and env["RUN_ID"] == "preflight_baseline", "paths"
    Path("logs").mkdir(exist_ok=True)
    Path("logs", env["RUN_ID"] + ".txt").write_text("a log")
    ms = float(env["FAKE_STEP_MS"])
    print("model_params:1234")
    print(f"train_batch_tokens:{env['TRAIN_BATCH_TOKENS']} train_seq_len:{env['TRAIN_SEQ_LEN']} iterations:20000")
    print(f"step:1/20000 train_loss:6.9 train_time:{ms:.0f}ms step_avg:{ms:.2f}ms")
    if not env.get("FAKE_NO_VAL"):
        print(f"step:7/20000 val_loss:6.5 val_bpb:3.8765 train_time:{7 * ms:.0f}ms step_avg:{ms:.2f}ms")
    print("peak memory allocated: 77 MiB reserved: 80 MiB")
    print("Total submission size int8+zlib: 56789 bytes")
    print("final_int8_zlib_roundtrip_exact val_loss:6.50000000 val_bpb:3.88000000")
""")


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


def test_baseline_log_fills_the_training_table_and_the_default_over_baseline_ratio(tmp_path):
    facts = pf.baseline_facts(BASELINE_LOG)
    assert facts == {"tokens/step": "524,288", "ms/step": "350.0", "tokens/s": "1,497,966", "steps": "129",
                     "peak MiB": "10240", "prequant bpb": "2.3100", "roundtrip bpb": "2.3200",
                     "artifact bytes": "9,876,543", "params": "17,059,912"}
    with pytest.raises(ValueError, match="no `train_batch_tokens:` line or no final"):
        pf.baseline_facts(BASELINE_LOG.replace("step:129/20000 val_loss", "step:129/20000 train_loss"))
    cli = argparse.Namespace(dry_run=False, data=tmp_path, tokenizer=tmp_path / "tok.model", val_tokens=262_144,
                             train_seconds=45.0, budget=480.0)
    ours = {"tokens/step": "524,288", "ms/step": "280.0", "compile s": "61.0", "sliding bpb": "2.2000"}
    stages = [pf.Stage("env", "ok"), stage("train:default", "ok", **ours), stage("train:baseline", "ok", **facts)]
    text = pf.render(stages, cli, "x", "2026-12-01T00:00:00")
    header = next(line for line in text.splitlines() if line.startswith("| config |"))
    assert header == ("| config | tokens/step | ms/step | compile s | sliding bpb | tokens/s | steps | peak MiB | "
                      "prequant bpb | roundtrip bpb | artifact bytes | params |")
    assert "| default | 524,288 | 280.0 | 61.0 | 2.2000 | - | - | - | - | - | - | - |" in text
    assert "| baseline | 524,288 | 350.0 | - | - | 1,497,966 | 129 | 10240 | 2.3100 | 2.3200 | 9,876,543 |" in text
    assert "default / baseline ms/step: **0.800** measured here" in text and "default / dense" not in text
    stages[1] = stage("train:default", "FAILED", "error: boom")
    assert "default / baseline" not in pf.render(stages, cli, "x", "2026-12-01T00:00:00")


def run_preflight(tmp_path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """gpu_preflight.py --dry-run on a generated 8,192-token val shard, with extra arguments and environment."""
    data = tmp_path / "shards"
    data.mkdir(exist_ok=True)
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        write_shard(data / name, np.arange(20_000) % 1024)
    (tmp_path / "tok.model").write_bytes(b"not read by the fake baseline")
    report = tmp_path / "preflight.md"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_preflight.py"), "--dry-run", "--data", str(data),
                          "--tokenizer", str(tmp_path / "tok.model"), "--val-tokens", "8192", "--train-seconds", "3",
                          "--out", str(report), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "FAKE_VAL_TOKENS": "8192", "FAKE_SECONDS": "3.0", **env})
    return out, report.read_text() if report.is_file() else ""


def test_a_fake_baseline_is_run_read_and_a_failing_or_missing_one_fails_its_stage_only(tmp_path):
    fake = tmp_path / "baseline_train_gpt.py"
    fake.write_text(FAKE_BASELINE)
    only = ["--skip", "env,parity,train,bench,aot", "--baseline", str(fake)]
    out, text = run_preflight(tmp_path, *only, FAKE_STEP_MS="12.5")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Nothing failed." in text and "| train:baseline | ok |" in text
    assert "| baseline | 2,048 | 12.5 | 163,840 | 7 | 77 | 3.8765 | 3.8800 | 56,789 | 1,234 |" in text  # dry shapes
    assert not (tmp_path / "logs").exists() and not (ROOT / "logs" / "preflight_baseline.txt").exists()
    out, text = run_preflight(tmp_path, *only, FAKE_FAIL="1")
    assert out.returncode == 1 and "1. **train:baseline**: RuntimeError: CUDA is required" in text
    assert "2. " not in text and "## Training runs" not in text
    out, text = run_preflight(tmp_path, *only, FAKE_STEP_MS="12.5", FAKE_NO_VAL="1")  # exits 0, training unfinished
    assert out.returncode == 1 and "1. **train:baseline**: unreadable log: no `train_batch_tokens:` line or no" in text
    out, text = run_preflight(tmp_path, "--skip", "env,parity,train,bench,aot", "--baseline", str(tmp_path / "nope.py"))
    assert out.returncode == 1 and f"1. **train:baseline**: no baseline at {tmp_path / 'nope.py'}" in text
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("preflight [")] == [
        f"preflight [{i}/8] {name}"
        for i, name in enumerate(["env", "parity", "train", "train", "train", "bench", "train", "aot"], 1)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_the_baseline_is_skipped_when_the_env_stage_finds_no_gpu(tmp_path):
    fake = tmp_path / "baseline_train_gpt.py"
    fake.write_text(FAKE_BASELINE)
    out, text = run_preflight(tmp_path, "--skip", "parity,train,bench,aot", "--baseline", str(fake), FAKE_FAIL="1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| train:baseline | skipped | 0 | the env stage found no CUDA device; the baseline requires one |" in text


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
    header = next(line for line in text.splitlines() if line.startswith("| config") and "ttt bpb" in line).split("|")
    ttt = [row.split("|")[header.index(" ttt bpb ")].strip() for row in rows]
    assert float(ttt[0]) > 0 and ttt[1:] == ["-", "-"]  # TTT's GPU time is measured on the default only
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("preflight [")] == [
        f"preflight [{i}/7] {name}" for i, name in enumerate(["env", "parity", "train", "train", "bench", "train", "aot"], 1)]
