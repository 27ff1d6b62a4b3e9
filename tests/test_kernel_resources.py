"""Every Triton kernel compiles for Hopper (sm_90) ahead of time, without a GPU, through the launch options the
wrappers use (bench/kernel_resources.py), and fits the hardware: shared memory within a block's 227 KB."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def compile_rows(*flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces the kernels
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_resources.py"), "--json", *flags], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_default_shapes_compile_for_sm90_without_spills():
    rows = compile_rows()
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_gather_conv_kernel", "_gather_conv_wgrad_kernel", "_fwd_kernel", "_merge_kernel", "_bwd_kernel",
                       "_sum_slots_kernel"}
    cases = {row["case"] for row in rows}
    assert any("T=1024" in c for c in cases) and any("T=2048" in c for c in cases)
    assert any("float32" in c for c in cases) and any("bfloat16" in c for c in cases)
    for row in rows:
        assert "error" not in row, row
        assert row["fits"] and row["shared_bytes"] <= 227 * 1024 and row["blocks_per_sm"] >= 1, row
        if "bfloat16" in row["case"]:
            assert row["spill_bytes"] == 0 and row["stack_bytes"] == 0, row
        if row["kernel"] in ("_fwd_kernel", "_bwd_kernel"):
            assert row["mma"] == "HGMMA", f"{row['kernel']} does not use Hopper's wgmma: {row}"


@pytest.mark.slow
def test_every_admitted_memory_tile_fits_and_the_refused_one_does_not():
    """The sweep's boundary (bench/kernel_resources.py --boundary): the largest admitted tiles fit, the smallest
    refused ones do not all fit. Resources grow with chunk and head dim, so the rest of the grid follows."""
    rows = compile_rows("--boundary")
    pairs = {row["case"].split(" ", 2)[2]: row["admitted"] for row in rows}
    assert pairs == {"D=32 chunk=256 bfloat16": True, "D=64 chunk=128 bfloat16": True, "D=128 chunk=64 bfloat16": True,
                     "D=64 chunk=256 bfloat16": False, "D=128 chunk=128 bfloat16": False}
    for row in rows:
        assert "error" not in row, row
        if row["admitted"]:
            assert row["fits"], f"check_memory_sizes admits a tile that cannot launch: {row}"
    assert not all(r["fits"] for r in rows if not r["admitted"]), "check_memory_sizes refuses a tile that fits"

