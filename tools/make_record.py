"""Package finished runs (one log per seed) into a record folder in the challenge's layout.

Runbook
  # 1. run the seeds from a clean tree (the logs land in logs/<RUN_ID>.txt):
  for SEED in 1337 42 2025; do RUN_ID=seed$SEED SEED=$SEED torchrun --standalone --nproc_per_node=8 train_gpt.py; done
  # 2. package them (numbers come from the logs only; nothing is typed by hand):
  python tools/make_record.py --name 2026-11-21_ConvGPT_v2 --track 10min_16mb --author "Jane Doe" \
      --github-id janedoe --blurb "ConvGPT-v2: ..." logs/seed1337.txt logs/seed42.txt logs/seed2025.txt
  # 3. write the TODO section of the README, then validate:
  python tools/check_record.py records/track_10min_16mb/2026-11-21_ConvGPT_v2 --previous-bpb 1.0565

What it writes to records/track_<track>/<name>/ (track 10min_16mb, or non_record -> track_non_record_16mb/):
  train_gpt.py convgpt_ops.py quantize.py    copied from the repo root (or --code-dir); from a --code-dir that
                                             tools/pack_code.py made, its one packed train_gpt.py
  train_seed<SEED>.log                       each log, verbatim
  submission.json                            every number parsed from the logs (see build_submission)
  README.md                                  skeleton: results per seed, reproduce command, size accounting, TODO

It refuses (exit 1, `error: ...` on stderr, nothing written) when:
  * a log did not finish, holds several runs, or is not a training run;
  * two logs have the same seed, or the logs differ in settings other than seed/run_id/paths, in hardware,
    torch version, validation set or code;
  * the code files' total size or sha256 differs from the logs' `code` line (the logs did not come from this
    code);
  * an artifact is over its limit, or (10min_16mb track) a run trained for more than 600 s;
  * the record folder exists (pass --force to replace it).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import json
import math
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.pack_code import CODE_FILES, MARKER as PACKED_MARKER  # noqa: E402  # CODE_FILES: what bytes_code counts
from tools.runlog import RunLog, read_log  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 16_000_000
TRAIN_LIMIT_MS = 600_000.0
EVAL_LIMIT_MS = 600_000.0  # the final evaluation, 8xH100 (CHALLENGE.md)
TRACK_DIRS = {"10min_16mb": "track_10min_16mb", "non_record_16mb": "track_non_record_16mb"}
TRACK_ALIASES = {"10min_16mb": "10min_16mb", "non_record": "non_record_16mb", "non_record_16mb": "non_record_16mb"}
# hp fields allowed to differ between the seeds of one record (everything else must be identical)
PER_RUN_FIELDS = frozenset({"seed", "run_id", "artifact_path", "data_path", "tokenizer_path"})
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
DATE_PREFIX_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})_")
DECIMALS = 8  # the _exact lines carry 8 decimals


class RecordError(Exception):
    """A refusal, printed as one `error: ...` line."""


def log_name(seed: int) -> str:
    return f"train_seed{seed}.log"


def load_runs(paths: Sequence[str | Path]) -> list[RunLog]:
    """Parse finished training logs, sorted by seed; refuse duplicates and inconsistent runs."""
    if not paths:
        raise RecordError("no logs given")
    runs = []
    for path in paths:
        try:
            run = read_log(path)
            run.stopped, run.seed  # noqa: B018 - both raise ValueError when absent
        except ValueError as e:
            raise RecordError(str(e)) from None
        runs.append(run)
    seen: dict[int, str] = {}
    for run in runs:
        if run.seed in seen:
            raise RecordError(f"seeds must be distinct: {seen[run.seed]} and {run.source} both have seed {run.seed}")
        seen[run.seed] = run.source
    runs.sort(key=lambda r: r.seed)
    problem = consistency_problem(runs)
    if problem:
        raise RecordError(problem)
    return runs


def consistency_problem(runs: Sequence[RunLog]) -> str | None:
    """Why these runs are not seeds of one configuration, or None."""
    first = runs[0]
    for run in runs[1:]:
        keys = sorted(k for k in set(first.hp) | set(run.hp)
                      if k not in PER_RUN_FIELDS and first.hp.get(k) != run.hp.get(k))
        if keys:
            diffs = ", ".join(f"{k}: {first.hp.get(k)} vs {run.hp.get(k)}" for k in keys[:5])
            return f"logs {first.source} and {run.source} differ in settings ({diffs}): one record is one configuration"
        for what, a, b in (("hardware", first.hardware, run.hardware), ("torch", first.torch_version, run.torch_version),
                           ("val_tokens", first.val_tokens, run.val_tokens),
                           ("bytes_code", first.sizes.code, run.sizes.code),
                           ("code sha256", first.code_sha256, run.code_sha256)):
            if a != b:
                return f"logs {first.source} and {run.source} differ in {what} ({a} vs {b})"
    return None


def _round(x: float) -> float:
    return round(x, DECIMALS)


def _std(xs: Sequence[float]) -> float | None:
    return _round(statistics.stdev(xs)) if len(xs) > 1 else None


def seed_result(run: RunLog) -> dict[str, Any]:
    score, stop = run.score, run.stopped
    return {
        "val_loss": score.val_loss,
        "val_bpb": score.val_bpb,
        "artifact_bytes": run.sizes.total,
        "steps": stop.steps,
        "step_avg_ms": stop.step_avg_ms,
        "train_time_s": round(stop.train_time_ms / 1000, 3),
        "eval_time_s": None if run.eval_total_ms is None else round(run.eval_total_ms / 1000, 3),
    }


def derived_fields(runs: Sequence[RunLog]) -> dict[str, Any]:
    """The submission.json fields that come from the logs (runs sorted by seed):
    val_loss / val_bpb   mean over seeds of the headline score (final_ttt_exact, else final_sliding_window_exact)
    val_*_std            sample standard deviation over seeds (n-1); null with one seed
    bytes_total          max over seeds of the artifact line's bytes_total (model + counted code)
    bytes_code           the artifact line's bytes_code (identical in every log)
    seed_results         per seed: headline val_loss/val_bpb, artifact_bytes, steps, step_avg_ms and train_time_s
                         of the stopping_early line, eval_time_s of the whole final evaluation (final_eval_time)
    hardware             <world_size>x<device_name>;  pytorch_version: the torch version the run logged
    """
    losses = [r.score.val_loss for r in runs]
    bpbs = [r.score.val_bpb for r in runs]
    return {
        "val_loss": _round(statistics.fmean(losses)),
        "val_bpb": _round(statistics.fmean(bpbs)),
        "val_loss_std": _std(losses),
        "val_bpb_std": _std(bpbs),
        "bytes_total": max(r.sizes.total for r in runs),
        "bytes_code": runs[0].sizes.code,
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): seed_result(r) for r in runs},
        "hardware": runs[0].hardware,
        "pytorch_version": runs[0].torch_version,
    }


def build_submission(runs: Sequence[RunLog], *, author: str, github_id: str, name: str, blurb: str, date: str,
                     track: str) -> dict[str, Any]:
    head = {"author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date, "track": track}
    return head | derived_fields(runs)


def record_date(name: str, date: str | None) -> str:
    """ISO date from --date, else from the name's YYYY-MM-DD_ prefix; both given must agree."""
    prefix = DATE_PREFIX_RE.match(name)
    chosen = date or (prefix.group(1) if prefix else None)
    if chosen is None:
        raise RecordError(f"name {name!r} has no YYYY-MM-DD_ prefix: pass --date")
    try:
        iso = dt.date.fromisoformat(chosen).isoformat()
    except ValueError:
        raise RecordError(f"date {chosen!r} is not an ISO date (YYYY-MM-DD)") from None
    if prefix and date and prefix.group(1) != iso:
        raise RecordError(f"--date {iso} disagrees with the name's prefix {prefix.group(1)}")
    return iso


def counted_code(code_dir: Path) -> tuple[str, ...]:
    """The code files a run from code_dir counts: train_gpt.py alone when tools/pack_code.py packed it, else all
    three (RecordError naming the missing ones)."""
    packed = code_dir / "train_gpt.py"
    if packed.is_file() and packed.read_text(encoding="utf-8", errors="replace").startswith(PACKED_MARKER):
        stray = [f for f in CODE_FILES[1:] if (code_dir / f).exists()]
        if stray:
            raise RecordError(f"{', '.join(stray)} beside the packed train_gpt.py in {code_dir}: the packed file carries "
                              f"its own copy, so remove the plain one(s)")
        return ("train_gpt.py",)
    missing = [f for f in CODE_FILES if not (code_dir / f).is_file()]
    if missing:
        raise RecordError(f"code file(s) {', '.join(missing)} missing in {code_dir}")
    return CODE_FILES


def code_sizes(code_dir: Path) -> dict[str, int]:
    return {f: (code_dir / f).stat().st_size for f in counted_code(code_dir)}


def code_sha256(code_dir: Path) -> str:
    """sha256 of the counted files' bytes, in order: what train_gpt.py logs in its `code` line."""
    digest = hashlib.sha256()
    for f in counted_code(code_dir):
        digest.update((code_dir / f).read_bytes())
    return digest.hexdigest()


def code_mismatch(code_dir: Path, runs: Sequence[RunLog]) -> str | None:
    """Why the logs did not come from the code in code_dir (size and sha256 of the `code` line), or None."""
    sizes, digest = code_sizes(code_dir), code_sha256(code_dir)
    parts = " + ".join(f"{f} {n}" for f, n in sizes.items())
    for run in runs:
        if run.code_sha256 is None:
            return f"log {run.source} has no `code` line (a trainer older than the sha256 check): its code cannot be verified"
        if sum(sizes.values()) != run.sizes.code or digest != run.code_sha256:
            return (f"code in {code_dir} ({parts}, sha256 {digest[:12]}) is not the code of {run.source} "
                    f"(bytes_code:{run.sizes.code}, sha256 {run.code_sha256[:12]})")
    return None


def check_code_matches(code_dir: Path, runs: Sequence[RunLog]) -> None:
    problem = code_mismatch(code_dir, runs)
    if problem:
        raise RecordError(f"{problem}: the logs did not come from this code (pass --code-dir with the code that ran)")


def check_limits(runs: Sequence[RunLog], track: str) -> None:
    for run in runs:
        if run.sizes.total > min(run.sizes.limit, LIMIT_BYTES):
            raise RecordError(f"log {run.source}: bytes_total {run.sizes.total} is over the {LIMIT_BYTES} cap")
        if track == "10min_16mb" and run.stopped.train_time_ms > TRAIN_LIMIT_MS:
            raise RecordError(f"log {run.source}: train_time {run.stopped.train_time_ms / 1000:.3f} s is over 600 s: "
                              f"not a 10min_16mb record (use --track non_record)")
        if track == "10min_16mb" and (run.eval_total_ms is None or run.eval_total_ms > EVAL_LIMIT_MS):
            took = "is not logged (no final_eval_time line)" if run.eval_total_ms is None else \
                f"took {run.eval_total_ms / 1000:.3f} s, over 600 s"
            raise RecordError(f"log {run.source}: the final evaluation {took}: not a 10min_16mb record "
                              f"(use --track non_record)")


def hp_defaults(train_gpt: Path) -> dict[str, str] | None:
    """The trainer's Hyperparameters defaults as the strings the log prints, read with ast (no import, no torch)."""
    try:
        tree = ast.parse(train_gpt.read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
        return {s.target.id: str(ast.literal_eval(s.value)) for s in cls.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None}
    except (OSError, SyntaxError, StopIteration, ValueError):
        return None


def reproduce_command(runs: Sequence[RunLog], defaults: dict[str, str] | None) -> str:
    hp = runs[0].hp
    if defaults is None:
        env = "<the settings of the logs' hp lines> "
    else:
        changed = {k: v for k, v in sorted(hp.items())
                   if k not in ("seed", "run_id", "artifact_path") and defaults.get(k) != v}
        env = "".join(f"{k.upper()}={shlex.quote(v)} " for k, v in changed.items())
    ws = runs[0].world_size or 1
    launcher = f"torchrun --standalone --nproc_per_node={ws} train_gpt.py" if ws > 1 else "python train_gpt.py"
    seeds = " ".join(str(r.seed) for r in runs)
    return (f"for SEED in {seeds}; do\n"
            f"  RUN_ID=seed$SEED SEED=$SEED {env}{launcher}\n"
            f"  cp logs/seed$SEED.txt train_seed$SEED.log\n"
            f"done")


def _fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def make_readme(sub: dict[str, Any], runs: Sequence[RunLog], sizes: dict[str, int], defaults: dict[str, str] | None) -> str:
    rows = "\n".join(
        f"| {seed} | {_fmt(r['val_loss'], 8)} | {_fmt(r['val_bpb'], 8)} | {r['artifact_bytes']:,} | {r['steps']} | "
        f"{r['step_avg_ms']:.2f} | {_fmt(r['train_time_s'], 1)} | {_fmt(r['eval_time_s'], 1)} |"
        for seed, r in sub["seed_results"].items())
    code_parts = " + ".join(f"`{f}` {n:,}" for f, n in sizes.items())
    stride = runs[0].score.stride
    std = "" if sub["val_bpb_std"] is None else f" (std {sub['val_bpb_std']:.5f} over {len(runs)} seeds)"
    return f"""# {sub['name']}

{sub['blurb']}

**val_bpb {sub['val_bpb']:.8f}**{std}, val_loss {sub['val_loss']:.8f} nats per token; largest artifact
{sub['bytes_total']:,} bytes of {LIMIT_BYTES:,}. Hardware: {sub['hardware']}, PyTorch {sub['pytorch_version']}.
Track: `{sub['track']}`. Date: {sub['date']}.

## Results

Score = `final_sliding_window_exact` (stride {stride}) of each log; all numbers are parsed from the logs by
`tools/make_record.py`.

| seed | val_loss | val_bpb | artifact bytes | steps | step avg (ms) | train (s) | eval (s) |
|---|---|---|---|---|---|---|---|
{rows}
| **mean** | **{sub['val_loss']:.8f}** | **{sub['val_bpb']:.8f}** | max {sub['bytes_total']:,} | | | | |

## Reproduce

From inside this folder, with the FineWeb sp1024 data at `./data/` (or `DATA_PATH` / `TOKENIZER_PATH` set):

```bash
{reproduce_command(runs, defaults)}
```

## How the size is counted

`bytes_total` = `bytes_model` (the int6 + zstd-22 artifact that the run wrote and reloaded for its score) +
`bytes_code` (every file the run imports: {code_parts} = {sub['bytes_code']:,} bytes). The submission's
`bytes_total` is the largest over the seeds; the cap is {LIMIT_BYTES:,} bytes (decimal).

## TODO: explanation (author)

- What changed relative to the previous record, and why it helps (ablations).
- Compliance: training <= 600 s, evaluation <= 600 s, no training data at eval time, score-first only.
"""


def package(log_paths: Sequence[str | Path], *, name: str, track: str, author: str, github_id: str, blurb: str,
            date: str | None = None, code_dir: Path = REPO_ROOT, records_dir: Path = REPO_ROOT / "records",
            force: bool = False) -> Path:
    """Build the record folder and return its path; RecordError on any refusal (nothing is written then)."""
    if track not in TRACK_ALIASES:
        raise RecordError(f"track {track!r} is not one of {', '.join(TRACK_ALIASES)}")
    track = TRACK_ALIASES[track]
    if not NAME_RE.match(name):
        raise RecordError(f"name {name!r} must be letters, digits and . _ + - (e.g. 2026-11-21_ConvGPT_v2)")
    iso_date = record_date(name, date)
    for field_name, value in (("author", author), ("github-id", github_id), ("blurb", blurb)):
        if not value.strip():
            raise RecordError(f"--{field_name} is empty")
    runs = load_runs(log_paths)
    check_code_matches(code_dir, runs)
    sizes = code_sizes(code_dir)
    check_limits(runs, track)
    target = records_dir / TRACK_DIRS[track] / name
    if target.exists() and not force:
        raise RecordError(f"{target} exists: refusing to overwrite it (pass --force to replace it)")

    sub = build_submission(runs, author=author, github_id=github_id, name=name, blurb=blurb, date=iso_date, track=track)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        for f in sizes:
            shutil.copyfile(code_dir / f, staging / f)
        check_code_matches(staging, runs)  # the copy, not just the source
        for run in runs:
            shutil.copyfile(run.source, staging / log_name(run.seed))
        (staging / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
        (staging / "README.md").write_text(make_readme(sub, runs, sizes, hp_defaults(staging / "train_gpt.py")))
        staging.chmod(0o755)  # mkdtemp makes it 0700
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("logs", nargs="+", metavar="LOG", help="one finished train_gpt.py log per seed")
    p.add_argument("--name", required=True, help="folder name, YYYY-MM-DD_Name")
    p.add_argument("--track", required=True, choices=sorted(TRACK_ALIASES))
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--blurb", required=True, help="1-2 sentences: techniques and score")
    p.add_argument("--date", help="ISO date; default: the name's YYYY-MM-DD_ prefix")
    p.add_argument("--code-dir", type=Path, default=REPO_ROOT, help="where the counted code files are (default: repo root)")
    p.add_argument("--records-dir", type=Path, default=REPO_ROOT / "records", help="default: <repo>/records")
    p.add_argument("--force", action="store_true", help="replace an existing record folder")
    a = p.parse_args(argv)
    try:
        target = package(a.logs, name=a.name, track=a.track, author=a.author, github_id=a.github_id, blurb=a.blurb,
                         date=a.date, code_dir=a.code_dir, records_dir=a.records_dir, force=a.force)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sub = json.loads((target / "submission.json").read_text())
    print(f"record {target}: seeds {sub['seeds']} val_bpb {sub['val_bpb']:.8f} val_loss {sub['val_loss']:.8f} "
          f"bytes_total {sub['bytes_total']}")
    print(f"next: fill the TODO section of {target / 'README.md'}, then python tools/check_record.py {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
