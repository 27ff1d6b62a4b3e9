"""GPU preflight: one command, at most about 8 minutes on one GPU, that says whether this trainer works on this
machine and how fast it is, before anyone pays for an 8xH100 hour. Writes one markdown report.

Runbook
  python bench/gpu_preflight.py                        # on one CUDA GPU; report in bench/results/gpu_preflight_<date>.md
  python bench/gpu_preflight.py --out $OUT/preflight.md --data DIR --tokenizer PATH
  python bench/gpu_preflight.py --dry-run              # anywhere (CPU too): tiny shapes, seconds-long runs; it
                                                       # checks the harness, not the GPU
  python bench/gpu_preflight.py --baseline .pf/baseline/train_gpt.py   # also time the upstream baseline (below)
Data: --data / --tokenizer, else data/datasets/fineweb10B_sp1024 with data/tokenizers/fineweb_1024_bpe.model when
present, else the FineWeb sample in ../shared/data. Validation is the first --val-tokens tokens of the val shard, so
the three evaluations of each run stay short; val_bpb is comparable only between runs of the same report.

Stages, in this order; each runs in its own subprocess under a time limit, and a failure does not stop the next:
  env          GPU, driver, CUDA, torch, triton, python; the packages the trainer imports
  parity       pytest -m "not slow" of the kernels and the kernel model path on the device:
               tests/test_kernels_conv.py, test_kernels_memory.py, test_ops.py, test_gpu_rules.py (compiled kernels
               against references in bf16, the model's kernel path under real autocast)
  train:<cfg>  train_gpt.py for --train-seconds at the golf shapes (d 512, 9 layers, seq 1024, 524,288 tokens per
               step by accumulation, compiled with fullgraph=True): default, dense (MEM_EVERY=1, all chunks:
               attention at equal parameters), then conv1d_only after the bench; ms/step, tokens/s, peak memory,
               compile (warm-up) time, val_bpb, artifact bytes; and default / dense ms/step, the measured
               counterpart of bench/cost_model.py's ratio_to_attention
  train:baseline  only with --baseline PATH, right after train:dense: the upstream parameter-golf train_gpt.py
               (openai/parameter-golf, root, unmodified; bench/device_kit.sh copies it into the git-ignored
               .pf/baseline/, it is never committed here) for the same --train-seconds on the same data and
               validation slice, one process, 8 micro-batches of the same 524,288 tokens per step; its ms/step, peak
               memory, val_bpb, and default / baseline ms/step beside default / dense. The three programs' step times
               are what issue 23's stage 2 needs, so it goes before the bench (which the budget may then skip).
               Skipped when the env stage found no CUDA device (the baseline raises without one). A missing or
               failing baseline fails this stage only.
  bench        bench/bench_ops.py --no-steps: the kernels against their references and dense SDPA
  aot          bench/kernel_resources.py: registers, spills, shared memory of each kernel for sm_90
--budget caps the whole run: a stage is skipped when less than its minimum is left, and one that the budget
interrupts is "cut short"; neither counts as a failure. The report is rewritten after every stage, so a run cut
short still leaves one; it starts with a ranked list of what failed. Exit code: 0 if nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.configs import CONFIGS  # noqa: E402
from tools.runlog import RunLog, parse_log  # noqa: E402

TRAIN_CONFIGS = ("default", "dense", "conv1d_only")
PARITY_TESTS = ("tests/test_kernels_conv.py", "tests/test_kernels_memory.py", "tests/test_ops.py", "tests/test_gpu_rules.py")
PACKAGES = ("numpy", "sentencepiece", "zstandard", "triton")
BASELINE = "train:baseline"  # the upstream baseline's stage; `--skip baseline` leaves it out
# Failures are listed most serious first: ours before the upstream baseline's.
SEVERITY = ("env", "parity", "train:default", "train:dense", "train:conv1d_only", "bench", "aot", BASELINE)
TRAIN_EXTRA_SECONDS = 240  # compile warm-up, three evaluations, export: allowed on top of --train-seconds
# A stage is not started with less than this left of the budget (train, baseline: plus --train-seconds).
MIN_SECONDS = {"parity": 60, "train": 60, "baseline": 60, "bench": 30, "aot": 60}
STAGE_KINDS = ("env", "parity", "train", "baseline", "bench", "aot")  # what --skip takes
ENV_PROBE = """
import importlib, json, os, platform, subprocess, torch
facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda (torch)": str(torch.version.cuda),
         "cpu cores": str(os.cpu_count())}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts |= {"gpu": f"{torch.cuda.device_count()} x {p.name}", "gpu memory": f"{p.total_memory >> 30} GiB",
              "compute capability": f"{p.major}.{p.minor}", "multiprocessors": str(p.multi_processor_count)}
    try:
        facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        facts["driver"] = "unknown (no nvidia-smi)"
for name in %r:
    try:
        facts[name] = getattr(importlib.import_module(name), "__version__", "present")
    except ImportError:
        facts[name] = "MISSING"
print(json.dumps(facts))
""" % (PACKAGES,)
DRY_ENV = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="1", NUM_KV_HEADS="1", MLP_MULT="2", TRAIN_SEQ_LEN="128",
               TRAIN_BATCH_TOKENS="2048", MEM_CHUNK="16", MEM_TOPK="1", BIGRAM_BUCKETS="64", BIGRAM_DIM="16",
               VAL_BATCH_SIZE="16384", EVAL_STRIDE="64")
DRY_TESTS = "opcheck or self_test or rejects or emulation"  # the quick parity tests (-k) a dry run takes


@dataclass
class Stage:
    name: str
    status: str = "not run"  # ok, FAILED, skipped, cut short
    seconds: float = 0.0
    note: str = ""
    output: str = ""
    facts: dict[str, str] = field(default_factory=dict)


def first_error(stdout: str, stderr: str, returncode: int) -> str:
    """The line that says why a subprocess failed: an `error:` line, else the last traceback or pytest line."""
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    for pattern in (r"^error: ", r"^(FAILED|ERROR) ", r"^\w+(Error|Exception)\b"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:400]
    return lines[-1][:400] if lines else f"exit code {returncode}"


def run_stage(stage: Stage, command: list[str], env: dict[str, str], limit: float, left: float, cwd: Path = ROOT) -> bool:
    """Run one stage's command for at most min(limit, left) seconds; True if it exited 0."""
    t0, timeout, cut_by_budget = time.perf_counter(), min(limit, left), left < limit
    try:
        out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stage.status, stage.note = ("cut short", "the budget ran out") if cut_by_budget else ("FAILED", "timed out")
        stage.note += f" after {timeout:.0f} s"
        stage.output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stage.seconds = time.perf_counter() - t0
        return False
    stage.seconds, stage.output = time.perf_counter() - t0, out.stdout
    ok = out.returncode == 0
    stage.status = "ok" if ok else "FAILED"
    if not ok:
        stage.note = first_error(out.stdout, out.stderr, out.returncode)
    return ok


def environment(stage: Stage, dry_run: bool, left: float) -> None:
    """The machine's facts, read in a subprocess (so this process never holds a CUDA context)."""
    if not run_stage(stage, [sys.executable, "-c", ENV_PROBE], os.environ.copy(), 120, left):
        return
    stage.facts, stage.output = json.loads(stage.output), ""
    problems = [f"missing packages: {', '.join(k for k, v in stage.facts.items() if v == 'MISSING')} "
                f"(pip install -r requirements.txt)"] if "MISSING" in stage.facts.values() else []
    if "gpu" not in stage.facts and not dry_run:
        problems.append("no CUDA device (torch.cuda.is_available() is False); --dry-run checks the harness on CPU")
    stage.status, stage.note = ("FAILED", "; ".join(problems)) if problems else ("ok", "")


def prepare_data(data: Path, val_tokens: int, work: Path) -> Path:
    """A data folder with the train shards linked and the first val_tokens tokens of the val split as its val shard."""
    import numpy as np

    from data.common import read_shard, write_shard

    train = sorted(data.glob("fineweb_train_*.bin"))
    vals = sorted(data.glob("fineweb_val_*.bin"))
    if not train or not vals:
        raise SystemExit(f"error: no fineweb_train_*.bin / fineweb_val_*.bin shards in {data}")
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    for path in train:
        (out / path.name).unlink(missing_ok=True)
        (out / path.name).symlink_to(path.resolve())
    write_shard(out / "fineweb_val_000000.bin", np.concatenate([read_shard(p) for p in vals])[:val_tokens])
    return out


def train_env(cli: argparse.Namespace, run: str, data: Path, settings: dict[str, str]) -> dict[str, str]:
    """The environment of one training run: ours (settings: the config's) or the upstream baseline's, which reads the
    same names (DATA_PATH, TOKENIZER_PATH, RUN_ID, VAL_LOSS_EVERY, MAX_WALLCLOCK_SECONDS, WARMUP_STEPS, the shapes)."""
    env = {**os.environ, **settings, "DATA_PATH": str(data), "TOKENIZER_PATH": str(cli.tokenizer),
           "RUN_ID": f"preflight_{run}", "VAL_LOSS_EVERY": "0", "MAX_WALLCLOCK_SECONDS": str(cli.train_seconds),
           "WARMUP_STEPS": "3", "TRAIN_LOG_EVERY": "10", "PYTHONUNBUFFERED": "1"}
    env |= {} if run == "default" else {"TTT_EPOCHS": "0"}  # TTT's GPU time is measured once, on the default
    return env | (DRY_ENV | {"WARMUP_STEPS": "1"} if cli.dry_run else {})


def train_facts(run: RunLog) -> dict[str, str]:
    stop, tokens = run.stopped, int(run.hp["train_batch_tokens"])
    return {"tokens/step": f"{tokens:,}", "ms/step": f"{stop.step_avg_ms:.1f}", "tokens/s": f"{tokens / stop.step_avg_ms * 1000:,.0f}",
            "steps": str(stop.steps), "peak MiB": str(stop.peak_mem_mib) if stop.peak_mem_mib is not None else "-",
            "compile s": f"{run.warmup_ms / 1000:.1f}" if run.warmup_ms is not None else "-",
            "prequant bpb": f"{run.prequant.val_bpb:.4f}" if run.prequant else "-",
            "roundtrip bpb": f"{run.roundtrip.val_bpb:.4f}" if run.roundtrip else "-",
            "sliding bpb": f"{run.sliding.val_bpb:.4f}", "sliding eval s": f"{(run.sliding.eval_time_ms or 0) / 1000:.1f}",
            "ttt bpb": f"{run.ttt.val_bpb:.4f}" if run.ttt else "-",
            "ttt eval s": f"{(run.ttt.eval_time_ms or 0) / 1000:.1f}" if run.ttt else "-",
            "eval total s": f"{run.eval_total_ms / 1000:.1f}" if run.eval_total_ms is not None else "-",
            "artifact bytes": f"{run.sizes.total:,}", "params": f"{run.model_params:,}"}


def baseline_facts(log: str) -> dict[str, str]:
    """The upstream baseline's stdout in train_facts' columns (those it prints). Its last `step:S/I val_loss:L
    val_bpb:B train_time:Xms step_avg:Yms` line closes training; `peak memory allocated: M MiB`, `model_params:P`,
    `Total submission size int8+zlib: N bytes` and `final_int8_zlib_roundtrip_exact ... val_bpb:B` follow."""
    def last(pattern: str) -> str | None:
        hits = re.findall(pattern, log, re.MULTILINE)
        return hits[-1] if hits else None

    stop = last(r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:(\S+) train_time:\d+ms step_avg:([\d.]+)ms")
    tokens = last(r"^train_batch_tokens:(\d+) ")
    if stop is None or tokens is None:
        raise ValueError("no `train_batch_tokens:` line or no final `step:S/I val_loss:... step_avg:...ms` line")
    (steps, bpb, step_ms), tokens = stop, int(tokens)
    peak, params, size = last(r"^peak memory allocated: (\d+) MiB"), last(r"^model_params:(\d+)$"), \
        last(r"^Total submission size int8\+zlib: (\d+) bytes")
    roundtrip = last(r"^final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)")
    return {"tokens/step": f"{tokens:,}", "ms/step": f"{float(step_ms):.1f}",
            "tokens/s": f"{tokens / float(step_ms) * 1000:,.0f}", "steps": steps, "peak MiB": peak or "-",
            "prequant bpb": f"{float(bpb):.4f}", "roundtrip bpb": f"{float(roundtrip):.4f}" if roundtrip else "-",
            "artifact bytes": f"{int(size):,}" if size else "-", "params": f"{int(params):,}" if params else "-"}


def rank_failures(stages: list[Stage]) -> list[str]:
    """Failed stages, most serious first (SEVERITY order): one line each, with the reason."""
    failed = [s for s in stages if s.status == "FAILED"]
    failed.sort(key=lambda s: SEVERITY.index(s.name) if s.name in SEVERITY else len(SEVERITY))
    return [f"**{s.name}**: {s.note}" for s in failed]


def render(stages: list[Stage], cli: argparse.Namespace, command: str, started: str) -> str:
    env = next((s for s in stages if s.name == "env"), Stage("env"))
    gpu = env.facts.get("gpu", "no GPU")
    failures = rank_failures(stages)
    lines = [f"# GPU preflight{' (dry run)' if cli.dry_run else ''}: {gpu}", "",
             f"- date: {started}; command: `{command}`",
             f"- data: {cli.data} (val: first {cli.val_tokens:,} tokens), tokenizer: {cli.tokenizer}",
             f"- training: {cli.train_seconds:g} s per configuration, one process; budget {cli.budget:g} s", "",
             "## What failed, most serious first", ""]
    lines += [f"{i}. {f}" for i, f in enumerate(failures, 1)] or ["Nothing failed."]
    skipped = [f"{s.name} {s.status} ({s.note})" for s in stages if s.status in ("skipped", "cut short")]
    lines += ["", *([f"Not run to the end: {', '.join(skipped)}.", ""] if skipped else []), "## Environment", "",
              "| item | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in env.facts.items()], "",
              "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|",
              *[f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.note.replace('|', '/')} |" for s in stages], ""]
    runs = [s for s in stages if s.name.startswith("train:") and s.facts]
    if runs:
        keys = list(dict.fromkeys(k for s in runs for k in s.facts))
        lines += ["## Training runs", "", "| config | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
                  *[f"| {s.name[6:]} | " + " | ".join(s.facts.get(k, "-") for k in keys) + " |" for s in runs], "",
                  "ms/step is one optimizer step of the whole batch on this one device (8 micro-batches by "
                  "accumulation); on 8 GPUs each runs one micro-batch, so a step takes about ms/step / 8 plus the "
                  "gradient all-reduce. compile s is the warm-up (compiles), excluded from training time.", ""]
        lines += step_ratios({s.name[6:]: s.facts for s in runs})
    for name, title in (("parity", "Parity tests on the device"), ("bench", "Kernel benchmark (bench/bench_ops.py)"),
                        ("aot", "Kernel resources for sm_90 (bench/kernel_resources.py)")):
        stage = next((s for s in stages if s.name == name), None)
        if stage and stage.output:
            tail = stage.output.strip().splitlines()[-60:]
            lines += [f"## {title}", "", "```text", *tail, "```", ""]
    return "\n".join(lines)


RATIO_NOTES = {  # what default / <run> ms/step compares
    "dense": "dense: every mixer dense causal attention, the same shape). `python bench/cost_model.py --json` predicts "
             "it for 8xH100 as `ratio_to_attention` (issue 12); this one-GPU step has no all-reduce, which both would "
             "pay about equally.",
    "baseline": "baseline: the upstream parameter-golf train_gpt.py, unmodified: 9 attention blocks at d 512, the same "
                "tokens per step; int8+zlib export, no sliding-window eval, no compile time printed).",
}


def step_ratios(facts: dict[str, dict[str, str]]) -> list[str]:
    """The measured default / dense and default / baseline step times, for the runs that report both."""
    lines = []
    for other, note in RATIO_NOTES.items():
        if "ms/step" in facts.get("default", {}) and "ms/step" in facts.get(other, {}):
            ratio = float(facts["default"]["ms/step"]) / float(facts[other]["ms/step"])
            lines += [f"default / {other} ms/step: **{ratio:.3f}** measured here ({note}", ""]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    shared = ROOT.parent / "shared" / "data"
    local = ROOT / "data" / "datasets" / "fineweb10B_sp1024"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and seconds-long runs (CPU is fine)")
    parser.add_argument("--data", type=Path, default=local if local.is_dir() else shared / "datasets" / "fineweb_sample_sp1024")
    parser.add_argument("--tokenizer", type=Path, default=(ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model")
                        if local.is_dir() else shared / "tokenizers" / "fineweb_1024_bpe.model")
    parser.add_argument("--train-seconds", type=float, default=None, help="per configuration (default 45; dry run 5)")
    parser.add_argument("--val-tokens", type=int, default=262_144)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole preflight")
    parser.add_argument("--skip", default="", help=f"comma-separated stages to leave out ({', '.join(STAGE_KINDS)})")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="the upstream parameter-golf train_gpt.py: adds the train:baseline stage")
    parser.add_argument("--out", type=Path, default=None, help="report path (default bench/results/gpu_preflight_<date>.md)")
    cli = parser.parse_args(argv)
    cli.train_seconds = cli.train_seconds or (5.0 if cli.dry_run else 45.0)
    if cli.train_seconds <= 0 or cli.val_tokens < 4096 or cli.budget <= 0:
        parser.error("--train-seconds and --budget must be positive, --val-tokens at least 4096")
    unknown = set(filter(None, cli.skip.split(","))) - set(STAGE_KINDS)
    if unknown:
        parser.error(f"unknown stage(s) in --skip: {', '.join(sorted(unknown))}")
    if not cli.tokenizer.is_file() or not cli.data.is_dir():
        parser.error(f"no data at {cli.data} or no tokenizer at {cli.tokenizer}; pass --data and --tokenizer")
    cli.data, cli.tokenizer = cli.data.resolve(), cli.tokenizer.resolve()
    cli.out = cli.out or ROOT / "bench" / "results" / f"gpu_preflight_{datetime.date.today().isoformat()}.md"
    return cli


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    command = "python bench/gpu_preflight.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started, deadline = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter() + cli.budget
    skip = set(cli.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="preflight_"))
    data = prepare_data(cli.data, cli.val_tokens, work)
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tests = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "not slow", *PARITY_TESTS]
    plan: list[tuple[str, float, object]] = [("env", 120, None), ("parity", 240, tests + (["-k", DRY_TESTS] if cli.dry_run else []))]
    plan += [(f"train:{c}", cli.train_seconds + TRAIN_EXTRA_SECONDS, c) for c in TRAIN_CONFIGS[:2]]
    plan += [(BASELINE, cli.train_seconds + TRAIN_EXTRA_SECONDS, cli.baseline.resolve())] if cli.baseline else []
    plan += [("bench", 180, [sys.executable, "bench/bench_ops.py", "--no-steps", *(["--small"] if cli.dry_run else [])]),
             (f"train:{TRAIN_CONFIGS[2]}", cli.train_seconds + TRAIN_EXTRA_SECONDS, TRAIN_CONFIGS[2]),
             ("aot", 240, [sys.executable, "bench/kernel_resources.py"])]
    stages: list[Stage] = []
    for i, (name, limit, what) in enumerate(plan, 1):
        stage, kind = Stage(name), "baseline" if name == BASELINE else name.split(":")[0]
        stages.append(stage)
        left = deadline - time.perf_counter()
        needed = MIN_SECONDS.get(kind, 10) + (cli.train_seconds if kind in ("train", "baseline") else 0)
        if kind in skip:
            stage.status, stage.note = "skipped", "--skip"
        elif kind == "baseline" and not what.is_file():
            stage.status, stage.note = "FAILED", f"no baseline at {what} (BASELINE=... bash bench/device_kit.sh)"
        elif kind == "baseline" and stages[0].facts and "gpu" not in stages[0].facts:
            stage.status, stage.note = "skipped", "the env stage found no CUDA device; the baseline requires one"
        elif left < needed:
            stage.status, stage.note = "skipped", f"{left:.0f} s of the budget left, needs at least {needed:.0f} s"
        elif kind == "env":
            environment(stage, cli.dry_run, left)
        elif kind in ("train", "baseline"):
            script, settings = (what, {}) if kind == "baseline" else \
                (ROOT / "train_gpt.py", CONFIGS[what] | {"ARTIFACT_PATH": str(work / f"{what}.ptz")})
            # cwd: the scratch folder, where the baseline writes logs/ and final_model.pt, final_model.int8.ptz
            if run_stage(stage, [sys.executable, str(script)], train_env(cli, name[6:], data, settings), limit, left,
                         cwd=work):
                try:
                    stage.facts = baseline_facts(stage.output) if kind == "baseline" else \
                        train_facts(parse_log(stage.output, name))
                except (ValueError, KeyError) as e:
                    stage.status, stage.note = "FAILED", f"unreadable log: {e}"
            stage.output = ""
        else:
            env = {k: v for k, v in base_env.items() if k != "TRITON_INTERPRET"} if kind == "aot" else base_env
            run_stage(stage, what, env, limit, left)
        print(f"preflight [{i}/{len(plan)}] {name}: {stage.status} ({stage.seconds:.0f} s) {stage.note}", flush=True)
        cli.out.parent.mkdir(parents=True, exist_ok=True)
        cli.out.write_text(render(stages, cli, command, started))
    print(f"preflight report: {cli.out}")
    return 1 if rank_failures(stages) else 0


if __name__ == "__main__":
    sys.exit(main())
