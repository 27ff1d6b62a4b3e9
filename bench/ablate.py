"""Ablation harness: run named configurations on the same data for the same wallclock, seeds apart, and write
one table (config, params, forward FLOPs per token, artifact bytes, tokens/s, steps, val_bpb plain and sliding,
delta to a reference).

Runbook
  python bench/ablate.py --list                                   # the named configurations and their settings
  python bench/ablate.py --configs default,conv1d_only,conv1d_2d,dense --seeds 1,2 --seconds 180 \
      --out bench/results/golf_core.md                            # golf scale: the trainer's defaults (GPU)
  python bench/ablate.py --scale tiny --configs default,dense --seeds 1,2 --seconds 60 \
      --data DIR --tokenizer PATH --out bench/results/tiny_core.md  # tiny scale on CPU
  python bench/ablate.py --scale tiny --steps 100 --jobs 2 ...  # equal steps instead of equal time, 2 runs at once
  python bench/ablate.py --scale proxy --steps 300 --jobs 2 --configs default,dense --eval-at 2048 --resume \
      --data ../shared/data/datasets/fineweb_sample_sp1024 --tokenizer PATH --work /tmp/proxy/work \
      --out bench/results/proxy_steps_cpu.md --plot bench/results/proxy_steps_cpu.png  # golf geometry on CPU
  python bench/ablate.py --scale proxy --steps 300 --equal-time ...  # equal predicted 8xH100 time, not equal steps
Every run is `train_gpt.py` (with --cuda-rules `tools/cuda_rules.py`: a GPU run's dtypes on CPU) in a subprocess
(one process; `--nproc N` uses torchrun) with the base settings of the scale, then the configuration's, then
`--env KEY=VALUE` overrides, plus SEED and the budget: MAX_WALLCLOCK_SECONDS (--seconds), or ITERATIONS with no
wallclock cap (--steps). `--jobs J` runs J trainings at once with OMP_NUM_THREADS = cores / J; their tokens/s
then share the machine and compare only within one table. Logs and
artifacts land in --work; --resume reuses a finished log there whose hyperparameters and world size match (not
the code: use a fresh --work after a change to what training computes). --eval-at L
re-scores each artifact at EVAL_SEQ_LEN=L (EVAL_ONLY=1). The proxy scale scores a fixed val slice that it writes
to --work. fwd MFLOP/tok is bench/flops.py's count. The markdown file is rewritten after every finished run; it
names the date, the hardware (from the logs), the command and the data; a failed run becomes a row with its error
line. delta = mean sliding val_bpb minus the reference's, +- the standard error of that difference over seeds (0
with one seed each).

Equal time (--equal-time): equal steps flatter whatever adds compute, since the real run is capped at 600 s. With
--steps N, the reference gets N steps and every other configuration N x (reference's ms/step) / (its ms/step),
rounded, where ms/step is bench/cost_model.py's 8xH100 prediction at the golf shape the configuration maps to:
its own settings on the trainer's defaults (not the scale's base settings, not --env). WARMDOWN_ITERS stays in
steps, as the trainer keeps it when the cap binds. With --seconds instead (golf scale on a GPU), the runs already
share a wallclock, and the table's ms/step is measured from the logs. Two more columns: ms/step and its source.
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
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cost_model  # noqa: E402
from bench.configs import CONFIGS, SCALES, VAL_SLICE_TOKENS, config_env  # noqa: E402
from bench.flops import count_forward_flops  # noqa: E402
from data.common import read_shard, write_shard  # noqa: E402
from tools.runlog import RunLog, parse_log  # noqa: E402
from train_gpt import FatalError, Hyperparameters  # noqa: E402

def settings(name: str, cli: argparse.Namespace) -> dict[str, str]:
    """Every setting a run of this configuration gets apart from its seed, budget and paths."""
    return {**SCALES[cli.scale], **config_env(name, cli.scale), **dict(e.split("=", 1) for e in cli.env)}


def forward_mflops(name: str, cli: argparse.Namespace) -> str:
    """Forward MFLOP per token at the training length (bench/flops.py), or why it cannot be counted."""
    try:
        return f"{count_forward_flops(Hyperparameters.from_env(settings(name, cli))).total / 1e6:.2f}"
    except (FatalError, ValueError) as e:
        return f"- ({e})"


def prepare_data(cli: argparse.Namespace) -> None:
    """At a scale with a validation slice, point --data at a folder in --work holding links to its train shards
    and the slice (the first N + 1 tokens of its val shards, in order): every run scores the same N targets."""
    n = VAL_SLICE_TOKENS.get(cli.scale)
    if n is None:
        return
    source = Path(cli.data)
    val = np.concatenate([read_shard(p) for p in sorted(source.glob("fineweb_val_*.bin"))] or [np.zeros(0, np.uint16)])
    if val.size < n + 1:
        raise SystemExit(f"error: {source} holds {val.size} val tokens; the {cli.scale} scale scores the first {n + 1}")
    folder = cli.work / f"data_val{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("fineweb_train_*.bin"):  # links from an earlier --data, broken ones too
        stale.unlink()
    for shard in sorted(source.glob("fineweb_train_*.bin")):
        (folder / shard.name).symlink_to(shard.resolve())
    write_shard(folder / "fineweb_val_000000.bin", val[:n + 1])
    cli.data = str(folder)


# Settings whose default changed after logs without them were written: such a log trained with this value.
# The clip k settings came with the rms grid (2026-12-06); a log without them exported on the row-max grid, which
# no setting of today's code reproduces.
VALUE_BEFORE_ADDED = {"parallel_from": "0",  # PARALLEL_FROM came in off; the default became -2 on 2026-12-06
                      **dict.fromkeys(("matrix_clip_k", "bigram_clip_k", "embed_clip_k"), "row max"),
                      "ttt_epochs": "0"}  # TTT came in off; on by default since issue 34
INERT_WITHOUT_TTT = ("ttt_", "max_eval_seconds")  # settings (prefixes) that change no score when TTT_EPOCHS=0,
# deleted ones included (TTT_MODE=sgd and its TTT_CHUNK_TOKENS lost to LoRA TTT, issue 34)
# Levers deleted after losing their A/B, with their off value: a log naming one at it trained today's code.
RETIRED_OFF = {"recur": "", "mem_conv": "0", "route_pre_rope": "False", "fuse_gate": "0"}


def reusable(path: Path, env: dict[str, str], world_size: int, cuda_rules: bool = False) -> RunLog | None:
    """With --resume: the finished log of an earlier run with exactly these hyperparameters and world size, else
    None. A setting the log lacks matches only at its default: it was added after the run, and a new setting's
    default keeps what training computed before (the proxy default rerun after GPTQ, TTT_MODE and PRESET were
    added reproduced its val_bpb to 8 decimals), except where that default changed since (VALUE_BEFORE_ADDED). A
    deleted lever the log names matches only at its off value (RETIRED_OFF). With TTT off in both, TTT's settings
    are not compared (INERT_WITHOUT_TTT). The code is not compared: after a
    change to what training computes, use a fresh --work. A run under tools/cuda_rules.py (its log says
    cuda_rules:) serves only --cuda-rules.
    One exception to the defaults rule: a CUDA log older than BODY_DTYPE trained with an fp32 stream, though it
    reads as bf16 (none existed when BODY_DTYPE was added, 2026-12-02)."""
    try:
        text = path.read_text()
        run = parse_log(text, str(path))
        expected = {key: str(value) for key, value in asdict(Hyperparameters.from_env(env)).items()}
    except (OSError, ValueError, FatalError):
        return None
    defaults = {key: str(value) for key, value in asdict(Hyperparameters()).items()} | VALUE_BEFORE_ADDED
    hp = {key: value for key, value in run.hp.items() if RETIRED_OFF.get(key) != value}
    logged = {key: hp.get(key, defaults[key]) for key in expected}
    if logged["ttt_epochs"] == expected["ttt_epochs"] == "0":
        logged, expected, hp = ({k: v for k, v in d.items() if not k.startswith(INERT_WITHOUT_TTT)}
                                for d in (logged, expected, hp))
    same = logged == expected and set(hp) <= set(expected) and ("\ncuda_rules:" in "\n" + text) == cuda_rules
    return run if same and run.world_size == world_size else None


def launch(run_id: str, env: dict[str, str], cli: argparse.Namespace, reuse: bool) -> RunLog | str:
    """One train_gpt.py process (reused from its log when reuse); its parsed log, or why it failed."""
    full = {**os.environ, **env, "RUN_ID": run_id}
    if cli.jobs > 1:
        full["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cli.jobs))
    full |= {k: v for k, v in (("DATA_PATH", cli.data), ("TOKENIZER_PATH", cli.tokenizer)) if v}
    log_path = cli.work / "logs" / f"{run_id}.txt"
    if reuse and (done := reusable(log_path, full, cli.nproc, cli.cuda_rules)) is not None:
        print(f"ablate {run_id} reused:{log_path}", flush=True)
        return done
    log_path.unlink(missing_ok=True)  # the trainer appends to its log
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cli.nproc}"] \
        if cli.nproc > 1 else [sys.executable]
    trainer = ROOT / ("tools/cuda_rules.py" if cli.cuda_rules else "train_gpt.py")
    out = subprocess.run([*launcher, str(trainer)], env=full, cwd=cli.work, capture_output=True, text=True)
    print(f"ablate {run_id} exit:{out.returncode}", flush=True)
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {out.returncode}"
    return parse_log(out.stdout, run_id)


def predicted_ms(names: list[str]) -> dict[str, float]:
    """8xH100 ms per step (bench/cost_model.py) of each configuration at its golf shape: its own settings on the
    trainer's defaults, at the sequence length they give."""
    rates = cost_model.calibrate()
    envs = {name: config_env(name, "golf") for name in names}
    return {name: cost_model.predict(env, int(env.get("TRAIN_SEQ_LEN", Hyperparameters.train_seq_len)), rates, None,
                                     False)["ms_per_step"] for name, env in envs.items()}


def equal_time_steps(ref_steps: int, ref_ms: float, ms: float) -> int:
    """The steps that take as long at ms per step as ref_steps take at ref_ms (at least one)."""
    return max(1, round(ref_steps * ref_ms / ms))


def step_budgets(names: list[str], cli: argparse.Namespace) -> dict[str, int]:
    """Training steps per configuration: --steps for all, or with --equal-time each one's share of the reference's
    predicted time (cli.ms_per_step is set to the predictions); empty under --seconds."""
    if not cli.steps:
        return {}
    if not cli.equal_time:
        return {name: cli.steps for name in names}
    cli.ms_per_step = predicted_ms(sorted({*names, cli.reference}))
    return {name: equal_time_steps(cli.steps, cli.ms_per_step[cli.reference], cli.ms_per_step[name]) for name in names}


def run_one(name: str, seed: int, cli: argparse.Namespace) -> tuple[RunLog | str, RunLog | str | None]:
    """One training run, then (with --eval-at L, for the configurations it names) its artifact re-scored at
    EVAL_SEQ_LEN=L with EVAL_ONLY=1."""
    run_id = f"{name}_seed{seed}"
    budget = {"ITERATIONS": str(cli.budgets[name]), "MAX_WALLCLOCK_SECONDS": "0"} if cli.steps else \
        {"MAX_WALLCLOCK_SECONDS": str(cli.seconds)}
    env = {**settings(name, cli), **budget, "SEED": str(seed), "ARTIFACT_PATH": str(cli.work / f"{run_id}.ptz")}
    trained = launch(run_id, env, cli, cli.resume)
    if not cli.eval_at or name not in cli.eval_configs or not isinstance(trained, RunLog):
        return trained, None
    reused = trained.source != run_id  # a reused log's source is its path; retrained, the artifact is new
    return trained, launch(f"{run_id}_eval{cli.eval_at}", {**env, "EVAL_ONLY": "1", "EVAL_SEQ_LEN": str(cli.eval_at)},
                           cli, reused)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(values: list[float]) -> str:
    """Mean +- standard error of per-seed differences."""
    mean, std = mean_std(values)
    return f"{mean:+.4f} +- {std / len(values) ** 0.5:.4f}"


def extra_columns(runs: list[tuple[RunLog | str, RunLog | str | None]]) -> list[str]:
    """headline at --eval-at, and its per-seed difference to the same artifact's headline at the training length."""
    pairs = [(r, e) for r, e in runs if isinstance(r, RunLog) and isinstance(e, RunLog)]
    failed = [e for _, e in runs if isinstance(e, str)]
    if not pairs:
        return [f"failed: {failed[0]}" if failed else "-", "-"]
    at = mean_std([e.score.val_bpb for _, e in pairs])
    return [f"{at[0]:.4f} +- {at[1]:.4f}", paired([e.score.val_bpb - r.score.val_bpb for r, e in pairs])]


def step_time(name: str, ok: list[RunLog], cli: argparse.Namespace) -> list[str]:
    """The equal-time columns: ms per step and where it comes from (the cost model, or these runs' logs)."""
    if cli.steps:
        return [f"{cli.ms_per_step[name]:.2f}", "predicted 8xH100 (bench/cost_model.py)"]
    return [f"{statistics.fmean(r.stopped.train_time_ms / r.stopped.steps for r in ok):.2f}", f"measured, {ok[0].hardware}"]


def table(results: dict[str, list[tuple[RunLog | str, RunLog | str | None]]], cli: argparse.Namespace,
          mflops: dict[str, str]) -> list[str]:
    """One row per configuration; "headline" is the sliding-window score, or the TTT score when TTT ran, and
    eval s is the time of that evaluation. fwd MFLOP/tok is bench/flops.py's count at the training length."""
    extra = [f"headline @{cli.eval_at}", f"@{cli.eval_at} - @train"] if cli.eval_at else []
    timed = ["ms/step", "ms/step from"] if cli.equal_time else []
    head = ["config", "settings", "params", "fwd MFLOP/tok", "bytes_total", "tok/s", "steps", *timed, "val_bpb plain",
            "val_bpb headline", "eval s", "delta", *extra]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = [r.score.val_bpb for r, _ in results.get(cli.reference, []) if isinstance(r, RunLog)]
    for name, runs in results.items():
        configured = " ".join(f"{k}={v}" for k, v in config_env(name, cli.scale).items()) or "-"
        ok = [r for r, _ in runs if isinstance(r, RunLog)]
        if not ok:
            rows.append(f"| {name} | {configured} | failed: {runs[0][0]} |" + " |" * (len(head) - 3))
            continue
        sliding, plain = mean_std([r.score.val_bpb for r in ok]), mean_std([r.roundtrip.val_bpb for r in ok])
        tok_s = statistics.fmean(int(r.hp["train_batch_tokens"]) * r.stopped.steps / r.stopped.train_time_ms * 1000 for r in ok)
        delta = "-"
        if ref and name != cli.reference:
            ref_mean, ref_std = mean_std(ref)
            spread = (sliding[1] ** 2 / len(ok) + ref_std ** 2 / len(ref)) ** 0.5
            delta = f"{sliding[0] - ref_mean:+.4f} +- {spread:.4f}"
        cells = [name, configured, f"{ok[0].model_params:,}", mflops[name], f"{max(r.sizes.total for r in ok):,}",
                 f"{tok_s:,.0f}", f"{statistics.fmean(r.stopped.steps for r in ok):.0f}",
                 *(step_time(name, ok, cli) if cli.equal_time else []),
                 f"{plain[0]:.4f} +- {plain[1]:.4f}", f"{sliding[0]:.4f} +- {sliding[1]:.4f}",
                 f"{statistics.fmean(r.score.eval_time_ms or 0.0 for r in ok) / 1000:.1f}", delta,
                 *(extra_columns(runs) if cli.eval_at else [])]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def mean_curve(runs: list[tuple[RunLog | str, RunLog | str | None]]) -> tuple[list[int], list[float]] | None:
    """(steps, mean val_bpb over seeds) at the validation steps every finished seed logged, or None."""
    ok = [r for r, _ in runs if isinstance(r, RunLog) and r.val]
    if not ok:
        return None
    steps = sorted(set.intersection(*({p.step for p in r.val} for r in ok)))
    return steps, [statistics.fmean(p.val_bpb for r in ok for p in r.val if p.step == s) for s in steps]


def plot_curves(results: dict[str, list[tuple[RunLog | str, RunLog | str | None]]], out: Path, title: str,
                reference: str) -> None:
    """Left: validation bpb against step, the mean over seeds of each configuration (the live model's plain score at
    every VAL_LOSS_EVERY step), with the final headline score of the EMA int6 artifact as a star. Right: the same
    minus the reference's, at each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, diff) = plt.subplots(1, 2, figsize=(15, 6))
    ref = mean_curve(results.get(reference, []))
    for i, (name, runs) in enumerate(results.items()):
        curve, ok = mean_curve(runs), [r for r, _ in runs if isinstance(r, RunLog)]
        if curve is None:
            continue
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot(*curve, color=colour, marker="o", ms=3, lw=1.2, label=f"{name} ({len(ok)} seeds)")
        ax.plot([ok[0].stopped.steps], [statistics.fmean(r.score.val_bpb for r in ok)], color=colour, marker="*", ms=12)
        if ref is not None:
            at = dict(zip(*ref))
            steps = [s for s in curve[0] if s in at]
            diff.plot(steps, [b - at[s] for s, b in zip(*curve) if s in at], color=colour, marker="o", ms=3, label=name)
    ax.set(xlabel="step", ylabel="val_bpb (dots: live model, plain windows; star: final headline)", title=title)
    diff.set(xlabel="step", ylabel=f"val_bpb minus {reference}'s (mean over seeds)", title=f"difference to {reference}")
    for a in (ax, diff):
        a.grid(alpha=0.3)
        a.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the named configurations and exit")
    parser.add_argument("--configs", default="default,conv1d_only,conv1d_2d,dense")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--seconds", type=float, default=180.0, help="training wallclock per run")
    parser.add_argument("--steps", type=int, default=0, help="train every run for exactly this many steps instead")
    parser.add_argument("--equal-time", action="store_true",
                        help="with --steps: the reference's steps, the others their share of its predicted 8xH100 time")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--scale", choices=sorted(SCALES), default="golf")
    parser.add_argument("--reference", default="default")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--data", type=lambda p: str(Path(p).resolve()), help="DATA_PATH for every run")
    parser.add_argument("--tokenizer", type=lambda p: str(Path(p).resolve()), help="TOKENIZER_PATH for every run")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--cuda-rules", action="store_true",
                        help="train through tools/cuda_rules.py: a GPU run's dtypes (bf16 autocast, body) on CPU")
    parser.add_argument("--work", type=lambda p: Path(p).resolve(), default=ROOT / "logs" / "ablate")
    parser.add_argument("--out", type=Path, required=False, help="markdown results file to write")
    parser.add_argument("--resume", action="store_true",
                        help="reuse every finished log in --work whose hyperparameters match the run's exactly")
    parser.add_argument("--eval-at", type=int, default=0, metavar="LEN",
                        help="also score each artifact at EVAL_SEQ_LEN=LEN (EVAL_ONLY=1): two more columns")
    parser.add_argument("--eval-configs", default="", help="configurations --eval-at applies to (default: all)")
    parser.add_argument("--plot", type=Path, help="PNG of the validation curves, one line per configuration")
    cli = parser.parse_args(argv)
    unknown = [c for c in cli.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; --list shows them")
    if any("=" not in e for e in cli.env):
        parser.error("--env takes KEY=VALUE")
    if cli.steps < 0 or cli.jobs < 1:
        parser.error("--steps must be >= 0 and --jobs >= 1")
    if cli.equal_time and cli.reference not in CONFIGS:
        parser.error(f"--equal-time needs a named --reference configuration, not {cli.reference!r}")
    if not cli.list and cli.out is None:
        parser.error("--out is required")
    if VAL_SLICE_TOKENS.get(cli.scale) and not cli.list and not cli.data:
        parser.error(f"the {cli.scale} scale scores a slice of the val shards: --data is required")
    cli.eval_configs = cli.eval_configs.split(",") if cli.eval_configs else cli.configs.split(",")
    if cli.eval_at < 0 or not set(cli.eval_configs) <= set(cli.configs.split(",")):
        parser.error("--eval-at must be >= 0 and --eval-configs a subset of --configs")
    return cli


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    if cli.list:
        for name in CONFIGS:
            print(f"{name:16} {' '.join(f'{k}={v}' for k, v in config_env(name, cli.scale).items()) or '(the defaults)'}")
        return 0
    cli.work.mkdir(parents=True, exist_ok=True)
    val_source = cli.data
    prepare_data(cli)
    names, seeds = cli.configs.split(","), [int(s) for s in cli.seeds.split(",")]
    cli.budgets = step_budgets(names, cli)
    mflops = {name: forward_mflops(name, cli) for name in names}
    results: dict[str, list[tuple[RunLog | str, RunLog | str | None]]] = {name: [] for name in names}
    with concurrent.futures.ThreadPoolExecutor(cli.jobs) as pool:
        futures = {pool.submit(run_one, name, seed, cli): name for name in names for seed in seeds}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]].append(future.result())
            write_results(cli, argv, results, mflops, val_source)
            if cli.plot:
                plot_curves({k: v for k, v in results.items() if v}, cli.plot, f"{cli.scale} scale, {cli.out.stem}", cli.reference)
    print(cli.out.read_text())
    return 0 if any(isinstance(r, RunLog) for runs in results.values() for r, _ in runs) else 1


def write_results(cli: argparse.Namespace, argv: list[str] | None, results: dict, mflops: dict[str, str],
                  val_source: str | None) -> None:
    done = [r for runs in results.values() for r, _ in runs if isinstance(r, RunLog)]
    hardware = done[0].hardware if done else "unknown (no run finished)"
    command = "python bench/ablate.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    budget = f"{cli.steps} training steps" if cli.steps else f"{cli.seconds:g} s of training"
    if cli.equal_time:
        budget = (f"equal predicted 8xH100 time ({cli.reference}: {cli.steps} steps at "
                  f"{cli.ms_per_step[cli.reference]:.2f} ms)" if cli.steps else f"equal time, {budget}")
    lines = [f"# Ablation, {cli.scale} scale, {budget} per run", "",
             f"- date: {datetime.date.today().isoformat()}", f"- hardware: {hardware}; runs at once: {cli.jobs}",
             f"- command: `{command}`", f"- data: {val_source or 'DATA_PATH default'}; tokenizer: {cli.tokenizer or 'default'}",
             *([f"- validation: the first {VAL_SLICE_TOKENS[cli.scale] + 1:,} tokens of the data's val shards "
                f"({VAL_SLICE_TOKENS[cli.scale]:,} targets), written to {cli.data}"] if cli.scale in VAL_SLICE_TOKENS else []),
             f"- base settings ({cli.scale}): {' '.join(f'{k}={v}' for k, v in SCALES[cli.scale].items()) or 'the trainer defaults'}",
             f"- overrides: {' '.join(cli.env) or 'none'}; seeds: {cli.seeds}; reference: {cli.reference}", "",
             *table({k: v for k, v in results.items() if v}, cli, mflops), ""]
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
