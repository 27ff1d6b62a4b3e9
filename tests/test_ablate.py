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


@pytest.mark.slow
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


@pytest.mark.slow
def test_step_budget_parallel_jobs_and_ttt_headline(smoke_data, tmp_path):
    args = harness_args(smoke_data, tmp_path, "default,ttt", "--steps", "3", "--jobs", "2", "--env=TTT_CHUNK_TOKENS=4096")
    assert ablate.main(args) == 0
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Ablation, tiny scale, 3 training steps per run") and "runs at once: 2" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "config" not in line}
    assert rows["default"][4] == rows["ttt"][4] == "3"
    logs = {p.name: p.read_text() for p in (tmp_path / "work" / "logs").glob("*.txt")}
    ttt = ablate.parse_log(logs["ttt_seed1.txt"])
    assert ttt.ttt is not None and ttt.score == ttt.ttt != ttt.sliding and "hp ttt_epochs:3" in logs["ttt_seed1.txt"]
    assert float(rows["ttt"][6].split()[0]) != float(rows["ttt"][5].split()[0]) and float(rows["ttt"][7]) > 0


def test_doubled_sequence_configs_follow_the_scale():
    assert ablate.config_env("train_seq_x2", "tiny") == {"TRAIN_SEQ_LEN": "512", "EVAL_SEQ_LEN": "512"}
    assert ablate.config_env("eval_seq_x2", "golf") == {"EVAL_SEQ_LEN": "2048"}
    assert ablate.config_env("no_bigram", "golf") == {"BIGRAM_BUCKETS": "0"}
