"""Record tooling (tools/): parse real CPU-run logs, package them, validate the folder, plot, and the record p-value.

The runs train a snapshot of the counted code (copied to a temporary folder first), so that edits to the repo's
code while the tests run cannot break the bytes_code match between the logs and the packaged code.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TTT_ON, log_values, trainer_env

from tools import check_record, make_record, plot_logs, runlog

SEEDS = (7, 8)
NAME = "2026-11-21_TinyCPU"
META = dict(author="Test Author", github_id="tester", blurb="Two tiny CPU runs packaged by the tests.")
TRACK_DIR = "track_10min_16mb"
# on top of conftest.TINY_ENV; the assertions below rely on these
PINNED = dict(ITERATIONS="6", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="3", MAX_WALLCLOCK_SECONDS="0", EVAL_STRIDE="32", **TTT_ON,
              NUM_LAYERS="2")


@pytest.fixture(scope="module")
def runs(smoke_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real short CPU runs (seeds 7 and 8, validation every 3 steps), in parallel, of a snapshot of the code."""
    root = tmp_path_factory.mktemp("record_runs")
    code = root / "code"
    code.mkdir()
    for name in make_record.CODE_FILES:
        shutil.copyfile(ROOT / name, code / name)
    procs = {}
    for seed in SEEDS:
        env = trainer_env(smoke_data, root, **PINNED, RUN_ID=f"seed{seed}", SEED=str(seed),
                          ARTIFACT_PATH=str(root / f"seed{seed}.ptz"))
        procs[seed] = subprocess.Popen([sys.executable, str(code / "train_gpt.py")], env=env, cwd=root,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for seed, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"seed {seed} failed:\n{out[-2000:]}\n{err[-2000:]}"
    logs = {f"log{seed}": root / "logs" / f"seed{seed}.txt" for seed in SEEDS}
    return {"root": root, "code": code, **logs}


@pytest.fixture(scope="module")
def record(runs: dict[str, Path]) -> Path:
    return make_record.package([runs["log7"], runs["log8"]], name=NAME, track="10min_16mb", code_dir=runs["code"],
                               records_dir=runs["root"] / "records", **META)


def copy_record(record: Path, tmp_path: Path, track_dir: str = TRACK_DIR) -> Path:
    target = tmp_path / "records" / track_dir / record.name
    shutil.copytree(record, target)
    return target


def check(folder: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = check_record.main([str(folder), *args])
    return rc, capsys.readouterr().out


def fail_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("fail:")]


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


# ----------------------------------------------------------------------------- runlog

def test_parse_real_log(runs: dict[str, Path]) -> None:
    text = runs["log7"].read_text()
    run = runlog.parse_log(text, "seed7")
    assert run.seed == 7 and run.run_id == "seed7" and run.hp["num_layers"] == "2"
    assert (run.world_size, run.device_name, run.hardware) == (1, "cpu", "1xcpu")
    assert run.torch_version == log_values(text, "world_size:1")["torch"]
    assert [p.step for p in run.train] == [1, 2, 3, 4, 5, 6]
    assert [p.step for p in run.val] == [3, 6]
    stop = log_values(text, "stopping_early:False")
    assert run.stop == runlog.Stop(False, 6, float(stop["train_time"][:-2]), float(stop["step_avg"][:-2]))
    art = log_values(text, "artifact")
    assert (run.sizes.model, run.sizes.code, run.sizes.total, run.sizes.limit) == tuple(
        int(art[k]) for k in ("bytes_model", "bytes_code", "bytes_total", "limit"))
    sliding, ttt = log_values(text, "final_sliding_window_exact"), log_values(text, "final_ttt_exact")
    assert (run.sliding.val_loss, run.sliding.val_bpb, run.sliding.stride) == (
        float(sliding["val_loss"]), float(sliding["val_bpb"]), 32)
    assert run.sliding.eval_time_ms == float(log_values(text, "final_sliding_window")["eval_time"][:-2])
    assert run.score is run.ttt and (run.score.val_loss, run.score.val_bpb) == (float(ttt["val_loss"]), float(ttt["val_bpb"]))
    total_ms = float(re.search(r"^final_eval_time:(\d+)ms max_eval_seconds:600$", text, re.M).group(1))
    assert run.eval_total_ms == total_ms > run.ttt.eval_time_ms
    assert run.roundtrip is not None
    assert run.roundtrip.val_bpb == float(log_values(text, "final_int6_zstd_roundtrip_exact")["val_bpb"])


def test_parse_refuses_unfinished_and_appended_logs(runs: dict[str, Path]) -> None:
    text = runs["log7"].read_text()
    unfinished = text[:text.index("final_sliding_window_exact")]
    with pytest.raises(ValueError, match=r"log x\.txt has no final_sliding_window_exact line: the run did not finish"):
        runlog.parse_log(unfinished, "x.txt")
    assert runlog.parse_log(unfinished, "x.txt", require_finished=False).sliding is None
    with pytest.raises(ValueError, match="holds 2 runs"):
        runlog.parse_log(text + text, "twice.txt")


# ----------------------------------------------------------------------------- make_record

def test_record_folder_layout_and_numbers(record: Path, runs: dict[str, Path]) -> None:
    assert record == runs["root"] / "records" / TRACK_DIR / NAME
    assert sorted(p.name for p in record.iterdir()) == sorted(
        ["README.md", "submission.json", "train_seed7.log", "train_seed8.log", *make_record.CODE_FILES])
    for seed in SEEDS:
        assert (record / f"train_seed{seed}.log").read_bytes() == runs[f"log{seed}"].read_bytes()
    sub = json.loads((record / "submission.json").read_text())
    # recompute every number from the raw log lines, independently of tools/runlog.py
    texts = {seed: runs[f"log{seed}"].read_text() for seed in SEEDS}
    sliding = {s: log_values(t, "final_ttt_exact") for s, t in texts.items()}  # the headline: TTT is on by default
    artifact = {s: log_values(t, "artifact") for s, t in texts.items()}
    losses = [float(sliding[s]["val_loss"]) for s in SEEDS]
    bpbs = [float(sliding[s]["val_bpb"]) for s in SEEDS]
    assert sub["val_loss"] == pytest.approx(statistics.fmean(losses), abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(bpbs), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpbs), abs=1e-8)
    assert sub["bytes_total"] == max(int(artifact[s]["bytes_total"]) for s in SEEDS)
    assert sub["bytes_code"] == int(artifact[7]["bytes_code"]) == sum(
        (runs["code"] / f).stat().st_size for f in make_record.CODE_FILES)
    assert sub["seeds"] == list(SEEDS)
    for seed in SEEDS:
        stop = log_values(texts[seed], "stopping_early:False")
        assert sub["seed_results"][str(seed)] == {
            "val_loss": float(sliding[seed]["val_loss"]), "val_bpb": float(sliding[seed]["val_bpb"]),
            "artifact_bytes": int(artifact[seed]["bytes_total"]), "steps": int(stop["step"]),
            "step_avg_ms": float(stop["step_avg"][:-2]), "train_time_s": round(float(stop["train_time"][:-2]) / 1000, 3),
            "eval_time_s": round(float(re.search(r"^final_eval_time:(\d+)ms", texts[seed], re.M).group(1)) / 1000, 3)}
    assert (sub["hardware"], sub["pytorch_version"]) == ("1xcpu", log_values(texts[7], "world_size:1")["torch"])
    assert {k: sub[k] for k in ("author", "github_id", "blurb", "name", "date", "track")} == {
        **META, "name": NAME, "date": "2026-11-21", "track": "10min_16mb"}
    readme = (record / "README.md").read_text()
    assert readme.startswith(f"# {NAME}\n") and META["blurb"] in readme and "## TODO" in readme
    assert f"| 7 | {sliding[7]['val_loss']} | {sliding[7]['val_bpb']} |" in readme
    assert "for SEED in 7 8; do" in readme and "python train_gpt.py" in readme and "NUM_LAYERS=2" in readme


@pytest.mark.slow
def test_record_runs_from_inside_itself(record: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-B", "-c", "import train_gpt, convgpt_ops, quantize; print(train_gpt.__file__)"],
                          cwd=record, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == (record / "train_gpt.py").resolve()


def test_make_record_refuses_foreign_code(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = tmp_path / "code"
    shutil.copytree(runs["code"], code)
    with (code / "quantize.py").open("a") as f:
        f.write("# edited after the run\n")
    rc = make_record.main([str(runs["log7"]), str(runs["log8"]), "--name", NAME, "--track", "10min_16mb",
                           "--author", "a", "--github-id", "b", "--blurb", "c", "--code-dir", str(code),
                           "--records-dir", str(tmp_path / "records")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: code in" in err and "the logs did not come from this code" in err
    assert not (tmp_path / "records" / TRACK_DIR / NAME).exists()


def test_make_record_refuses_unfinished_log_and_duplicate_seeds(runs: dict[str, Path], tmp_path: Path) -> None:
    text = runs["log7"].read_text()
    unfinished = tmp_path / "seed7.txt"
    unfinished.write_text(text[:text.index("final_int6_zstd_roundtrip ")])
    kw = dict(name=NAME, track="10min_16mb", code_dir=runs["code"], records_dir=tmp_path / "records", **META)
    with pytest.raises(make_record.RecordError, match="has no final_sliding_window_exact line: the run did not finish"):
        make_record.package([unfinished, runs["log8"]], **kw)
    with pytest.raises(make_record.RecordError, match="seeds must be distinct"):
        make_record.package([runs["log7"], runs["log7"]], **kw)
    untimed = tmp_path / "untimed" / "seed7.txt"
    untimed.parent.mkdir()
    untimed.write_text(re.sub(r"^final_eval_time:.*\n", "", text, flags=re.M))
    with pytest.raises(make_record.RecordError, match="the final evaluation is not logged .no final_eval_time line."):
        make_record.package([untimed, runs["log8"]], **kw)
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").rglob("*.log"))


def test_make_record_refuses_to_overwrite(runs: dict[str, Path], tmp_path: Path) -> None:
    kw = dict(name=NAME, track="non_record", code_dir=runs["code"], records_dir=tmp_path / "records", **META)
    first = make_record.package([runs["log7"]], **kw)
    assert first == tmp_path / "records" / "track_non_record_16mb" / NAME
    with pytest.raises(make_record.RecordError, match="exists: refusing to overwrite"):
        make_record.package([runs["log7"], runs["log8"]], **kw)
    assert json.loads((first / "submission.json").read_text())["seeds"] == [7]
    make_record.package([runs["log7"], runs["log8"]], force=True, **kw)
    assert json.loads((first / "submission.json").read_text())["seeds"] == [7, 8]
    assert [p.name for p in first.parent.iterdir()] == [NAME]  # no staging folders left behind


# ----------------------------------------------------------------------------- check_record

def test_checker_passes_and_tests_the_claim(record: Path, runs: dict[str, Path]) -> None:
    """End to end through the CLI: valid folder, then a previous bpb far above the runs (claim accepted)."""
    cli = [sys.executable, str(ROOT / "tools" / "check_record.py"), str(record)]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not fail_lines(proc.stdout) and len([ln for ln in proc.stdout.splitlines() if ln.startswith("ok:")]) == 9
    assert proc.stdout.splitlines()[-1].startswith("verdict: PASS")

    scores = [runlog.read_log(runs[f"log{s}"]).score for s in SEEDS]
    previous = max(s.val_bpb for s in scores) + 1000.0  # improvement ~1600 nats, t > 300: p < 0.002 for any spread
    proc = subprocess.run([*cli, "--previous-bpb", str(previous)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    d = [previous * s.val_loss / s.val_bpb - s.val_loss for s in scores]
    expected = check_record.improvement_test(d, 0.005)
    assert expected.p < 0.01
    assert f"ok: record claim: accepted: p-value {expected.p:.3g}" in proc.stdout
    assert "the record claim holds" in proc.stdout.splitlines()[-1]


@pytest.mark.slow
def test_checker_rejects_a_claim_that_does_not_improve(record: Path, runs: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    scores = [runlog.read_log(runs[f"log{s}"]).score for s in SEEDS]
    rc, out = check(record, capsys, "--previous-bpb", str(min(s.val_bpb for s in scores) - 1.0))  # every d_i < 0
    assert rc == 1 and fail_lines(out) == [ln for ln in out.splitlines() if ln.startswith("fail: record claim: rejected")]
    p = float(re.search(r"p-value (\S+)", out).group(1))
    assert p > 0.5
    rc, out = check(record, capsys, "--previous-loss", str(max(s.val_loss for s in scores) + 1000.0))
    assert rc == 0 and "ok: record claim: accepted" in out


@pytest.mark.slow
def test_checker_fails_oversize(record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_record(record, tmp_path)
    log = folder / "train_seed7.log"
    a = runlog.read_log(log).sizes
    extra = 16_000_000
    log.write_text(log.read_text().replace(
        f"bytes_model:{a.model} bytes_code:{a.code} bytes_total:{a.total}",
        f"bytes_model:{a.model + extra} bytes_code:{a.code} bytes_total:{a.total + extra}"))

    def edit(sub: dict) -> None:
        sub["seed_results"]["7"]["artifact_bytes"] = a.total + extra
        sub["bytes_total"] = a.total + extra
    edit_json(folder / "submission.json", edit)
    rc, out = check(folder, capsys)
    assert rc == 1
    assert fail_lines(out) == [f"fail: size: train_seed7.log: bytes_total {a.total + extra:,} > 16,000,000"]
    assert out.splitlines()[-1].startswith("verdict: FAIL: 1 check(s) failed (size)")


@pytest.mark.slow
def test_checker_fails_mismatched_number(record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_record(record, tmp_path)
    true_bpb = json.loads((folder / "submission.json").read_text())["val_bpb"]
    edit_json(folder / "submission.json", lambda sub: sub.update(val_bpb=round(true_bpb - 0.01, 8)))
    rc, out = check(folder, capsys)
    assert rc == 1
    assert fail_lines(out) == [f"fail: submission: val_bpb is {round(true_bpb - 0.01, 8)!r} but the logs give {true_bpb!r}"]


@pytest.mark.slow
def test_checker_fails_missing_log(record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_record(record, tmp_path)
    (folder / "train_seed8.log").unlink()
    rc, out = check(folder, capsys)
    assert rc == 1
    assert "fail: logs: submission.json lists seed 8 but train_seed8.log is missing" in fail_lines(out)
    (folder / "train_seed7.log").unlink()
    rc, out = check(folder, capsys)
    assert rc == 1 and fail_lines(out)[0] == "fail: files: missing a train log (*.log)"


@pytest.mark.slow
def test_checker_fails_train_time_over_600s(record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for track_dir, track in ((TRACK_DIR, "10min_16mb"), ("track_non_record_16mb", "non_record_16mb")):
        folder = copy_record(record, tmp_path, track_dir)
        log = folder / "train_seed7.log"
        stop = runlog.read_log(log).stopped
        old = re.search(r"^stopping_early:.*$", log.read_text(), re.M).group(0)
        slow_ms = 600_500
        step_avg = round(slow_ms / stop.steps, 2)
        log.write_text(log.read_text().replace(old, f"stopping_early:True step:{stop.steps} train_time:{slow_ms}ms "
                                                    f"step_avg:{step_avg:.2f}ms"))

        def edit(sub: dict) -> None:
            sub["seed_results"]["7"].update(train_time_s=600.5, step_avg_ms=step_avg)
            sub["track"] = track
        edit_json(folder / "submission.json", edit)
        rc, out = check(folder, capsys)
        if track == "10min_16mb":
            assert rc == 1
            assert fail_lines(out) == ["fail: train time: seed 7 trained 600.500 s > 600 s (stopping_early line)"]
        else:
            assert rc == 0 and "ok: train time: not limited on this track" in out, out


@pytest.mark.slow
def test_checker_fails_an_evaluation_over_600s_or_unlogged(record: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_record(record, tmp_path)
    log = folder / "train_seed8.log"
    old = re.search(r"^final_eval_time:.*$", log.read_text(), re.M).group(0)
    log.write_text(log.read_text().replace(old, "final_eval_time:600500ms max_eval_seconds:600"))
    edit_json(folder / "submission.json", lambda sub: sub["seed_results"]["8"].update(eval_time_s=600.5))
    rc, out = check(folder, capsys)
    assert rc == 1 and fail_lines(out) == ["fail: eval time: seed 8 evaluated for 600.500 s > 600 s (final_eval_time line)"]
    log.write_text(log.read_text().replace("final_eval_time:600500ms max_eval_seconds:600\n", ""))
    edit_json(folder / "submission.json", lambda sub: sub["seed_results"]["8"].update(eval_time_s=None))
    rc, out = check(folder, capsys)
    assert rc == 1 and fail_lines(out) == ["fail: eval time: seed 8's log has no final_eval_time line: its evaluation "
                                           "time is unknown"]


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["append", "same size"])  # "same size": a path with a space, too
def test_checker_fails_code_edited_after_the_run(record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 edit: str) -> None:
    folder = copy_record(tmp_path=tmp_path / edit, record=record)
    path = folder / "convgpt_ops.py"
    text = path.read_text()
    at = text.index('"""') + 3  # same size: the docstring's first letter, case swapped
    path.write_text(text + "\n" if edit == "append" else text[:at] + text[at].swapcase() + text[at + 1:])
    assert (path.stat().st_size == len(text.encode())) == (edit == "same size")
    rc, out = check(folder, capsys)
    assert rc == 1, out
    [line] = fail_lines(out)
    assert line.startswith("fail: code: code in") and "is not the code of" in line and "code was edited after the run" in line


@pytest.mark.slow
def test_checker_fails_a_single_seed_record_claim(runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_record.package([runs["log7"]], name=NAME, track="10min_16mb", code_dir=runs["code"],
                                 records_dir=tmp_path / "records", **META)
    assert json.loads((folder / "submission.json").read_text())["val_bpb_std"] is None
    rc, out = check(folder, capsys, "--previous-bpb", "1000")
    assert rc == 1
    assert fail_lines(out) == ["fail: record claim: the p-value is undefined with 1 seed(s): a record claim needs "
                               ">= 2 (usually 3) seeds (previous val_bpb 1000.0)"]


# ----------------------------------------------------------------------------- statistics

def test_student_t_against_table_values() -> None:
    # one-sided critical values of Student's t (any textbook table): P(T_df >= t) = alpha
    for df, t, alpha in ((1, 31.821, 0.01), (2, 6.965, 0.01), (4, 3.747, 0.01), (5, 2.015, 0.05), (10, 1.812, 0.05),
                         (30, 2.457, 0.01)):
        assert check_record.student_t_sf(t, df) == pytest.approx(alpha, rel=2e-3)
    assert check_record.student_t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-14)  # Cauchy: 1/2 - atan(1)/pi
    assert check_record.student_t_sf(0.0, 7) == pytest.approx(0.5, abs=1e-14)
    assert check_record.student_t_sf(-2.015, 5) == pytest.approx(0.95, rel=2e-4)
    # hand-checked: d = 10, 12, 14 millinats, H0 mean <= 5: mean 12, sd 2, t = 7 / (2 / sqrt 3) = 6.0622, dof 2
    c = check_record.improvement_test([0.010, 0.012, 0.014], 0.005)
    assert (c.n, c.mean, c.sd, c.t) == (3, pytest.approx(0.012), pytest.approx(0.002), pytest.approx(7 * math.sqrt(3) / 2))
    assert c.p == pytest.approx(0.5 * (1 - c.t / math.sqrt(2 + c.t ** 2)), rel=1e-10)  # closed form of the dof-2 tail
    with pytest.raises(ValueError, match="undefined with 1 seed"):
        check_record.improvement_test([0.1])


def test_p_value_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    import numpy as np
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        for _ in range(20):
            d = rng.normal(0.008, 0.004, n).tolist()
            ours = check_record.improvement_test(d, 0.005).p
            ref = stats.ttest_1samp(d, 0.005, alternative="greater").pvalue
            assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)
    for df in (1, 2, 3, 7, 29, 200):
        for t in (-40.0, -3.0, -0.4, 0.1, 1.5, 4.0, 25.0, 1e4):
            assert check_record.student_t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-300)


# ----------------------------------------------------------------------------- plot

@pytest.mark.slow
def test_plot_from_real_logs(runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert plot_logs.main([str(runs["log7"]), "--out", str(one)]) == 0
    assert plot_logs.main([str(runs["log7"]), str(runs["log8"]), "--out", str(two)]) == 0
    for png in (one, two):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # a run still in progress (no final lines, no validation yet) plots too
    text = runs["log8"].read_text()
    partial = tmp_path / "partial.txt"
    partial.write_text(text[:text.index("step:3/6 val_loss")])
    assert plot_logs.main([str(partial), "--out", str(tmp_path / "partial.png")]) == 0
    assert (tmp_path / "partial.png").read_bytes()[:4] == b"\x89PNG"
