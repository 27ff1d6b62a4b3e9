"""bench/ablate.py: real tiny runs become table rows with deltas; failed runs become rows with their error."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT, TINY_ENV

sys.path.insert(0, str(ROOT / "bench"))
import ablate  # noqa: E402


def harness_args(smoke_data, tmp_path, configs: str, *extra: str) -> list[str]:
    overrides = [f"--env={k}={v}" for k, v in TINY_ENV.items() if k not in ("SEED", "MAX_WALLCLOCK_SECONDS")]
    return ["--scale", "tiny", "--configs", configs, "--seeds", "1,2", "--seconds", "60", *overrides, *extra,
            "--data", str(smoke_data["data"]), "--tokenizer", str(smoke_data["tokenizer"]),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results.md")]


def test_two_configs_two_seeds_make_a_table(smoke_data, tmp_path):
    assert ablate.main(harness_args(smoke_data, tmp_path, "default,conv1d_only")) == 0
    text = (tmp_path / "results.md").read_text()
    assert "- hardware: 1xcpu" in text and "--configs default,conv1d_only" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "config" not in line}
    assert set(rows) == {"default", "conv1d_only"}
    assert rows["default"][-1] == "-" and rows["conv1d_only"][0] == "MEM_EVERY=0 CONV2D_K=0"
    assert int(rows["default"][1].replace(",", "")) > int(rows["conv1d_only"][1].replace(",", ""))
    assert rows["conv1d_only"][-1].startswith(("+", "-")) and "+-" in rows["conv1d_only"][-1]
    assert rows["default"][4] == "6" and float(rows["default"][6].split()[0]) > 0
    assert sorted(p.name for p in (tmp_path / "work").glob("*.ptz")) == [
        "conv1d_only_seed1.ptz", "conv1d_only_seed2.ptz", "default_seed1.ptz", "default_seed2.ptz"]


def test_failed_runs_become_rows_with_their_error(smoke_data, tmp_path):
    assert ablate.main(harness_args(smoke_data, tmp_path, "dense", "--env=NUM_LAYERS=two")) == 1
    assert "| dense | MEM_EVERY=1 MEM_TOPK=1000000 | failed: error: NUM_LAYERS='two' is not a valid int |" in \
        (tmp_path / "results.md").read_text()


def test_unknown_config_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--configs", "default,nope", "--out", "x.md"])
    assert exit_info.value.code == 2 and "unknown configuration(s) nope" in capsys.readouterr().err


def test_relative_paths_resolve_before_runs_change_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = ablate.parse_args(["--data", "d", "--tokenizer", "t.model", "--work", "w", "--out", "r.md"])
    assert (cli.data, cli.tokenizer, cli.work) == (str(tmp_path / "d"), str(tmp_path / "t.model"), tmp_path / "w")
