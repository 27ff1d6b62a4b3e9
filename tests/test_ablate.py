"""bench/ablate.py: real tiny runs become table rows with deltas; failed runs become rows with their error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_ENV

sys.path.insert(0, str(ROOT / "bench"))
import ablate  # noqa: E402
from bench import configs as bench_configs  # noqa: E402


def harness_args(smoke_data, tmp_path, configs: str, *extra: str) -> list[str]:
    overrides = [f"--env={k}={v}" for k, v in TINY_ENV.items() if k not in ("SEED", "MAX_WALLCLOCK_SECONDS", "TTT_EPOCHS")]
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
    assert rows["default"][5] == "6" and float(rows["default"][7].split()[0]) > 0
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
    args = harness_args(smoke_data, tmp_path, "default,ttt", "--steps", "3", "--jobs", "2")
    assert ablate.main(args) == 0
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Ablation, tiny scale, 3 training steps per run") and "runs at once: 2" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "config" not in line}
    assert rows["default"][5] == rows["ttt"][5] == "3"
    logs = {p.name: p.read_text() for p in (tmp_path / "work" / "logs").glob("*.txt")}
    ttt = ablate.parse_log(logs["ttt_seed1.txt"])
    assert ttt.ttt is not None and ttt.score == ttt.ttt != ttt.sliding and "hp ttt_epochs:1" in logs["ttt_seed1.txt"]
    assert ablate.parse_log(logs["default_seed1.txt"]).ttt is None  # the tiny scale turns TTT off
    assert float(rows["ttt"][7].split()[0]) != float(rows["ttt"][6].split()[0]) and float(rows["ttt"][8]) > 0


def test_doubled_sequence_configs_follow_the_scale():
    assert ablate.config_env("train_seq_x2", "tiny") == {"TRAIN_SEQ_LEN": "512", "EVAL_SEQ_LEN": "512"}
    assert ablate.config_env("eval_seq_x2", "golf") == {"EVAL_SEQ_LEN": "2048"}
    assert ablate.config_env("no_bigram", "golf") == {"BIGRAM_BUCKETS": "0"}
    assert ablate.config_env("shape_9x3", "golf") == {"NUM_LAYERS": "9", "MLP_MULT": "3"}
    assert ablate.config_env("shape_9x3", "proxy") == {"NUM_LAYERS": "5", "MLP_MULT": "3"}
    assert set(bench_configs.SHAPES["shape_9x3"]) == set(ablate.SCALES)  # every scale has its share


def proxy_args(tmp_path, data, *extra: str) -> list[str]:
    return ["--scale", "proxy", "--data", str(data), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.md"), *extra]


def test_proxy_scale_keeps_the_golf_sequence_geometry():
    proxy, golf = ablate.SCALES["proxy"], ablate.Hyperparameters()
    assert (int(proxy["TRAIN_SEQ_LEN"]), int(proxy["MEM_CHUNK"]), int(proxy["MEM_TOPK"])) == \
        (golf.train_seq_len, golf.mem_chunk, golf.mem_topk)
    assert int(proxy["TRAIN_BATCH_TOKENS"]) == 8 * int(proxy["TRAIN_SEQ_LEN"])  # 8 micro-batches of one sequence
    args = ablate.Hyperparameters.from_env(proxy)
    assert args.eval_len == 1024 and args.head_dim == 64 and (args.train_seq_len - 1) // args.mem_chunk > args.mem_topk
    assert ablate.config_env("eval_seq_x2", "proxy") == {"EVAL_SEQ_LEN": "2048"}


def test_proxy_scale_needs_data_and_writes_one_validation_slice(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablate.parse_args(["--scale", "proxy", "--out", "x.md"])
    assert exit_info.value.code == 2 and "--data is required" in capsys.readouterr().err
    from data.common import read_shard, write_shard

    src = tmp_path / "src"
    src.mkdir()
    write_shard(src / "fineweb_train_000000.bin", np.arange(50, dtype=np.uint16))
    write_shard(src / "fineweb_val_000000.bin", np.arange(100_000, dtype=np.uint32) % 1000)
    write_shard(src / "fineweb_val_000001.bin", np.full(40_000, 7))
    cli = ablate.parse_args(proxy_args(tmp_path, src))
    stale = tmp_path / "work" / "data_val131072" / "fineweb_train_000009.bin"  # from an earlier --data, now broken
    stale.parent.mkdir(parents=True)
    stale.symlink_to(tmp_path / "gone.bin")
    ablate.prepare_data(cli)
    folder = Path(cli.data)
    assert folder == tmp_path / "work" / "data_val131072"
    assert sorted(p.name for p in folder.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert (folder / "fineweb_train_000000.bin").resolve() == (src / "fineweb_train_000000.bin").resolve()
    val = read_shard(folder / "fineweb_val_000000.bin")
    assert val.size == 131_073 and val[99_999] == 999 and (val[100_000:] == 7).all()
    (src / "fineweb_val_000001.bin").unlink()
    with pytest.raises(SystemExit, match="holds 100000 val tokens; the proxy scale scores the first 131073"):
        ablate.prepare_data(ablate.parse_args(proxy_args(tmp_path, src)))


def test_flops_column_counts_each_configuration():
    cli = ablate.parse_args(["--scale", "proxy", "--data", "d", "--out", "x.md"])
    values = {name: float(ablate.forward_mflops(name, cli)) for name in ("default", "topk8", "dense", "conv1d_only")}
    assert values["conv1d_only"] < values["default"] < values["topk8"] < values["dense"]
    cli.env = ["NUM_LAYERS=two"]
    assert ablate.forward_mflops("default", cli).startswith("- (NUM_LAYERS='two' is not a valid int")


@pytest.mark.slow
def test_eval_at_resume_and_plot(smoke_data, tmp_path, capsys):
    args = harness_args(smoke_data, tmp_path, "default,dense", "--steps", "2", "--seeds", "1", "--eval-at", "128",
                        "--eval-configs", "default", "--env=VAL_LOSS_EVERY=1", "--plot", str(tmp_path / "curves.png"))
    assert ablate.main(args) == 0
    text = (tmp_path / "results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| config"))
    assert "fwd MFLOP/tok" in header and "headline @128" in header and "@128 - @train" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "config" not in line}
    assert rows["dense"][-2:] == ["-", "-"] and float(rows["default"][-2].split()[0]) > 0
    assert rows["default"][-1].startswith(("+", "-")) and float(rows["default"][2]) < float(rows["dense"][2])
    evaluated = ablate.parse_log((tmp_path / "work" / "logs" / "default_seed1_eval128.txt").read_text())
    assert evaluated.hp["eval_only"] == "True" and evaluated.hp["eval_seq_len"] == "128" and evaluated.stop is None
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    logs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "logs").glob("*.txt")}
    capsys.readouterr()
    assert ablate.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert out.count(" reused:") == 3 and " exit:" not in out
    assert [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("|")] == table
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "logs").glob("*.txt")} == logs
    # a log of other settings is never reused: ablate.reusable, tested below (GPTQ=1, TTT_EPOCHS=1 give None)
    (tmp_path / "work" / "logs" / "default_seed1.txt").unlink()  # retrained: its eval log must not be reused either
    assert ablate.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "default_seed1 exit:0" in out and "default_seed1_eval128 exit:0" in out and "dense_seed1 reused:" in out


def on_todays_grid(text: str) -> str:
    """A committed proxy log (row-max grid, CLIP_SEARCH) as if it had exported on the default rms grid."""
    grid = "".join(f"hp {name}:{getattr(ablate.Hyperparameters, name)}\n"
                   for name in ("matrix_clip_k", "bigram_clip_k", "embed_clip_k"))
    return grid + "".join(line for line in text.splitlines(keepends=True) if not line.startswith("hp clip_search"))


def test_resume_never_reuses_a_log_from_the_row_max_grid(tmp_path):
    """Logs from before the rms grid (CLIP_SEARCH, no clip k) exported a grid that today's code cannot: no reuse,
    with or without the retired CLIP_SEARCH line; the same log on today's grid is reused."""
    full = (ROOT / "bench" / "results" / "proxy_logs" / "default_seed1.txt").read_text()
    env = {key.upper(): value for key, value in ablate.parse_log(full, str(tmp_path)).hp.items() if key != "clip_search"}
    env["PARALLEL_FROM"] = "0"
    no_search = "".join(line for line in full.splitlines(keepends=True) if not line.startswith("hp clip_search"))
    for name, text, reused in (("old", full, False), ("no_search", no_search, False), ("today", on_todays_grid(full), True)):
        log = tmp_path / f"{name}.txt"
        log.write_text(text)
        assert (ablate.reusable(log, env, 1) is not None) == reused, name


def test_resume_reads_a_setting_missing_from_an_older_log_as_its_default(tmp_path):
    """A log written before GPTQ, TTT_MODE (since deleted) and PRESET existed (a committed proxy log without those lines) is reused
    while those settings stay at their defaults, and not when one of them is set, or when the log names an unknown
    setting."""
    full = on_todays_grid((ROOT / "bench" / "results" / "proxy_logs" / "default_seed1.txt").read_text())
    log = tmp_path / "older.txt"
    log.write_text("".join(line for line in full.splitlines(keepends=True)
                           if not line.startswith(("hp gptq", "hp ttt_mode", "hp ttt_lora", "hp preset"))))
    run = ablate.parse_log(log.read_text(), str(log))
    assert "gptq" not in run.hp and "ttt_mode" not in run.hp
    env = {key.upper(): value for key, value in run.hp.items()} | {"PARALLEL_FROM": "0"}  # what it trained (below)
    assert ablate.reusable(log, env, run.world_size) is not None
    assert ablate.reusable(log, {**env, "GPTQ": "1"}, run.world_size) is None
    assert ablate.reusable(log, {**env, "TTT_LORA_RANK": "4", "MAX_EVAL_SECONDS": "60"}, run.world_size) is not None  # TTT off
    assert ablate.reusable(log, {**env, "TTT_EPOCHS": "1"}, run.world_size) is None
    sgd_ttt = tmp_path / "sgd_ttt.txt"  # TTT on in a mode since deleted: nothing today computes that score
    sgd_ttt.write_text(log.read_text().replace("hp ttt_epochs:0\n", "hp ttt_epochs:1\nhp ttt_mode:sgd\n"))
    assert "hp ttt_mode:sgd" in sgd_ttt.read_text() and ablate.reusable(sgd_ttt, {**env, "TTT_EPOCHS": "1"}, run.world_size) is None
    assert ablate.reusable(log, env, run.world_size + 1) is None
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("hp no_such_setting:1\n" + log.read_text())
    assert ablate.reusable(unknown, env, run.world_size) is None
    assert ablate.reusable(log, env, run.world_size, cuda_rules=True) is None  # trained without tools/cuda_rules.py
    emulated = tmp_path / "emulated.txt"
    emulated.write_text("cuda_rules:emulated autocast:cuda_bf16 body_dtype:as_on_cuda\n" + log.read_text())
    assert ablate.reusable(emulated, env, run.world_size, cuda_rules=True) is not None
    assert ablate.reusable(emulated, env, run.world_size) is None


def test_resume_reads_an_older_log_by_what_it_trained_not_by_todays_defaults(tmp_path):
    """A log from before PARALLEL_FROM trained sequential blocks: it serves PARALLEL_FROM=0, not today's default
    (-2). A log naming a deleted lever serves today's code only when the lever was off."""
    full = on_todays_grid((ROOT / "bench" / "results" / "proxy_logs" / "default_seed1.txt").read_text())
    assert "hp parallel_from" not in full
    log = tmp_path / "before.txt"
    log.write_text(full)
    env = {key.upper(): value for key, value in ablate.parse_log(full, str(log)).hp.items()}
    assert ablate.reusable(log, env, 1) is None
    assert ablate.reusable(log, {**env, "PARALLEL_FROM": "0"}, 1) is not None
    for line, reused in (("hp mem_conv:0", True), ("hp mem_conv:4", False), ("hp fuse_gate:16", False),
                         ("hp route_pre_rope:False", True), ("hp recur:", True), ("hp recur:2-3x2", False)):
        retired = tmp_path / "retired.txt"
        retired.write_text(line + "\n" + full)
        assert (ablate.reusable(retired, {**env, "PARALLEL_FROM": "0"}, 1) is not None) == reused, line


def test_equal_time_steps_share_the_reference_time():
    assert ablate.equal_time_steps(300, 45.3, 45.3) == 300
    assert ablate.equal_time_steps(300, 45.3, 52.1) == round(300 * 45.3 / 52.1) == 261
    assert ablate.equal_time_steps(300, 45.3, 30.2) == 450  # a cheaper step gets more steps
    assert ablate.equal_time_steps(3, 1.0, 100.0) == 1


def test_equal_time_budgets_follow_the_predicted_step_times(monkeypatch):
    monkeypatch.setattr(ablate, "predicted_ms", lambda names: {"default": 40.0, "dense": 50.0, "conv1d_only": 32.0})
    cli = ablate.parse_args(["--configs", "dense,conv1d_only", "--steps", "200", "--equal-time", "--out", "x.md"])
    assert ablate.step_budgets(["dense", "conv1d_only"], cli) == {"dense": 160, "conv1d_only": 250}
    other = ablate.parse_args(["--configs", "default,conv1d_only", "--steps", "200", "--equal-time", "--reference",
                               "dense", "--out", "x.md"])
    assert ablate.step_budgets(["default", "conv1d_only"], other) == {"default": 250, "conv1d_only": 312}
    plain = ablate.parse_args(["--configs", "dense", "--steps", "200", "--out", "x.md"])
    assert ablate.step_budgets(["dense"], plain) == {"dense": 200}
    with pytest.raises(SystemExit):
        ablate.parse_args(["--steps", "9", "--equal-time", "--reference", "nope", "--out", "x.md"])


def test_predicted_step_times_map_each_configuration_to_its_golf_shape():
    ms = ablate.predicted_ms(["default", "dense", "train_seq_x2", "conv1d_only", "sequential"])
    assert 1.05 < ms["dense"] / ms["default"] < 1.4  # cost_model_8xh100.md: default / attention 0.871 at 1024
    assert ms["conv1d_only"] < ms["default"] < ms["train_seq_x2"]
    assert ms["sequential"] == pytest.approx(ms["default"])


@pytest.mark.slow
def test_equal_time_table_gives_each_configuration_its_share(smoke_data, tmp_path):
    args = harness_args(smoke_data, tmp_path, "default,dense", "--steps", "6", "--equal-time")
    args[args.index("--seeds") + 1] = "1"
    assert ablate.main(args) == 0
    text = (tmp_path / "results.md").read_text()
    ms = ablate.predicted_ms(["default", "dense"])
    want = ablate.equal_time_steps(6, ms["default"], ms["dense"])
    assert want < 6 and text.startswith(f"# Ablation, tiny scale, equal predicted 8xH100 time (default: 6 steps at "
                                        f"{ms['default']:.2f} ms)")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "config" not in line}
    assert rows["default"][5:8] == ["6", f"{ms['default']:.2f}", "predicted 8xH100 (bench/cost_model.py)"]
    assert rows["dense"][5:7] == [str(want), f"{ms['dense']:.2f}"] and rows["dense"][-1].startswith(("+", "-"))
    assert f"hp iterations:{want}" in (tmp_path / "work" / "logs" / "dense_seed1.txt").read_text()
