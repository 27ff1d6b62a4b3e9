"""bench/bench_ops.py runs anywhere with --small and prints its table (timings are not asserted: speed belongs
in the benchmark's output, not in tests)."""

from __future__ import annotations

import os
import subprocess
import sys

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
