"""data/cached_challenge_fineweb.py against a fake hub in tmp_path (no network)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import cached_challenge_fineweb as dl
from data.common import read_shard, write_shard

PREFIX, DS = "datasets", "datasets/fineweb10B_sp1024"
SHARD_SIZE, LAST_TRAIN, VAL = 3000, 1234, 2000
SCRIPT = Path(dl.__file__).resolve()
REAL_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "manifest_sp1024.json"


def shard_tokens(split: str, i: int) -> int:
    return VAL if split == "val" else LAST_TRAIN if i == 2 else SHARD_SIZE


@pytest.fixture()
def hub(tmp_path: Path) -> Path:
    """Fake repo: manifest, 3 train shards (the last one short), 1 val shard, 2 tokenizer files."""
    root = tmp_path / "hub"
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for i in range(count):
            write_shard(root / PREFIX / DS / f"fineweb_{split}_{i:06d}.bin",
                        rng.integers(0, 1024, shard_tokens(split, i), dtype=np.uint16))
    (root / PREFIX / "tokenizers").mkdir(parents=True)
    (root / PREFIX / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model" * 10)
    (root / PREFIX / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"vocab" * 10)
    manifest = {
        "version": "10B", "shard_size": SHARD_SIZE,
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "path": DS,
                      "stats": {"files_train": 3, "files_val": 1, "tokens_val": VAL,
                                "tokens_train": 2 * SHARD_SIZE + LAST_TRAIN}}],
    }
    (root / PREFIX / "manifest.json").write_text(json.dumps(manifest))
    return root


class FakeFetch:
    """Serves files from the fake hub like hf_hub_download(local_dir=...): local_dir/filename."""

    def __init__(self, hub: Path) -> None:
        self.hub, self.calls = hub, []

    def __call__(self, repo_id: str, filename: str, local_dir: Path) -> Path:
        self.calls.append((repo_id, filename))
        src = self.hub / filename
        if not src.is_file():
            raise FileNotFoundError(f"404 Entry Not Found: {filename}")
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst


def expected_files(out: Path, train: int) -> set[Path]:
    names = [f"{DS}/fineweb_val_000000.bin", "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab",
             "manifest_sp1024.json"] + [f"{DS}/fineweb_train_{i:06d}.bin" for i in range(train)]
    return {out / n for n in names}


def all_files(out: Path) -> set[Path]:
    return {p for p in out.rglob("*") if p.is_file()}


def summary(text: str) -> dict[str, int]:
    line = text.strip().splitlines()[-1]
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def run(out: Path, fetch, *args: str) -> int:
    return dl.main(["--out", str(out), *args], fetch=fetch)


def test_complete_download_then_all_skipped(hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, fetch = tmp_path / "out", FakeFetch(hub)
    assert run(out, fetch, "--train-shards", "2") == 0
    text = capsys.readouterr().out
    assert all_files(out) == expected_files(out, 2)
    for split, i in (("train", 0), ("train", 1), ("val", 0)):
        assert read_shard(out / DS / f"fineweb_{split}_{i:06d}.bin").size == shard_tokens(split, i)
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model" * 10
    assert {f for _, f in fetch.calls} == {f"{PREFIX}/manifest.json", f"{PREFIX}/tokenizers/fineweb_1024_bpe.model",
                                           f"{PREFIX}/tokenizers/fineweb_1024_bpe.vocab", f"{PREFIX}/{DS}/fineweb_val_000000.bin",
                                           f"{PREFIX}/{DS}/fineweb_train_000000.bin", f"{PREFIX}/{DS}/fineweb_train_000001.bin"}
    assert all(repo == "willdepueoai/parameter-golf" for repo, _ in fetch.calls)
    assert "[5/5] fineweb_train_000001.bin 7.0 kB ... ok" in text
    assert summary(text) == {"downloaded": 6, "skipped": 0, "bytes": sum(p.stat().st_size for p in all_files(out))}

    fetch.calls.clear()
    assert run(out, fetch, "--train-shards", "2") == 0
    text = capsys.readouterr().out
    assert fetch.calls == [] and "skip (present)" in text
    assert summary(text) == {"downloaded": 0, "skipped": 6, "bytes": 0}


def test_last_train_shard_may_be_short(hub: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(out, FakeFetch(hub), "--train-shards", "3") == 0
    assert read_shard(out / DS / "fineweb_train_000002.bin").size == LAST_TRAIN


def test_resume_after_truncated_shard(hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, fetch = tmp_path / "out", FakeFetch(hub)
    assert run(out, fetch, "--train-shards", "2") == 0
    damaged = out / DS / "fineweb_train_000001.bin"
    with damaged.open("r+b") as f:
        f.truncate(damaged.stat().st_size // 2)
    capsys.readouterr()
    fetch.calls.clear()
    assert run(out, fetch, "--train-shards", "2") == 0
    text = capsys.readouterr().out
    assert [f for _, f in fetch.calls] == [f"{PREFIX}/{DS}/fineweb_train_000001.bin"]
    assert "fineweb_train_000001.bin present but damaged" in text
    assert read_shard(damaged).size == SHARD_SIZE
    assert summary(text)["downloaded"] == 1 and summary(text)["skipped"] == 5


def test_wrong_token_count_is_damaged(hub: Path, tmp_path: Path) -> None:
    out, fetch = tmp_path / "out", FakeFetch(hub)
    assert run(out, fetch, "--train-shards", "1") == 0
    write_shard(out / DS / "fineweb_train_000000.bin", np.zeros(10, dtype=np.uint16))  # valid, but too short
    fetch.calls.clear()
    assert run(out, fetch, "--train-shards", "1") == 0
    assert [f for _, f in fetch.calls] == [f"{PREFIX}/{DS}/fineweb_train_000000.bin"]


def test_offline_one_error_line(hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    errors = pytest.importorskip("huggingface_hub.errors")

    def offline(repo_id: str, filename: str, local_dir: Path) -> Path:
        (Path(local_dir) / ".cache").mkdir()  # hf_hub_download leaves such bookkeeping behind
        raise errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub and we cannot find the requested files"
            " in the local cache. Please check your connection and try again.")

    out = tmp_path / "out"
    assert run(out, offline) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("error: cannot download datasets/manifest.json from willdepueoai/parameter-golf: "
                                   "LocalEntryNotFoundError: An error happened")
    assert "check the network or set MATCHED_FINEWEB_REPO_ID" in captured.err
    assert all_files(out) == set() and not (out / "downloads").exists()


def test_failure_midway_leaves_no_partial_file(hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, good = tmp_path / "out", FakeFetch(hub)

    def flaky(repo_id: str, filename: str, local_dir: Path) -> Path:
        if not filename.endswith("fineweb_train_000001.bin"):
            return good(repo_id, filename, local_dir)
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((hub / filename).read_bytes()[:5000])
        raise ConnectionError("connection reset by peer")

    assert run(out, flaky, "--train-shards", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin")
    assert "ConnectionError: connection reset by peer" in err and err.count("\n") == 1
    assert not (out / DS / "fineweb_train_000001.bin").exists()
    assert all_files(out) == expected_files(out, 1)  # the completed files stay, intact
    assert read_shard(out / DS / "fineweb_train_000000.bin").size == SHARD_SIZE
    assert run(out, good, "--train-shards", "2") == 0  # a rerun completes it
    assert all_files(out) == expected_files(out, 2)


def test_too_many_train_shards(hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fetch = FakeFetch(hub)
    assert run(tmp_path / "out", fetch, "--train-shards", "4") == 1
    err = capsys.readouterr().err
    assert err == ("error: sp1024 has 3 train shards in datasets/manifest.json of willdepueoai/parameter-golf, "
                   "requested 4\n")
    assert len(fetch.calls) == 1  # the manifest only


def test_missing_file_on_hub(hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (hub / PREFIX / "tokenizers" / "fineweb_1024_bpe.vocab").unlink()
    assert run(tmp_path / "out", FakeFetch(hub), "--train-shards", "0") == 1
    assert "error: cannot download datasets/tokenizers/fineweb_1024_bpe.vocab" in capsys.readouterr().err


def test_env_overrides_reach_fetch(hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (hub / "alt").mkdir()
    shutil.move(hub / PREFIX, hub / "alt" / "root")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "alt/root")
    fetch = FakeFetch(hub)
    monkeypatch.setattr(dl, "fetch", fetch)  # the module-level default is used when main gets none
    assert dl.main(["--out", str(tmp_path / "out"), "--train-shards", "0"]) == 0
    assert fetch.calls[0] == ("someone/mirror", "alt/root/manifest.json")
    assert {repo for repo, _ in fetch.calls} == {"someone/mirror"} and len(fetch.calls) == 4


def test_negative_train_shards_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        dl.main(["--out", str(tmp_path), "--train-shards", "-1"], fetch=FakeFetch(tmp_path))
    assert exc.value.code == 2


@pytest.mark.skipif(not REAL_MANIFEST.is_file(), reason=f"real manifest absent: {REAL_MANIFEST}")
def test_real_manifest_plan(tmp_path: Path) -> None:
    manifest = json.loads(REAL_MANIFEST.read_text())
    items = dl.plan(manifest, "sp1024", 195, tmp_path)
    names = [it.local.relative_to(tmp_path).as_posix() for it in items]
    assert names[:2] == ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
    assert names[2:] == ["datasets/fineweb10B_sp1024/fineweb_val_000000.bin"] + [
        f"datasets/fineweb10B_sp1024/fineweb_train_{i:06d}.bin" for i in range(195)]
    shards = {it.local.name: it.tokens for it in items if it.kind == "shard"}
    assert shards["fineweb_train_000000.bin"] == (100_000_000,) * 2
    assert shards["fineweb_train_000194.bin"] == (73_201_340,) * 2  # tokens_train - 194 full shards
    assert shards["fineweb_val_000000.bin"] == (62_021_846,) * 2
    with pytest.raises(dl.Failure, match="has 195 train shards"):
        dl.plan(manifest, "sp1024", 196, tmp_path)


def test_real_fetch_in_offline_mode(tmp_path: Path) -> None:
    """The default fetch (hf_hub_download) with HF_HUB_OFFLINE=1: no network, one error line, nothing left."""
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MATCHED_FINEWEB_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--train-shards", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot download datasets/manifest.json from willdepueoai/parameter-golf: ")
    assert "(HF_HUB_OFFLINE is set)" in proc.stderr
    assert not out.exists() or all_files(out) == set() and not (out / "downloads").exists()
