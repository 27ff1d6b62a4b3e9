"""Parse one train_gpt.py log (stdout or logs/<RUN_ID>.txt) into a typed RunLog.

Runbook
  python tools/runlog.py logs/convgpt.txt        # prints the parsed summary as JSON; exit 1 if the log is unusable

  from tools.runlog import read_log
  run = read_log("logs/convgpt.txt")             # ValueError if the run did not finish
  run.seed, run.hardware, run.score.val_bpb, run.sizes.total, run.stop.train_time_ms

The log is a sequence of `key:value` lines written by rank 0 (see README.md, "Output"):
  hp <field>:<value>                     one per setting (values kept as the strings the trainer printed)
  warning: ...
  code bytes_code:C sha256:H files:F[,F...]   the counted code (plain files, or the packed train_gpt.py)
  world_size:W grad_accum:G device:D device_name:N torch:V
  val_tokens:T
  model_params:P block_matrix_params:B compile:C triton:K
  warmup_steps:N warmup_time:Xms         compile warm-up, not train time
  step:S/I train_loss:L train_time:Xms step_avg:Yms tok_s:Z
  step:S/I val_loss:L val_bpb:B train_time:Xms
  stopping_early:E step:S train_time:Xms step_avg:Yms [peak_mem_mib:M on CUDA]
  final_ema_prequant val_loss:L val_bpb:B eval_time:Xms
  artifact bytes_model:M bytes_code:C bytes_total:T limit:16000000
  final_int6_zstd_roundtrip val_loss:L val_bpb:B eval_time:Xms
  final_int6_zstd_roundtrip_exact val_loss:L val_bpb:B
  final_sliding_window stride:K val_loss:L val_bpb:B eval_time:Xms
  final_sliding_window_exact stride:K val_loss:L val_bpb:B          <- the headline score
  ttt_adapted steps:A/S [stop_elapsed:Es stop_need:Ns budget:Bs]   (TTT_EPOCHS > 0: A of S steps adapted, why not all)
  final_ttt mode:lora doc_chunk:C rank:R epochs:E val_loss:L val_bpb:B eval_time:Xms   (TTT_EPOCHS > 0)
  final_ttt_exact <the same tags> val_loss:L val_bpb:B                <- the headline score when present
  final_eval_time:Xms max_eval_seconds:S  the whole final evaluation, which the 600 s evaluation limit bounds
Other lines (launcher noise) are ignored. The trainer appends to logs/<RUN_ID>.txt, so a file that holds more than
one run (two `world_size:` lines) is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

HEADLINE = "final_sliding_window_exact"


@dataclass(frozen=True)
class TrainPoint:
    step: int
    train_loss: float
    train_time_ms: float


@dataclass(frozen=True)
class ValPoint:
    step: int
    val_loss: float
    val_bpb: float
    train_time_ms: float


@dataclass(frozen=True)
class Stop:
    """The `stopping_early` line: the training time that must stay <= 600 s on the 10-minute track."""
    early: bool
    steps: int
    train_time_ms: float
    step_avg_ms: float
    peak_mem_mib: int | None = None  # CUDA only


@dataclass(frozen=True)
class ArtifactBytes:
    model: int
    code: int
    total: int
    limit: int


@dataclass(frozen=True)
class Score:
    """A final evaluation: the 8-decimal values of the `_exact` line, the eval time of its rounded twin."""
    val_loss: float  # nats per token
    val_bpb: float
    eval_time_ms: float | None
    stride: int | None = None  # sliding window only


@dataclass
class RunLog:
    source: str
    hp: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    world_size: int | None = None
    grad_accum: int | None = None
    device: str | None = None
    device_name: str | None = None
    torch_version: str | None = None
    val_tokens: int | None = None
    model_params: int | None = None
    warmup_ms: float | None = None
    code_sha256: str | None = None  # the `code` line: sha256 of the counted code (train_gpt.code_sha256)
    code_files: tuple[str, ...] = ()
    train: list[TrainPoint] = field(default_factory=list)
    val: list[ValPoint] = field(default_factory=list)
    stop: Stop | None = None
    artifact: ArtifactBytes | None = None
    prequant: Score | None = None
    roundtrip: Score | None = None  # final_int6_zstd_roundtrip(_exact)
    sliding: Score | None = None  # final_sliding_window(_exact): the headline score without TTT
    ttt: Score | None = None  # final_ttt(_exact): score-first test-time training, the headline when present
    eval_total_ms: float | None = None  # final_eval_time: round trip + sliding window + TTT, from the artifact's weights

    # -- accessors that refuse an unfinished run with a message naming the log
    def _missing(self, line: str) -> ValueError:
        return ValueError(f"log {self.source} has no {line} line: the run did not finish")

    @property
    def score(self) -> Score:
        """The headline score: final_ttt_exact when the run used TTT, else final_sliding_window_exact."""
        if self.sliding is None:
            raise self._missing(HEADLINE)
        return self.ttt or self.sliding

    @property
    def sizes(self) -> ArtifactBytes:
        if self.artifact is None:
            raise self._missing("artifact")
        return self.artifact

    @property
    def stopped(self) -> Stop:
        if self.stop is None:
            raise ValueError(f"log {self.source} has no stopping_early line: it is not a training run (EVAL_ONLY?) "
                             f"or training did not finish")
        return self.stop

    @property
    def seed(self) -> int:
        if "seed" not in self.hp:
            raise ValueError(f"log {self.source} has no `hp seed:` line")
        return int(self.hp["seed"])

    @property
    def run_id(self) -> str:
        return self.hp.get("run_id", Path(self.source).stem)

    @property
    def hardware(self) -> str:
        """E.g. "8xNVIDIA_H100_80GB_HBM3": world size x device name (spaces were replaced by _ in the log)."""
        if self.world_size is None or self.device_name is None:
            raise ValueError(f"log {self.source} has no world_size/device_name line")
        return f"{self.world_size}x{self.device_name}"


def _tokens(line: str) -> tuple[list[str], dict[str, str]]:
    """Words without ':' (tags such as `final_sliding_window`) and key:value pairs (split at the first ':')."""
    tags, values = [], {}
    for word in line.split():
        key, sep, value = word.partition(":")
        if sep:
            values[key] = value
        else:
            tags.append(word)
    return tags, values


def _ms(text: str) -> float:
    return float(text[:-2] if text.endswith("ms") else text)


def _score(values: dict[str, str], rounded: dict[str, str] | None) -> Score:
    eval_ms = _ms(rounded["eval_time"]) if rounded and "eval_time" in rounded else None
    stride = int(values["stride"]) if "stride" in values else None
    return Score(float(values["val_loss"]), float(values["val_bpb"]), eval_ms, stride)


def parse_log(text: str, source: str = "<text>", *, require_finished: bool = True) -> RunLog:
    """Parse a log's text. With require_finished (the default) a log without the final lines raises ValueError
    ("log X has no final_sliding_window_exact line: the run did not finish"); plotting passes False."""
    run = RunLog(source=source)
    finals: dict[str, dict[str, str]] = {}
    env_lines = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        try:
            if line.startswith("hp "):
                key, _, value = line[3:].partition(":")
                run.hp[key.strip()] = value
                continue
            if line.startswith("warning:"):
                run.warnings.append(line)
                continue
            tags, kv = _tokens(line)
            first = line.split(" ", 1)[0]
            if first.startswith("world_size:"):
                env_lines += 1
                run.world_size, run.grad_accum = int(kv["world_size"]), int(kv.get("grad_accum", "0"))
                run.device, run.device_name, run.torch_version = kv.get("device"), kv.get("device_name"), kv.get("torch")
            elif first.startswith("val_tokens:"):
                run.val_tokens = int(kv["val_tokens"])
            elif first.startswith("model_params:"):
                run.model_params = int(kv["model_params"])
            elif tags and tags[0] == "code":
                run.code_sha256, run.code_files = kv["sha256"], tuple(kv["files"].split(","))
            elif first.startswith("warmup_steps:"):
                run.warmup_ms = _ms(kv["warmup_time"])
            elif first.startswith("step:") and "train_loss" in kv:
                run.train.append(TrainPoint(int(kv["step"].split("/")[0]), float(kv["train_loss"]), _ms(kv["train_time"])))
            elif first.startswith("step:") and "val_bpb" in kv:
                run.val.append(ValPoint(int(kv["step"].split("/")[0]), float(kv["val_loss"]), float(kv["val_bpb"]),
                                        _ms(kv["train_time"])))
            elif first.startswith("stopping_early:"):
                peak = int(kv["peak_mem_mib"]) if "peak_mem_mib" in kv else None
                run.stop = Stop(kv["stopping_early"] == "True", int(kv["step"]), _ms(kv["train_time"]), _ms(kv["step_avg"]), peak)
            elif tags and tags[0] == "artifact":
                run.artifact = ArtifactBytes(int(kv["bytes_model"]), int(kv["bytes_code"]), int(kv["bytes_total"]),
                                             int(kv["limit"]))
            elif first.startswith("final_eval_time:"):
                run.eval_total_ms = _ms(kv["final_eval_time"])
            elif tags and tags[0].startswith("final_"):
                finals[tags[0]] = kv
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"log {source} line {lineno} is malformed ({type(e).__name__}: {e}): {line!r}") from None
    if env_lines > 1:
        raise ValueError(f"log {source} holds {env_lines} runs (the trainer appends to logs/<RUN_ID>.txt): "
                         f"keep one run per log file")
    if "final_ema_prequant" in finals:
        run.prequant = _score(finals["final_ema_prequant"], finals["final_ema_prequant"])
    if "final_int6_zstd_roundtrip_exact" in finals:
        run.roundtrip = _score(finals["final_int6_zstd_roundtrip_exact"], finals.get("final_int6_zstd_roundtrip"))
    if HEADLINE in finals:
        run.sliding = _score(finals[HEADLINE], finals.get("final_sliding_window"))
    if "final_ttt_exact" in finals:
        run.ttt = _score(finals["final_ttt_exact"], finals.get("final_ttt"))
    if require_finished:
        if env_lines == 0:
            raise ValueError(f"log {source} has no world_size line: it is not a train_gpt.py log")
        for line, present in ((HEADLINE, run.sliding), ("final_int6_zstd_roundtrip_exact", run.roundtrip),
                              ("artifact", run.artifact)):
            if present is None:
                raise run._missing(line)
    return run


def read_log(path: str | Path, *, require_finished: bool = True) -> RunLog:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ValueError(f"log {path} cannot be read: {e.strerror}") from None
    return parse_log(text, str(path), require_finished=require_finished)


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python tools/runlog.py LOG [LOG ...]", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        try:
            run = read_log(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        summary = asdict(run)
        summary.pop("train"), summary.pop("val")
        summary.update(train_points=len(run.train), val_points=len(run.val))
        print(json.dumps(summary, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
