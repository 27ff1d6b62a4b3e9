"""bench/bench_ops.py runs anywhere with --small and prints its table (timings are not asserted: speed belongs
in the benchmark's output, not in tests); the worst-case size bound; bench/compressors.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import quantize as Q
from conftest import ROOT


def test_bench_small_prints_every_row():
    env = {**os.environ, "CONVGPT_TRITON": "0"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ops.py"), "--small"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("device:cpu") and "triton off" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert {" ".join(r[1:-1]) for r in rows} == {"conv ref", "memory ref", "dense sdpa", "step default", "step dense"}
    assert {r[0] for r in rows} == {"64", "128"} and all(float(r[-1]) > 0 for r in rows)


@pytest.mark.parametrize("kind,k", [("int6", 12.85), ("int6", 8.0), ("int8", 20.0)])
def test_gaussian_rows_bound_the_bytes_of_other_rows_at_the_same_clip(kind, k):
    """bench/worst_case_size.py's premise: at a clip of k x the row's rms, Gaussian rows cost the most bytes."""
    g = torch.Generator().manual_seed(0)
    shape = (256, 1024)
    rows = {
        "gaussian": torch.randn(shape, generator=g),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample(shape),
        "student_t3": torch.distributions.StudentT(3.0).sample(shape),
        "uniform": torch.rand(shape, generator=g) - 0.5,
        "mixed_scales": torch.randn(shape, generator=g) * torch.where(torch.rand(shape, generator=g) < 0.1, 5.0, 0.5),
    }
    size = {name: len(Q.pack(Q.quantize_state_dict({"w": w}, {"w": kind}, {"w": k}))) for name, w in rows.items()}
    assert all(size[name] < size["gaussian"] for name in rows if name != "gaussian"), size


def test_compressor_bench_rows_and_the_choice_of_zstd(tmp_path):
    """bench/compressors.py rebuilds the artifact's own bytes (zstd, header last, codes as stored: +0.00%) and
    holds the decision: no other compressor, layout or transform beats the artifact by 1% on Gaussian rows."""
    sd = {f"b{i}.w": torch.randn(256, 512, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    sd["b0.s"] = torch.rand(512)
    plan = {name: "int6" if name.endswith(".w") else "fp16" for name in sd}
    artifact = tmp_path / "gauss.ptz"
    artifact.write_bytes(Q.pack(Q.quantize_state_dict(sd, plan, {n: 12.85 for n, kind in plan.items() if kind == "int6"})))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compressors.py"), "--artifact", str(artifact), "--json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 * 3 * 3
    own = [r for r in rows if (r["layout"], r["transform"], r["compressor"]) == ("header_last", "none", "zstd")]
    assert own[0]["bytes"] == artifact.stat().st_size and own[0]["vs_artifact"] == 0
    assert min(r["vs_artifact"] for r in rows) > -0.01 and max(r["vs_artifact"] for r in rows) > 0.01


@pytest.mark.parametrize("args,needle", [(["--compressors", "zstd,lz4", "--gaussian"], "unknown compressor 'lz4'"),
                                         ([], "nothing to measure"),
                                         (["--artifact", "missing.ptz"], "missing.ptz")])
def test_compressor_bench_bad_input_is_one_line(args, needle, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compressors.py"), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
