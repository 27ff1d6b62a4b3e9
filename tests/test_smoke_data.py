"""Tests for data/common.py and data/make_smoke_data.py.

Runbook: ``python -m pytest -q tests/test_smoke_data.py`` (CPU only, a few seconds;
builds small datasets under pytest's tmp_path, never touches data/datasets).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.common import (  # noqa: E402
    BOS_ID,
    atomic_write_bytes,
    read_shard,
    shard_name,
    write_shard,
)
from data.make_smoke_data import generate_documents, main, make_smoke_dataset  # noqa: E402

SEED = 11
TRAIN_DOCS = 300  # ~150 KB of text: enough for a full vocab-1024 BPE
VAL_DOCS = 60
VOCAB = 1024


def build(root: Path, seed: int = SEED) -> dict[str, Any]:
    return make_smoke_dataset(
        root / "ds", root / "tok" / "smoke.model", seed=seed,
        train_docs=TRAIN_DOCS, val_docs=VAL_DOCS, log=None,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("smoke")
    return root, build(root)


@pytest.fixture(scope="module")
def sp(dataset: tuple[Path, dict[str, Any]]) -> spm.SentencePieceProcessor:
    root, _ = dataset
    return spm.SentencePieceProcessor(model_file=str(root / "tok" / "smoke.model"))


@pytest.fixture(scope="module")
def val_texts() -> list[str]:
    _, splits = generate_documents(SEED, TRAIN_DOCS, VAL_DOCS)
    return splits["val"][0]


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == BOS_ID)
    assert starts.size and starts[0] == 0
    ends = list(starts[1:]) + [tokens.size]
    return [tokens[s + 1 : e].tolist() for s, e in zip(starts, ends)]


def challenge_byte_count(sp: spm.SentencePieceProcessor, tokens: np.ndarray) -> int:
    """Bytes of targets tokens[1:] with the challenge's LUT accounting."""
    n = sp.vocab_size()
    base = np.zeros(n, dtype=np.int64)
    has_space = np.zeros(n, dtype=bool)
    is_boundary = np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            is_boundary[i] = True
            continue
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("▁"):
            has_space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    x, y = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
    return int((base[y] + (has_space[y] & ~is_boundary[x])).sum())


def test_shard_headers_and_sizes(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, info = dataset
    for split in ("train", "val"):
        path = root / "ds" / shard_name(split)
        header = np.fromfile(path, dtype="<i4", count=256)
        assert header[0] == 20240520 and header[1] == 1
        assert not header[3:].any()
        n = int(header[2])
        assert n == info[f"{split}_tokens"] > 0
        assert path.stat().st_size == 1024 + 2 * n


def test_docs_start_with_bos_and_tokens_in_vocab(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, info = dataset
    for split in ("train", "val"):
        tokens = read_shard(root / "ds" / shard_name(split))
        assert tokens[0] == BOS_ID
        assert int(tokens.max()) < VOCAB
        docs = split_docs(tokens)
        assert len(docs) == info[f"{split}_docs"]
        assert all(doc and BOS_ID not in doc for doc in docs)
        assert not np.isin(tokens, [0, 2, 3]).any()  # no pad/eos/unk


def test_tokenizer_matches_challenge_layout(sp: spm.SentencePieceProcessor) -> None:
    assert sp.vocab_size() == VOCAB
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp.is_byte(4) and sp.is_byte(259) and not sp.is_byte(260)
    unseen = "Zq 9! é"  # characters absent from the corpus go through byte fallback
    assert sp.decode(sp.encode(unseen)) == unseen
    assert sp.unk_id() not in sp.encode(unseen)


def test_val_roundtrip_is_lossless(
    dataset: tuple[Path, dict[str, Any]], sp: spm.SentencePieceProcessor, val_texts: list[str]
) -> None:
    root, info = dataset
    docs = split_docs(read_shard(root / "ds" / shard_name("val")))
    assert sp.decode(docs) == val_texts
    assert sum(len(t.encode("utf-8")) for t in val_texts) == info["val_bytes"]


def test_challenge_byte_count_equals_utf8_bytes(
    dataset: tuple[Path, dict[str, Any]], sp: spm.SentencePieceProcessor, val_texts: list[str]
) -> None:
    root, _ = dataset
    tokens = read_shard(root / "ds" / shard_name("val"))
    assert challenge_byte_count(sp, tokens) == sum(len(t.encode("utf-8")) for t in val_texts)


def test_entropy_analytic_matches_empirical(dataset: tuple[Path, dict[str, Any]]) -> None:
    _, info = dataset
    h = info["entropy_bits_per_byte"]
    assert 1.0 < h < 3.0
    assert h < 0.8 * info["unigram_bits_per_byte"]
    assert info["empirical_val_bits_per_byte"] == pytest.approx(h, rel=0.03)
    assert info["empirical_train_bits_per_byte"] == pytest.approx(h, rel=0.02)
    src = info["source"]
    expected = src["expected_entropy_bits_per_doc"] / src["expected_bytes_per_doc"]
    assert expected == pytest.approx(h, rel=1e-12)


def test_same_seed_identical_different_seed_differs(
    dataset: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, info = dataset
    same = build(tmp_path / "same")
    other = build(tmp_path / "other", seed=SEED + 1)
    for split in ("train", "val"):
        name = shard_name(split)
        ref = (root / "ds" / name).read_bytes()
        assert (tmp_path / "same" / "ds" / name).read_bytes() == ref
        assert (tmp_path / "other" / "ds" / name).read_bytes() != ref
    assert (tmp_path / "same" / "tok" / "smoke.model").read_bytes() == (
        root / "tok" / "smoke.model"
    ).read_bytes()
    assert same == info
    assert other["entropy_bits_per_byte"] != info["entropy_bits_per_byte"]


def test_second_call_is_noop(
    dataset: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, info = dataset
    files = [root / "ds" / shard_name("train"), root / "ds" / "source.json", root / "tok" / "smoke.model"]
    before = [p.stat().st_mtime_ns for p in files]
    again = make_smoke_dataset(
        root / "ds", root / "tok" / "smoke.model", seed=SEED,
        train_docs=TRAIN_DOCS, val_docs=VAL_DOCS,
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "up_to_date" in out[0]
    assert again == info == json.loads((root / "ds" / "source.json").read_text())
    assert [p.stat().st_mtime_ns for p in files] == before


def test_changed_request_or_damaged_file_rebuilds(tmp_path: Path) -> None:
    first = make_smoke_dataset(tmp_path / "ds", tmp_path / "t.model", seed=3, train_docs=250, val_docs=5, log=None)
    second = make_smoke_dataset(tmp_path / "ds", tmp_path / "t.model", seed=3, train_docs=250, val_docs=6, log=None)
    assert second["val_docs"] == 6 and second["train_sha256"] == first["train_sha256"]
    (tmp_path / "ds" / shard_name("val")).write_bytes(b"junk")
    third = make_smoke_dataset(tmp_path / "ds", tmp_path / "t.model", seed=3, train_docs=250, val_docs=6, log=None)
    assert third == second
    assert read_shard(tmp_path / "ds" / shard_name("val")).size == second["val_tokens"]


def test_write_shard_validates_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.bin", np.array([1, 65536]))
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.bin", np.array([1, -1]))
    assert not (tmp_path / "bad.bin").exists()
    write_shard(tmp_path / "ok.bin", np.array([1, 65535, 0]))
    assert read_shard(tmp_path / "ok.bin").tolist() == [1, 65535, 0]
    assert (tmp_path / "ok.bin").stat().st_size == 1024 + 6


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"new partial"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, chunks())
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["--out", str(blocker / "ds"), "--tokenizer", str(tmp_path / "t.model"), "--train-docs", "5"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]
    for bad in (["--train-docs", "0"], ["--seed", "-1"], ["--val-docs", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
