"""Download the challenge's FineWeb shards and tokenizer from the Hugging Face Hub.

Runbook
-------
From the repository root (needs ``huggingface_hub``)::

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
    python -m data.cached_challenge_fineweb --train-shards 0     # val shard + tokenizer only

Files land under ``--out`` (default: this ``data/`` folder), where ``train_gpt.py``
looks for them: ``datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin``,
``tokenizers/<files>`` and the manifest as ``manifest_<variant>.json``. The manifest
(``<prefix>/manifest.json``) lists the shard counts and tokenizer files; train shards
are numbered from 000000. Repos: sp1024 -> willdepueoai/parameter-golf, sp4096/sp8192
-> kevclark/parameter-golf. Env overrides: ``MATCHED_FINEWEB_REPO_ID`` (repo),
``MATCHED_FINEWEB_REMOTE_ROOT_PREFIX`` (remote folder, default ``datasets``).

A present file is skipped when intact: a shard has a valid header (magic 20240520,
version 1, N tokens), size 1024 + 2 * N, and N = the manifest's ``shard_size`` (the last
shard of a split: the rest of ``stats.tokens_<split>``); the manifest must parse;
tokenizer files must be non-empty. Damaged files are downloaded again. Downloads go to a
temp folder under ``<out>/downloads/`` and are checked, then moved into place with
``os.replace``, so a final path never holds a partial file; an interrupted run is simply
rerun. Errors: one ``error:`` line on stderr, exit code 1 (argument errors: 2).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Fetch = Callable[[str, str, Path], Path]
DATA_DIR = Path(__file__).resolve().parent
REPOS = {"sp1024": "willdepueoai/parameter-golf", "sp4096": "kevclark/parameter-golf",
         "sp8192": "kevclark/parameter-golf"}
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024


class Failure(Exception):
    """A problem reported as one ``error:`` line (exit code 1)."""


def fetch(repo_id: str, filename: str, local_dir: Path) -> Path:
    """Download ``filename`` of dataset repo ``repo_id`` to ``local_dir/filename``; returns its path."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no retry warnings: a failure is reported as one error line
    return Path(hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=filename, local_dir=local_dir))


def fetch_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: OSError (requests errors, HfHubHTTPError, offline mode)
    plus the huggingface_hub / httpx classes that are not OSErrors."""
    found: list[type[BaseException]] = [OSError]
    for module, names in (("huggingface_hub.errors", ("EntryNotFoundError", "HFValidationError", "XetDownloadError")),
                          ("httpx", ("HTTPError",)), ("httpx2", ("HTTPError",))):
        found += [c for n in names if isinstance(c := getattr(sys.modules.get(module), n, None), type)]
    return tuple(found)


def shard_problem(path: Path, tokens: tuple[int, int] | None) -> str | None:
    """None if ``path`` is an intact shard whose token count lies in ``tokens`` (inclusive), else why not."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
    if len(head) < 12:
        return f"truncated ({size} bytes)"
    magic, version, n = struct.unpack("<3i", head)
    if magic != MAGIC or version != VERSION or n < 0:
        return "bad header"
    if size != HEADER_BYTES + 2 * n:
        return f"size {size} != {HEADER_BYTES} + 2 * {n}"
    if tokens is not None and not tokens[0] <= n <= tokens[1]:
        want = tokens[0] if tokens[0] == tokens[1] else f"{tokens[0]}..{tokens[1]}"
        return f"{n} tokens, manifest says {want}"
    return None


@dataclass(frozen=True)
class Item:
    remote: str  # path below the remote prefix
    local: Path
    kind: str = "file"  # "manifest" | "shard" | "file"
    tokens: tuple[int, int] | None = None  # allowed token count of a shard

    def problem(self, path: Path | None = None) -> str | None:
        """None if the file at ``path`` (default: the final path) is intact, else why not."""
        path = path or self.local
        if not path.is_file():
            return "missing"
        if self.kind == "shard":
            return shard_problem(path, self.tokens)
        if self.kind == "manifest":
            try:
                return None if isinstance(json.loads(path.read_bytes()), dict) else "not a JSON object"
            except ValueError:
                return "not valid JSON"
        return None if path.stat().st_size > 0 else "empty"


def _local(out: Path, rel: str) -> Path:
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise Failure(f"manifest path {rel!r} is not a plain relative path")
    return out / rel


def _token_range(i: int, files: int, total: int, shard_size: int | None) -> tuple[int, int] | None:
    """Allowed token count of shard ``i`` of ``files``: shard_size, the rest of ``total`` for the last one."""
    if not shard_size:
        return None
    rest = total - shard_size * (files - 1)
    return (shard_size,) * 2 if i < files - 1 else (rest,) * 2 if 0 < rest <= shard_size else (1, shard_size)


def plan(manifest: dict, variant: str, train_shards: int, out: Path, source: str = "the manifest") -> list[Item]:
    """Tokenizer files, val shards and the first ``train_shards`` train shards of ``variant``."""
    name = f"fineweb10B_{variant}"
    ds = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if ds is None:
        raise Failure(f"dataset {name} not found in {source}")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == ds.get("tokenizer_name")), None)
    if tok is None:
        raise Failure(f"tokenizer {ds.get('tokenizer_name')!r} of {name} not found in {source}")
    stats, shard_size = ds.get("stats", {}), manifest.get("shard_size")
    if train_shards > int(stats.get("files_train", 0)):
        raise Failure(f"{variant} has {stats.get('files_train', 0)} train shards in {source}, "
                      f"requested {train_shards}")
    items = [Item(p, _local(out, p)) for k in ("model_path", "vocab_path", "path") if (p := tok.get(k))]
    for split, count in (("val", int(stats.get("files_val", 0))), ("train", train_shards)):
        files, total = int(stats.get(f"files_{split}", 0)), int(stats.get(f"tokens_{split}", 0))
        for i in range(count):
            rel = f"{ds.get('path') or 'datasets/' + name}/fineweb_{split}_{i:06d}.bin"
            items.append(Item(rel, _local(out, rel), "shard", _token_range(i, files, total, shard_size)))
    return items


def _short(message: str, limit: int = 160) -> str:
    """First line of ``message``, cut after its last full sentence within ``limit`` characters."""
    line = (message.strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line.rstrip(".")
    cut = line.rfind(". ", 0, limit)
    return line[:cut] if cut > 0 else line[: limit - 3] + "..."


def _fmt(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


def _move_into_place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as exc:  # another filesystem: copy next to dst first, then rename
        if exc.errno != errno.EXDEV:
            raise
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)


def download(item: Item, repo_id: str, prefix: str, do_fetch: Fetch, tmp_root: Path) -> int:
    """Fetch ``item`` into a temp folder under ``tmp_root``, check it, move it into place; returns its size."""
    remote = f"{prefix}/{item.remote}" if prefix else item.remote
    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=tmp_root))
    try:
        try:
            got = Path(do_fetch(repo_id, remote, tmp))
        except fetch_errors() as exc:
            reason = _short(str(exc))
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
            raise Failure(f"cannot download {remote} from {repo_id}: {type(exc).__name__}: {reason}{offline}; "
                          "check the network or set MATCHED_FINEWEB_REPO_ID") from None
        if got.is_symlink() or tmp.resolve() not in got.resolve().parents:
            shutil.copyfile(got, tmp / ".copy")
            got = tmp / ".copy"
        if (why := item.problem(got)) is not None:
            raise Failure(f"downloaded {remote} from {repo_id} is damaged: {why}")
        size = got.stat().st_size
        _move_into_place(got, item.local)
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, do_fetch: Fetch) -> None:
    repo_id = os.environ.get("MATCHED_FINEWEB_REPO_ID") or REPOS[args.variant]
    prefix = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets").strip("/")
    out, tmp_root = Path(args.out), Path(args.out) / "downloads"
    manifest_item = Item("manifest.json", out / f"manifest_{args.variant}.json", "manifest")
    done = {"downloaded": 0, "skipped": 0, "bytes": 0}

    def ensure(label: str, item: Item) -> None:
        label = f"{label} {item.local.name}"
        if (why := item.problem()) is None:
            print(f"{label} skip (present)", flush=True)
            done["skipped"] += 1
            return
        if why != "missing":
            print(f"{label} present but damaged ({why}), downloading again", flush=True)
        size = download(item, repo_id, prefix, do_fetch, tmp_root)
        print(f"{label} {_fmt(size)} ... ok", flush=True)
        done["downloaded"] += 1
        done["bytes"] += size

    try:
        ensure("[manifest]", manifest_item)
        source = f"{prefix + '/' if prefix else ''}manifest.json of {repo_id}"
        items = plan(json.loads(manifest_item.local.read_bytes()), args.variant, args.train_shards, out, source)
        for i, item in enumerate(items, start=1):
            ensure(f"[{i}/{len(items)}]", item)
    finally:
        if tmp_root.is_dir() and not any(tmp_root.iterdir()):
            tmp_root.rmdir()
    print(" ".join(f"{k}:{v}" for k, v in done.items()), flush=True)


def main(argv: list[str] | None = None, fetch: Fetch | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(REPOS), default="sp1024")
    parser.add_argument("--train-shards", type=int, default=80, help="train shards to fetch (0 = val only)")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="data root (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.train_shards < 0:
        parser.error("--train-shards must be >= 0")
    try:  # the module-level fetch is looked up here, so tests can monkeypatch it
        run(args, fetch or globals()["fetch"])
    except (Failure, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (completed files are kept; rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
