"""Plot train_gpt.py logs: training loss and validation bpb, against wallclock and against step.

Runbook
  python tools/plot_logs.py logs/seed1337.txt logs/seed42.txt --out runs.png
  python tools/plot_logs.py records/track_10min_16mb/<name>/train_seed*.log --out record.png --title "ConvGPT-v2"

A 2x2 PNG (matplotlib, Agg backend, no display needed): rows = train loss (nats/token), validation bpb; columns =
training time (s, warm-up and validation excluded, as the log's train_time) and step. One colour per log, labelled
`<RUN_ID> seed <SEED>`. The final sliding-window score, when the run finished, is a star at the run's end on the
val_bpb plots. Unfinished logs (a run in progress) and logs without validation points (VAL_LOSS_EVERY=0) plot fine.
Requires matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.runlog import RunLog, read_log  # noqa: E402


def label(run: RunLog) -> str:
    return f"{run.run_id} seed {run.hp['seed']}" if "seed" in run.hp else run.run_id


def plot_runs(runs: Sequence[RunLog], out: Path, title: str | None = None) -> Path:
    """Write the 2x2 figure for the parsed runs to out (PNG) and return out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for i, run in enumerate(runs):
        colour = colours(i % 10)
        name = label(run)
        train_s = [p.train_time_ms / 1000 for p in run.train]
        steps = [p.step for p in run.train]
        losses = [p.train_loss for p in run.train]
        axes[0][0].plot(train_s, losses, color=colour, label=name, lw=1)
        axes[0][1].plot(steps, losses, color=colour, label=name, lw=1)
        val_s = [p.train_time_ms / 1000 for p in run.val]
        val_steps = [p.step for p in run.val]
        bpbs = [p.val_bpb for p in run.val]
        axes[1][0].plot(val_s, bpbs, color=colour, label=name, marker="o", ms=3, lw=1)
        axes[1][1].plot(val_steps, bpbs, color=colour, label=name, marker="o", ms=3, lw=1)
        if run.sliding is not None and run.stop is not None:
            kw = dict(color=colour, marker="*", ms=12, ls="none")
            axes[1][0].plot([run.stop.train_time_ms / 1000], [run.sliding.val_bpb], **kw)
            axes[1][1].plot([run.stop.steps], [run.sliding.val_bpb], **kw)
    for row, ylabel in enumerate(("train loss (nats/token)", "val_bpb (star: final sliding window)")):
        for col, xlabel in enumerate(("training time (s)", "step")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if any(len(line.get_xdata()) for line in ax.lines):
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no points in these logs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title or ", ".join(label(r) for r in runs))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("logs", nargs="+", metavar="LOG")
    p.add_argument("--out", type=Path, default=Path("runs.png"), help="PNG path (default runs.png)")
    p.add_argument("--title")
    a = p.parse_args(argv)
    try:
        runs = [read_log(path, require_finished=False) for path in a.logs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    plot_runs(runs, a.out, a.title)
    print(f"wrote {a.out} ({len(runs)} log(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
