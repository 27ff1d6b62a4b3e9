"""Validate a record folder before opening the PR; optionally test the record claim against the previous score.

Runbook
  python tools/check_record.py records/track_10min_16mb/2026-11-21_ConvGPT_v2
  python tools/check_record.py records/track_10min_16mb/2026-11-21_ConvGPT_v2 --previous-bpb 1.0565
  python tools/check_record.py DIR --previous-loss 2.3220 --min-improvement-nats 0.005 --alpha 0.01

Prints one `ok: <check>: ...` or `fail: <check>: ...` line per check, then `verdict: ...`; exit 0 when every check
passes, 1 otherwise (2 for bad arguments). The checks:
  files         README.md, submission.json, train_gpt.py, convgpt_ops.py, quantize.py (or one train_gpt.py packed
                by tools/pack_code.py) and >= 1 *.log are present
  logs          every *.log is one finished training run, named train_seed<SEED>.log after its `hp seed`, and the
                seeds are exactly submission.json's `seeds`
  config        the seeds share every setting except seed/run_id/paths, and hardware, torch, val set, code
  submission    every field of submission.json equals its recomputation from the logs (tools/make_record.py's
                derived_fields); name = folder name, track = parent folder, date = the name's date prefix
  size          each log's bytes_total = bytes_model + bytes_code <= 16,000,000, and submission bytes_total <= cap
  code          every log's `code` line (bytes_code and sha256) and the submission's bytes_code match the code
                files in this folder
  train time    stopping_early train_time <= 600 s per seed (10min_16mb track only)
  eval time     final_eval_time (round trip + sliding window + TTT) <= 600 s per seed (10min_16mb track only; a
                log without the line fails there: its evaluation time is unknown)
  self-contained  `python -c "import train_gpt, convgpt_ops, quantize"` with cwd = the folder, PYTHONPATH unset,
                imports all three from the folder (no bytecode written)
  record claim  with --previous-bpb/--previous-loss only, see below

The record claim (challenge rule: beat the previous record by >= 0.005 nats at p < 0.01). Per seed i,
  d_i = previous_loss_nats - val_loss_i        (val_loss_i: the headline, final_ttt_exact when the run used TTT,
                                                else final_sliding_window_exact, nats/token)
A previous score given in bpb is converted with each run's own ratio val_loss_i / val_bpb_i = ln 2 * bytes/token of
this validation set, i.e. previous_loss_nats_i = previous_bpb * val_loss_i / val_bpb_i: the previous record's
bits per byte expressed as nats per token of our tokenization (nats per token of another tokenizer, e.g. sp8192,
are not comparable, its bpb is). One-sample, one-sided Student t-test, H0: mean(d) <= min_improvement:
  t = (mean(d) - min_improvement) / (sd(d) / sqrt(n)),  sd with n - 1,  p = P(T_{n-1} >= t)
The claim is accepted when p < alpha. With one seed sd and p are undefined: the claim fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.make_record import (DATE_PREFIX_RE, EVAL_LIMIT_MS, LIMIT_BYTES, TRACK_DIRS, TRAIN_LIMIT_MS,  # noqa: E402
                               RecordError,
                               code_mismatch, code_sha256, code_sizes, consistency_problem, counted_code,
                               derived_fields, log_name)
from tools.runlog import RunLog, read_log  # noqa: E402

REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "bytes_total",
                   "bytes_code", "seeds", "seed_results", "val_bpb_std", "hardware", "pytorch_version")
FLOAT_TOL = 1e-8  # submission floats are written with 8 decimals
LOG_NAME_RE = re.compile(r"^train_seed(\d+)\.log$")
IMPORT_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with df degrees of freedom (= scipy.stats.t.sf)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


@dataclass(frozen=True)
class ClaimTest:
    n: int
    mean: float  # mean improvement, nats
    sd: float  # sample sd of the improvements (n - 1)
    t: float
    p: float  # one-sided, H0: mean <= min_improvement


def improvement_test(improvements: Sequence[float], min_improvement: float = 0.005) -> ClaimTest:
    """One-sample one-sided t-test of H0: mean(d) <= min_improvement (= scipy ttest_1samp(d, min_improvement,
    alternative="greater")). ValueError with fewer than two values: the p-value is undefined."""
    n = len(improvements)
    if n < 2:
        raise ValueError(f"the p-value is undefined with {n} seed(s): a record claim needs >= 2 (usually 3) seeds")
    mean, sd = statistics.fmean(improvements), statistics.stdev(improvements)
    diff = mean - min_improvement
    if sd == 0.0:
        t = math.inf if diff > 0 else (-math.inf if diff < 0 else math.nan)
        p = 0.0 if diff > 0 else 1.0
    else:
        t = diff / (sd / math.sqrt(n))
        p = student_t_sf(t, n - 1)
    return ClaimTest(n, mean, sd, t, p)


def improvements_nats(runs: Sequence[RunLog], previous_bpb: float | None, previous_loss: float | None) -> list[float]:
    """d_i = previous_loss_nats - val_loss_i; a previous bpb becomes nats via each run's val_loss/val_bpb."""
    out = []
    for run in runs:
        s = run.score
        previous = previous_loss if previous_loss is not None else previous_bpb * s.val_loss / s.val_bpb  # type: ignore[operator]
        out.append(previous - s.val_loss)
    return out


# ----------------------------------------------------------------------------- checks

class CheckFailed(Exception):
    pass


def first_mismatch(expected: Any, actual: Any, path: str) -> str | None:
    """The first place where actual (submission.json) differs from expected (the logs), as a sentence."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{path} is {json.dumps(actual)} but the logs give an object"
        for key in expected:
            if key not in actual:
                return f"{path}.{key} is missing (the logs give {json.dumps(expected[key])})"
            found = first_mismatch(expected[key], actual[key], f"{path}.{key}")
            if found:
                return found
        extra = sorted(set(actual) - set(expected))
        return f"{path} has {extra[0]!r}, which the logs do not have" if extra else None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{path} is {json.dumps(actual)} but the logs give {json.dumps(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            found = first_mismatch(e, a, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return None if abs(expected - actual) <= FLOAT_TOL else f"{path} is {actual!r} but the logs give {expected!r}"
    if type(expected) is not type(actual) or expected != actual:
        return f"{path} is {json.dumps(actual)} but the logs give {json.dumps(expected)}"
    return None


class RecordChecker:
    def __init__(self, folder: Path, *, previous_bpb: float | None = None, previous_loss: float | None = None,
                 min_improvement: float = 0.005, alpha: float = 0.01) -> None:
        self.folder = folder
        self.previous_bpb, self.previous_loss = previous_bpb, previous_loss
        self.min_improvement, self.alpha = min_improvement, alpha
        self.track = next((t for t, d in TRACK_DIRS.items() if d == folder.resolve().parent.name), None)
        self.sub: dict[str, Any] | None = None
        self.runs: list[RunLog] | None = None
        self.claim: ClaimTest | None = None

    # each check returns its ok message or raises CheckFailed
    def check_files(self) -> str:
        logs = sorted(p.name for p in self.folder.glob("*.log"))
        try:
            code = counted_code(self.folder)
        except RecordError as e:
            raise CheckFailed(str(e)) from None
        missing = [f for f in ("README.md", "submission.json") if not (self.folder / f).is_file()]
        if not logs:
            missing.append("a train log (*.log)")
        if missing:
            raise CheckFailed(f"missing {', '.join(missing)}")
        try:
            sub = json.loads((self.folder / "submission.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckFailed(f"submission.json is not valid JSON: {e}") from None
        absent = [f for f in REQUIRED_FIELDS if not isinstance(sub, dict) or f not in sub]
        if absent:
            raise CheckFailed(f"submission.json lacks {', '.join(absent)}")
        self.sub = sub
        return f"README.md, submission.json, {', '.join(code)}{' (packed)' if len(code) == 1 else ''}, {len(logs)} log(s)"

    def check_logs(self) -> str:
        sub = self._sub()
        runs, by_seed = [], {}
        for path in sorted(self.folder.glob("*.log")):
            try:
                run = read_log(path)
                run.stopped  # noqa: B018 - raises for a log that is not a training run
            except ValueError as e:
                raise CheckFailed(str(e)) from None
            m = LOG_NAME_RE.match(path.name)
            if not m or int(m.group(1)) != run.seed:
                raise CheckFailed(f"{path.name} holds seed {run.seed}: name it {log_name(run.seed)}")
            runs.append(run)
            by_seed[run.seed] = run
        listed = sub["seeds"] if isinstance(sub["seeds"], list) else []
        for seed in listed:
            if seed not in by_seed:
                raise CheckFailed(f"submission.json lists seed {seed} but {log_name(seed)} is missing")
        extra = sorted(set(by_seed) - set(listed))
        if extra:
            raise CheckFailed(f"{log_name(extra[0])} is not in submission.json's seeds {listed}")
        if len(set(listed)) != len(listed):
            raise CheckFailed(f"submission.json's seeds {listed} are not distinct")
        self.runs = sorted(runs, key=lambda r: r.seed)
        return f"{len(runs)} finished run(s), seeds {[r.seed for r in self.runs]}"

    def check_config(self) -> str:
        runs = self._runs()
        problem = consistency_problem(runs)
        if problem:
            raise CheckFailed(problem)
        return f"one configuration on {runs[0].hardware}, torch {runs[0].torch_version}"

    def check_submission(self) -> str:
        sub, runs = self._sub(), self._runs()
        expected = derived_fields(runs)
        mismatch = first_mismatch(expected, {k: v for k, v in sub.items() if k in expected}, "submission")
        if mismatch:
            raise CheckFailed(mismatch.removeprefix("submission."))
        if sub["name"] != self.folder.resolve().name:
            raise CheckFailed(f"name {sub['name']!r} is not the folder name {self.folder.resolve().name!r}")
        if self.track is None:
            raise CheckFailed(f"the folder is not under records/{' or records/'.join(TRACK_DIRS.values())}")
        if sub["track"] != self.track:
            raise CheckFailed(f"track {sub['track']!r} but the folder is under {TRACK_DIRS[self.track]}")
        prefix = DATE_PREFIX_RE.match(sub["name"])
        if prefix and sub["date"] != prefix.group(1):
            raise CheckFailed(f"date {sub['date']!r} is not the name's date prefix {prefix.group(1)}")
        empty = [f for f in ("author", "github_id", "blurb") if not str(sub[f]).strip()]
        if empty:
            raise CheckFailed(f"{', '.join(empty)} empty")
        return f"every number equals the logs (val_bpb {sub['val_bpb']}, val_loss {sub['val_loss']})"

    def check_size(self) -> str:
        sub, runs = self._sub(), self._runs()
        for run in runs:
            a = run.sizes
            if a.model + a.code != a.total:
                raise CheckFailed(f"{Path(run.source).name}: bytes_model {a.model} + bytes_code {a.code} != bytes_total {a.total}")
            if a.limit != LIMIT_BYTES:
                raise CheckFailed(f"{Path(run.source).name}: the run's limit is {a.limit}, not {LIMIT_BYTES}")
            if a.total > LIMIT_BYTES:
                raise CheckFailed(f"{Path(run.source).name}: bytes_total {a.total:,} > {LIMIT_BYTES:,}")
        if not isinstance(sub["bytes_total"], int) or sub["bytes_total"] > LIMIT_BYTES:
            raise CheckFailed(f"submission bytes_total {sub['bytes_total']} > {LIMIT_BYTES:,}")
        return f"bytes_total {sub['bytes_total']:,} <= {LIMIT_BYTES:,} (max over seeds)"

    def check_code(self) -> str:
        sub, runs = self._sub(), self._runs()
        problem = code_mismatch(self.folder, runs)
        if problem:
            raise CheckFailed(f"{problem}: the code was edited after the run, or is not its code")
        sizes = code_sizes(self.folder)
        total, parts = sum(sizes.values()), " + ".join(f"{f} {n}" for f, n in sizes.items())
        if sub["bytes_code"] != total:
            raise CheckFailed(f"submission bytes_code {sub['bytes_code']} != {total} ({parts})")
        return f"bytes_code {total} = {parts}, sha256 {code_sha256(self.folder)[:12]} as logged"

    def check_train_time(self) -> str:
        runs = self._runs()
        worst = max(runs, key=lambda r: r.stopped.train_time_ms)
        seconds = worst.stopped.train_time_ms / 1000
        if self.track != "10min_16mb":
            return f"not limited on this track (longest {seconds:.1f} s)"
        if worst.stopped.train_time_ms > TRAIN_LIMIT_MS:
            raise CheckFailed(f"seed {worst.seed} trained {seconds:.3f} s > 600 s (stopping_early line)")
        return f"longest {seconds:.1f} s <= 600 s"

    def check_eval_time(self) -> str:
        runs = self._runs()
        if self.track != "10min_16mb":
            return "not limited on this track"
        unknown = [r.seed for r in runs if r.eval_total_ms is None]
        if unknown:
            raise CheckFailed(f"seed {unknown[0]}'s log has no final_eval_time line: its evaluation time is unknown")
        worst = max(runs, key=lambda r: r.eval_total_ms)
        if worst.eval_total_ms > EVAL_LIMIT_MS:
            raise CheckFailed(f"seed {worst.seed} evaluated for {worst.eval_total_ms / 1000:.3f} s > 600 s (final_eval_time line)")
        return f"longest {worst.eval_total_ms / 1000:.1f} s <= 600 s"

    def check_self_contained(self) -> str:
        code = ("import sys, train_gpt, convgpt_ops, quantize\n"
                "for m in (train_gpt, convgpt_ops, quantize): print(m.__file__)")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        try:
            proc = subprocess.run([sys.executable, "-B", "-c", code], cwd=self.folder, env=env, capture_output=True,
                                  text=True, timeout=IMPORT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"importing the code took over {IMPORT_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise CheckFailed(f"`python -c 'import train_gpt, convgpt_ops, quantize'` in the folder failed: {last}")
        here = self.folder.resolve()
        outside = [f for f in proc.stdout.splitlines() if Path(f.split("!/")[0]).resolve().parent != here]  # packed: file!/name
        if outside:
            raise CheckFailed(f"imported from outside the folder: {outside[0]}")
        return "train_gpt, convgpt_ops and quantize import from the folder alone"

    def check_claim(self) -> str:
        runs = self._runs()
        d = improvements_nats(runs, self.previous_bpb, self.previous_loss)
        given = (f"previous val_bpb {self.previous_bpb}" if self.previous_loss is None
                 else f"previous val_loss {self.previous_loss} nats")
        try:
            self.claim = c = improvement_test(d, self.min_improvement)
        except ValueError as e:
            raise CheckFailed(f"{e} ({given})") from None
        stats = (f"p-value {c.p:.3g} (one-sided t-test, n={c.n}, dof={c.n - 1}, mean improvement {c.mean:.5f} nats, "
                 f"sd {c.sd:.5f}, t={c.t:.3f}, H0: mean <= {self.min_improvement}; {given})")
        if c.p < self.alpha:
            return f"accepted: {stats} < alpha {self.alpha}"
        raise CheckFailed(f"rejected: {stats} >= alpha {self.alpha}")

    def _sub(self) -> dict[str, Any]:
        if self.sub is None:
            raise CheckFailed("not checked: submission.json is missing or unusable")
        return self.sub

    def _runs(self) -> list[RunLog]:
        if self.runs is None:
            raise CheckFailed("not checked: no usable logs")
        return self.runs

    def checks(self) -> list[tuple[str, Callable[[], str]]]:
        out = [("files", self.check_files), ("logs", self.check_logs), ("config", self.check_config),
               ("submission", self.check_submission), ("size", self.check_size), ("code", self.check_code),
               ("train time", self.check_train_time), ("eval time", self.check_eval_time),
               ("self-contained", self.check_self_contained)]
        if self.previous_bpb is not None or self.previous_loss is not None:
            out.append(("record claim", self.check_claim))
        return out

    def run(self, emit: Callable[[str], None] = print) -> bool:
        failed = []
        for name, check in self.checks():
            try:
                emit(f"ok: {name}: {check()}")
            except CheckFailed as e:
                failed.append(name)
                emit(f"fail: {name}: {e}")
        if failed:
            emit(f"verdict: FAIL: {len(failed)} check(s) failed ({', '.join(failed)}): {self.folder}")
        elif self.claim is not None:
            emit(f"verdict: PASS: {self.folder} is a valid record; the record claim holds (p={self.claim.p:.3g})")
        else:
            emit(f"verdict: PASS: {self.folder} is a valid submission folder (no record claim tested)")
        return not failed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("folder", type=Path, help="records/track_<track>/<name>")
    prev = p.add_mutually_exclusive_group()
    prev.add_argument("--previous-bpb", type=float, help="the score to beat, in bits per byte")
    prev.add_argument("--previous-loss", type=float, help="the score to beat, in nats per token (same tokenizer)")
    p.add_argument("--min-improvement-nats", type=float, default=0.005)
    p.add_argument("--alpha", type=float, default=0.01)
    a = p.parse_args(argv)
    if not a.folder.is_dir():
        p.error(f"{a.folder} is not a directory")
    checker = RecordChecker(a.folder, previous_bpb=a.previous_bpb, previous_loss=a.previous_loss,
                            min_improvement=a.min_improvement_nats, alpha=a.alpha)
    return 0 if checker.run() else 1


if __name__ == "__main__":
    sys.exit(main())
