"""Tests for data/prepare_text.py (own text -> challenge shards).

Runbook: ``python -m pytest -q tests/test_prepare_text.py`` (CPU only, a few seconds). The tiny-corpus
tests always run; the real-text tests use the first docs of
../shared/data/text/fineweb_sample10BT_legalpilot_annotated.jsonl and the challenge tokenizer
../shared/data/tokenizers/fineweb_1024_bpe.model and skip when those are absent.

What "decodes back to the text" means: nmt_nfkc normalises the text (NFKC, newlines -> spaces, runs of
whitespace collapsed, ends stripped), so a decoded document is compared with ``sp.normalize(text)`` (with
U+2581 turned back into spaces), and its ids with ``[BOS] + sp.encode(text)``. The tiny corpus is plain ASCII
with single spaces, so there decoding must give the source text exactly (newlines read as spaces).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.common import BOS_ID, FIRST_BYTE_ID, LAST_BYTE_ID, read_shard  # noqa: E402
from data.prepare_text import main, split_order  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SAMPLE_JSONL = SHARED / "text" / "fineweb_sample10BT_legalpilot_annotated.jsonl"
SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
N_REAL, REAL_VAL = 300, 50
TINY_VOCAB = 400
needs_sample = pytest.mark.skipif(not SAMPLE_JSONL.is_file(), reason=f"real text absent: {SAMPLE_JSONL}")
needs_sp1024 = pytest.mark.skipif(not (SAMPLE_JSONL.is_file() and SP1024.is_file()),
                                  reason=f"real text or challenge tokenizer absent: {SAMPLE_JSONL}, {SP1024}")


# ----------------------------------------------------------------------------- helpers
def tiny_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Random-word documents over letters a-p only (q-z are kept for planted words), some multi-line."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(150)]
    return ["\n".join(" ".join(rng.choices(words, k=rng.randint(10, 30))) for _ in range(rng.randint(1, 4)))
            for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def summary(stdout: str) -> dict[str, str]:
    return dict(kv.split(":", 1) for line in stdout.splitlines() for kv in line.split()[1:])


def split_tokens(out: Path, split: str) -> np.ndarray:
    """A split's shards read (and validated) in order and concatenated: the trainer's token stream."""
    paths = sorted(out.glob(f"fineweb_{split}_*.bin"))
    assert paths and paths[0].name == f"fineweb_{split}_000000.bin"
    return np.concatenate([read_shard(p) for p in paths])


def docs_of(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == BOS_ID)
    assert starts.size and starts[0] == 0, "the stream must start with BOS"
    return [tokens[s + 1:e].tolist() for s, e in zip(starts, [*starts[1:], tokens.size])]


def decoded(sp: spm.SentencePieceProcessor, out: Path, split: str) -> list[str]:
    tokens = split_tokens(out, split)
    assert int(tokens.max()) < sp.vocab_size()
    return [sp.decode(ids) for ids in docs_of(tokens)]


def normalized(sp: spm.SentencePieceProcessor, text: str) -> str:
    return sp.normalize(text).replace("\u2581", " ")


def vocab_pieces(sp: spm.SentencePieceProcessor) -> list[str]:
    return [sp.id_to_piece(i) for i in range(sp.vocab_size()) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]


# ----------------------------------------------------------------------------- tiny corpus (never skips)
def test_tiny_corpus_dirs_dedupe_shards_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tiny_docs()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_jsonl(src / "a.jsonl", docs[:30] + ["   ", docs[3]])  # one empty doc, one duplicate
    for i, t in enumerate(docs[30:]):
        (src / "sub" / f"{i:02d}.txt").write_text(t + "\n", encoding="utf-8")
    (src / "sub" / "dup.txt").write_text(f"  {docs[3]}\n\n", encoding="utf-8")  # duplicate after strip()
    (src / "notes.md").write_text("ignored: not .jsonl/.txt")
    rc, out, err = run(capsys, "--input", src, "--train-tokenizer", "--vocab-size", TINY_VOCAB, "--val-docs", 8,
                       "--shard-tokens", 300, "--seed", 5, "--out", tmp_path / "ds")
    assert rc == 0, err
    s, info = summary(out), json.loads((tmp_path / "ds" / "prepare_text.json").read_text())
    assert (s["input_files"], s["input_docs"], s["empty_dropped"], s["duplicates_dropped"]) == ("12", "43", "1", "2")
    assert (info["duplicates_dropped"], info["val"]["docs"], info["train"]["docs"]) == (2, 8, 32)
    assert len(info["train"]["shards"]) > 3 and all(sh["tokens"] == 300 for sh in info["train"]["shards"][:-1])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ds" / f"tokenizer_{TINY_VOCAB}_bpe.model"))
    assert sp.vocab_size() == TINY_VOCAB == info["vocab_size"]
    val, train = decoded(sp, tmp_path / "ds", "val"), decoded(sp, tmp_path / "ds", "train")
    # lossless for this corpus: exactly the source text, newlines read as spaces; every doc exactly once
    want = [t.replace("\n", " ") for t in docs]
    assert sorted(val + train) == sorted(want) and not set(val) & set(train)
    assert val == [want[i] for i in split_order(len(docs), 5)[:8]]  # the documented split rule
    assert sum(tok.size for tok in map(read_shard, sorted((tmp_path / "ds").glob("*.bin")))) == \
        info["val"]["tokens"] + info["train"]["tokens"]


def test_deterministic_and_seed_changes_val(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", tiny_docs())
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run(capsys, "--input", corpus, "--train-tokenizer", "--vocab-size", TINY_VOCAB, "--val-docs", 6,
                   "--seed", seed, "--shard-tokens", 400, "--out", tmp_path / name)[0] == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix in (".bin", ".model"))
    assert len(files) > 3 and files == sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix != ".json")
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    val_a, val_c = (read_shard(tmp_path / d / "fineweb_val_000000.bin").tobytes() for d in "ac")
    assert val_a != val_c


def test_tokenizer_never_sees_val_docs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A doc made of letters q-z (absent elsewhere) is planted where split_order puts it; BPE learns
    characters/merges only from what it sees, so any q-z piece in the vocab means it saw that doc."""
    docs, seed, val_docs = tiny_docs(), 9, 6
    planted = " ".join(["qzxwvy rstuqz"] * 80)
    order = split_order(len(docs) + 1, seed)

    def build(position: int, name: str, *extra: Any) -> tuple[spm.SentencePieceProcessor, dict[str, Any]]:
        texts = docs[:position] + [planted] + docs[position:]
        rc, _, err = run(capsys, "--input", write_jsonl(tmp_path / f"{name}.jsonl", texts), "--train-tokenizer",
                         "--vocab-size", TINY_VOCAB, "--val-docs", val_docs, "--seed", seed, "--out",
                         tmp_path / name, *extra)
        assert rc == 0, err
        info = json.loads((tmp_path / name / "prepare_text.json").read_text())
        return spm.SentencePieceProcessor(model_file=info["tokenizer"]["path"]), info

    def knows_planted(sp: spm.SentencePieceProcessor) -> bool:
        return any(set(p) & set("qrstuvwxyz") for p in vocab_pieces(sp))

    sp, info = build(int(order[0]), "in_val")  # first val doc
    assert not knows_planted(sp) and info["tokenizer"]["train_docs"] == len(docs) - val_docs + 1
    assert planted.replace(" ", "") not in "".join(decoded(sp, tmp_path / "in_val", "train"))
    assert all(sp.is_byte(i) for i in sp.encode("qzxwvy"))  # unseen characters fall back to bytes
    sp, _ = build(int(order[-1]), "in_train")  # control: last train doc -> learned
    assert knows_planted(sp) and any(len(set(p) & set("qrstuvwxyz")) > 1 for p in vocab_pieces(sp))
    sp, info = build(int(order[-1]), "capped", "--tokenizer-train-docs", len(docs) - val_docs)  # cap excludes it
    assert not knows_planted(sp) and info["tokenizer"]["train_docs"] == len(docs) - val_docs


@pytest.mark.parametrize("case", ["missing", "bad_json", "no_field", "empty", "not_empty_out"])
def test_errors_one_line_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", tiny_docs(10))
    bad = tmp_path / "bad.jsonl"
    out = tmp_path / "ds"
    want = {"missing": f"{tmp_path / 'nope.jsonl'}: no such file", "bad_json": f"{bad}:3: not valid JSON / UTF-8",
            "no_field": f"{bad}:2: no string field 'text'", "empty": "empty corpus", "not_empty_out": "--force"}[case]
    inputs = [good, tmp_path / "nope.jsonl"] if case == "missing" else [bad]
    lines = {"bad_json": ['{"text": "a b"}', "", '{"text": "c d"'], "no_field": ['{"text": "a"}', '{"body": "b"}'],
             "empty": ['{"text": "  "}', "", '{"text": "\\n"}']}.get(case, [])
    bad.write_text("\n".join(lines) + "\n")
    if case == "not_empty_out":
        inputs = [good]
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    rc, stdout, err = run(capsys, "--input", *inputs, "--train-tokenizer", "--vocab-size", 300, "--val-docs", 2,
                          "--out", out)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and want in err, err
    assert stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] if case == "not_empty_out" else not out.exists()


def test_force_overwrites_and_removes_stale_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, out = write_jsonl(tmp_path / "c.jsonl", tiny_docs()), tmp_path / "ds"
    out.mkdir()
    (out / "fineweb_train_000099.bin").write_bytes(b"stale")
    args = ["--input", corpus, "--train-tokenizer", "--vocab-size", TINY_VOCAB, "--val-docs", 4, "--out", out]
    assert run(capsys, *args)[0] == 1
    assert run(capsys, *args, "--force")[0] == 0
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_script_mode_from_repo_root(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", tiny_docs(20))
    proc = subprocess.run([sys.executable, "data/prepare_text.py", "--input", str(corpus), "--train-tokenizer",
                           "--vocab-size", "300", "--val-docs", "3", "--out", str(tmp_path / "ds")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert summary(proc.stdout)["val_docs"] == "3"


# ----------------------------------------------------------------------------- real text
@pytest.fixture(scope="module")
def real_docs() -> list[str]:
    if not SAMPLE_JSONL.is_file():
        pytest.skip(f"real text absent: {SAMPLE_JSONL}")
    with open(SAMPLE_JSONL, encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(N_REAL)]


@pytest.fixture(scope="module")
def real_build(real_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("real")
    dup = real_docs[5]  # planted 3 more times (one with extra whitespace): must be counted and kept once
    texts = real_docs[:100] + [dup] + real_docs[100:] + [dup, f"\n  {dup}  \n"]
    assert main(["--input", str(write_jsonl(root / "in.jsonl", texts)), "--train-tokenizer", "--vocab-size", "1024",
                 "--val-docs", str(REAL_VAL), "--out", str(root / "ds")]) == 0
    return root / "ds", json.loads((root / "ds" / "prepare_text.json").read_text())


@needs_sample
def test_real_tokenizer_and_shards_valid(real_build: tuple[Path, dict[str, Any]]) -> None:
    out, info = real_build
    sp = spm.SentencePieceProcessor(model_file=info["tokenizer"]["path"])
    assert sp.vocab_size() == 1024 and sp.bos_id() == BOS_ID
    assert all(sp.is_byte(i) for i in range(FIRST_BYTE_ID, LAST_BYTE_ID + 1)) and not sp.is_byte(LAST_BYTE_ID + 1)
    assert info["tokenizer"]["train_docs"] == N_REAL - REAL_VAL and info["duplicates_dropped"] == 3
    for split, n_docs in (("val", REAL_VAL), ("train", N_REAL - REAL_VAL)):
        tokens = split_tokens(out, split)  # read_shard checks header and file size
        assert tokens[0] == BOS_ID and int(tokens.max()) < 1024 and int((tokens == BOS_ID).sum()) == n_docs
        assert tokens.size == info[split]["tokens"] and info[split]["docs"] == n_docs


@needs_sample
def test_real_roundtrip_disjoint_and_dedupe(real_docs: list[str], real_build: tuple[Path, dict[str, Any]]) -> None:
    out, info = real_build
    sp = spm.SentencePieceProcessor(model_file=info["tokenizer"]["path"])
    order = split_order(N_REAL, info["seed"])
    want_val = [real_docs[i] for i in order[:REAL_VAL]]
    val_ids = docs_of(split_tokens(out, "val"))
    assert val_ids == sp.encode(want_val)  # [BOS] + sp.encode(text) per doc, in split order
    val, train = decoded(sp, out, "val"), decoded(sp, out, "train")
    assert val == [normalized(sp, t) for t in want_val]
    assert not set(val) & set(train) and len(set(val + train)) == N_REAL
    assert sorted(val + train) == sorted(normalized(sp, t) for t in real_docs)
    assert (val + train).count(normalized(sp, real_docs[5])) == 1  # the planted duplicates: one split, once


@needs_sp1024
def test_existing_tokenizer_val_tokens(real_docs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = real_docs[:100]
    rc, out, err = run(capsys, "--input", write_jsonl(tmp_path / "in.jsonl", docs), "--tokenizer", SP1024,
                       "--val-docs", 20, "--seed", 3, "--out", tmp_path / "ds")
    assert rc == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    want = [tok for i in split_order(100, 3)[:20] for tok in [BOS_ID, *sp.encode(docs[i])]]
    assert read_shard(tmp_path / "ds" / "fineweb_val_000000.bin").tolist() == want
    info = json.loads((tmp_path / "ds" / "prepare_text.json").read_text())
    assert info["tokenizer"]["trained"] is False and info["vocab_size"] == 1024
    assert summary(out)["val_tokens"] == str(len(want))
