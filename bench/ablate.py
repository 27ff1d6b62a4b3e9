"""Ablation harness: run named configurations on the same data for the same wallclock, seeds apart, and write
one table (config, params, artifact bytes, tokens/s, steps, val_bpb plain and sliding, delta to a reference).

Runbook
  python bench/ablate.py --list                                   # the named configurations and their settings
  python bench/ablate.py --configs default,conv1d_only,conv1d_2d,dense --seeds 1,2 --seconds 180 \
      --out bench/results/golf_core.md                            # golf scale: the trainer's defaults (GPU)
  python bench/ablate.py --scale tiny --configs default,dense --seeds 1,2 --seconds 60 \
      --data DIR --tokenizer PATH --out bench/results/tiny_core.md  # tiny scale on CPU
  python bench/ablate.py --scale tiny --steps 100 --jobs 2 ...  # equal steps instead of equal time, 2 runs at once
Every run is `train_gpt.py` in a subprocess (one process; `--nproc N` uses torchrun) with the base settings of the
scale, then the configuration's, then `--env KEY=VALUE` overrides, plus SEED and the budget: MAX_WALLCLOCK_SECONDS
(--seconds), or ITERATIONS with no wallclock cap (--steps). `--jobs J` runs J trainings at once with
OMP_NUM_THREADS = cores / J; their tokens/s then share the machine and compare only within one table. Logs and
artifacts land in --work. The markdown file is rewritten after every finished run; it names the date, the
hardware (from the logs), the command and the data; a failed run becomes a row with its error line. delta = mean sliding val_bpb minus the reference's, +- the
standard error of that difference over seeds (0 with one seed each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.runlog import RunLog, parse_log  # noqa: E402
from train_gpt import Hyperparameters  # noqa: E402

CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "conv1d_only": {"MEM_EVERY": "0", "CONV2D_K": "0"},
    "conv1d_2d": {"MEM_EVERY": "0"},
    "dense": {"MEM_EVERY": "1", "MEM_TOPK": "1000000"},  # same parameters: a memory block's mixer is 3d^2 like ConvMix
    **{f"topk{k}": {"MEM_TOPK": str(k)} for k in (1, 2, 4, 8)},
    **{f"chunk{c}": {"MEM_CHUNK": str(c)} for c in (32, 64, 128)},
    **{f"rope_{r}": {"MEM_ROPE": r} for r in ("all", "half", "none")},
    "relu2": {"MLP_ACT": "relu2"},
    "qat_late": {"QAT_START_FRAC": "0.7"},
    "no_qat": {"QAT": "0"},
    "no_clip_search": {"CLIP_SEARCH": "0"},
    "embed_fp16": {"EMBED_QUANT": "fp16"},
    "no_muon_wd": {"MUON_WEIGHT_DECAY": "0"},
    "ema_0999": {"EMA_DECAY": "0.999"},
    "no_bigram": {"BIGRAM_BUCKETS": "0"},
    "dilated": {"CONV2D_LAYOUT": "dilated"},  # the 2D branch's taps as a plain dilated 1D conv: does Hilbert earn its place?
    "train_seq_x2": {},  # TRAIN_SEQ_LEN and EVAL_SEQ_LEN at twice the scale's TRAIN_SEQ_LEN (golf: 2048)
    "eval_seq_x2": {},  # EVAL_SEQ_LEN at twice the scale's TRAIN_SEQ_LEN
    "ttt": {"TTT_EPOCHS": "3", "TTT_CHUNK_TOKENS": "32768"},
}
SEQ_DOUBLED = {"train_seq_x2": ("TRAIN_SEQ_LEN", "EVAL_SEQ_LEN"), "eval_seq_x2": ("EVAL_SEQ_LEN",)}
SCALES: dict[str, dict[str, str]] = {
    "golf": {},  # the trainer's defaults: d = 512, 9 layers, seq 1024
    "tiny": {"NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "256",
             "TRAIN_BATCH_TOKENS": "8192", "MEM_CHUNK": "32", "ITERATIONS": "100000", "WARMDOWN_ITERS": "60",
             "WARMUP_STEPS": "2", "TRAIN_LOG_EVERY": "50", "VAL_LOSS_EVERY": "0", "VAL_BATCH_SIZE": "65536"},
}


def config_env(name: str, scale: str) -> dict[str, str]:
    """A configuration's settings at a scale (the doubled sequence lengths depend on the scale's)."""
    seq = 2 * int(SCALES[scale].get("TRAIN_SEQ_LEN", Hyperparameters.train_seq_len))
    return {**CONFIGS[name], **{key: str(seq) for key in SEQ_DOUBLED.get(name, ())}}


def run_one(name: str, env: dict[str, str], seed: int, cli: argparse.Namespace) -> RunLog | str:
    """One training run; its parsed log, or the reason it failed."""
    run_id = f"{name}_seed{seed}"
    budget = {"ITERATIONS": str(cli.steps), "MAX_WALLCLOCK_SECONDS": "0"} if cli.steps else \
        {"MAX_WALLCLOCK_SECONDS": str(cli.seconds)}
    full = {**os.environ, **SCALES[cli.scale], **config_env(name, cli.scale), **env, **budget, "SEED": str(seed), "RUN_ID": run_id,
            "ARTIFACT_PATH": str(cli.work / f"{run_id}.ptz")}
    if cli.jobs > 1:
        full["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cli.jobs))
    full |= {k: v for k, v in (("DATA_PATH", cli.data), ("TOKENIZER_PATH", cli.tokenizer)) if v}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cli.nproc}"] \
        if cli.nproc > 1 else [sys.executable]
    out = subprocess.run([*launcher, str(ROOT / "train_gpt.py")], env=full, cwd=cli.work, capture_output=True, text=True)
    print(f"ablate {run_id} exit:{out.returncode}", flush=True)
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {out.returncode}"
    return parse_log(out.stdout, run_id)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict[str, list[RunLog | str]], reference: str, scale: str) -> list[str]:
    """One row per configuration; "headline" is the sliding-window score, or the TTT score when TTT ran, and
    eval s is the time of that evaluation."""
    rows = ["| config | settings | params | bytes_total | tok/s | steps | val_bpb plain | val_bpb headline | eval s | delta |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    ref = [r.score.val_bpb for r in results.get(reference, []) if isinstance(r, RunLog)]
    for name, runs in results.items():
        settings = " ".join(f"{k}={v}" for k, v in config_env(name, scale).items()) or "-"
        ok = [r for r in runs if isinstance(r, RunLog)]
        if not ok:
            rows.append(f"| {name} | {settings} | failed: {runs[0]} | | | | | | | |")
            continue
        sliding, plain = mean_std([r.score.val_bpb for r in ok]), mean_std([r.roundtrip.val_bpb for r in ok])
        tok_s = statistics.fmean(int(r.hp["train_batch_tokens"]) * r.stopped.steps / r.stopped.train_time_ms * 1000 for r in ok)
        delta = "-"
        if ref and name != reference:
            ref_mean, ref_std = mean_std(ref)
            spread = (sliding[1] ** 2 / len(ok) + ref_std ** 2 / len(ref)) ** 0.5
            delta = f"{sliding[0] - ref_mean:+.4f} +- {spread:.4f}"
        rows.append(f"| {name} | {settings} | {ok[0].model_params:,} | {max(r.sizes.total for r in ok):,} | {tok_s:,.0f} | "
                    f"{statistics.fmean(r.stopped.steps for r in ok):.0f} | {plain[0]:.4f} +- {plain[1]:.4f} | "
                    f"{sliding[0]:.4f} +- {sliding[1]:.4f} | {statistics.fmean(r.score.eval_time_ms or 0.0 for r in ok) / 1000:.1f} | {delta} |")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the named configurations and exit")
    parser.add_argument("--configs", default="default,conv1d_only,conv1d_2d,dense")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--seconds", type=float, default=180.0, help="training wallclock per run")
    parser.add_argument("--steps", type=int, default=0, help="train every run for exactly this many steps instead")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--scale", choices=sorted(SCALES), default="golf")
    parser.add_argument("--reference", default="default")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--data", type=lambda p: str(Path(p).resolve()), help="DATA_PATH for every run")
    parser.add_argument("--tokenizer", type=lambda p: str(Path(p).resolve()), help="TOKENIZER_PATH for every run")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--work", type=lambda p: Path(p).resolve(), default=ROOT / "logs" / "ablate")
    parser.add_argument("--out", type=Path, required=False, help="markdown results file to write")
    cli = parser.parse_args(argv)
    unknown = [c for c in cli.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; --list shows them")
    if any("=" not in e for e in cli.env):
        parser.error("--env takes KEY=VALUE")
    if cli.steps < 0 or cli.jobs < 1:
        parser.error("--steps must be >= 0 and --jobs >= 1")
    if not cli.list and cli.out is None:
        parser.error("--out is required")
    return cli


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    if cli.list:
        for name in CONFIGS:
            print(f"{name:16} {' '.join(f'{k}={v}' for k, v in config_env(name, cli.scale).items()) or '(the defaults)'}")
        return 0
    cli.work.mkdir(parents=True, exist_ok=True)
    env = dict(e.split("=", 1) for e in cli.env)
    names, seeds = cli.configs.split(","), [int(s) for s in cli.seeds.split(",")]
    results: dict[str, list[RunLog | str]] = {name: [] for name in names}
    with concurrent.futures.ThreadPoolExecutor(cli.jobs) as pool:
        futures = {pool.submit(run_one, name, env, seed, cli): name for name in names for seed in seeds}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]].append(future.result())
            write_results(cli, argv, results)
    print(cli.out.read_text())
    return 0 if any(isinstance(r, RunLog) for runs in results.values() for r in runs) else 1


def write_results(cli: argparse.Namespace, argv: list[str] | None, results: dict[str, list[RunLog | str]]) -> None:
    done = [r for runs in results.values() for r in runs if isinstance(r, RunLog)]
    hardware = done[0].hardware if done else "unknown (no run finished)"
    command = "python bench/ablate.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    budget = f"{cli.steps} training steps" if cli.steps else f"{cli.seconds:g} s of training"
    lines = [f"# Ablation, {cli.scale} scale, {budget} per run", "",
             f"- date: {datetime.date.today().isoformat()}", f"- hardware: {hardware}; runs at once: {cli.jobs}",
             f"- command: `{command}`", f"- data: {cli.data or 'DATA_PATH default'}; tokenizer: {cli.tokenizer or 'default'}",
             f"- base settings ({cli.scale}): {' '.join(f'{k}={v}' for k, v in SCALES[cli.scale].items()) or 'the trainer defaults'}",
             f"- overrides: {' '.join(cli.env) or 'none'}; seeds: {cli.seeds}; reference: {cli.reference}", "",
             *table({k: v for k, v in results.items() if v}, cli.reference, cli.scale), ""]
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
