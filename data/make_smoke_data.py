"""Build a small synthetic dataset (with a known entropy floor) in the challenge format.

Runbook
-------
From the repository root::

    python -m data.make_smoke_data                      # defaults below, ~2M train tokens
    python -m data.make_smoke_data --seed 7 --train-docs 2000 --val-docs 200 \\
        --out /tmp/smoke --tokenizer /tmp/smoke/tok.model

Defaults: ``--out data/datasets/smoke_sp1024``,
``--tokenizer data/tokenizers/smoke_1024_bpe.model`` (both relative to the
repository root), ``--seed 1337``, ``--train-docs 9200`` (~2.0M tokens,
~4.75 MB of text), ``--val-docs 460`` (~0.1M tokens); ~2 s on 2 CPU cores.
Outputs: ``fineweb_train_000000.bin``, ``fineweb_val_000000.bin`` and
``source.json`` in ``--out``, plus the vocab-1024 SentencePiece model (trained
on the train split with the challenge's settings) at ``--tokenizer``.
Re-running with the same arguments is a no-op (one line, exit 0); every file is
written atomically and ``source.json`` last, so an interrupted run is simply
redone. Exit codes: 0 ok, 1 output not writable / build failure, 2 bad argument.

The source
----------
An order-1 Markov chain over ``N_WORDS`` unique random lowercase "words"
(2-9 letters; frequent words tend to be short). Background unigram
``u`` = Zipf-Mandelbrot over the word ranks. Every word ``i`` has
``SUCCESSORS`` successors (drawn without replacement proportionally to ``u``)
with Dirichlet(``DIRICHLET_ALPHA``) weights ``w_i``. Transition:
``P(j | i) = BACKGROUND * u_j + (1 - BACKGROUND) * w_i[j]`` (all entries > 0,
so the chain is ergodic with a unique stationary distribution ``pi``,
computed by power iteration to float64 precision).

A document has ``M ~ Uniform{DOC_WORDS_MIN..DOC_WORDS_MAX}`` words (independent
of the words); the first word ~ ``pi``, then the chain; words joined by single
spaces (no leading/trailing space, no newline). Document entropy::

    H(doc) = H(M) + H(pi) + (E[M] - 1) * h,   h = sum_i pi_i H(P(. | i))
    E[bytes(doc)] = E[M] * E_pi[len(word)] + E[M] - 1
    entropy_bits_per_byte = E[H(doc)] / E[bytes(doc)]

Document boundaries: the shards hold ``[BOS] + tokens`` per document. ``H(M)``
is the information in *where* a document ends; a token model pays it when it
predicts the next BOS (a 0-byte target in the challenge's byte accounting), so
it is included. The tokenisation is lossless (lowercase ASCII + single spaces,
``nmt_nfkc`` leaves it unchanged) and a document's challenge byte count is
exactly its UTF-8 length (``add_dummy_prefix=False`` and no document starts
with a space), so ``entropy_bits_per_byte`` is a lower bound on the expected
val_bpb of any model; ``empirical_val_bits_per_byte`` is what an oracle that
knows the source (and sees the whole current document) scores on the actual
val shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from data.common import (
    atomic_write_bytes,
    encode_documents,
    shard_name,
    train_sentencepiece,
    write_shard,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "datasets" / "smoke_sp1024"
DEFAULT_TOKENIZER = REPO_ROOT / "data" / "tokenizers" / "smoke_1024_bpe.model"
DEFAULT_SEED = 1337
DEFAULT_TRAIN_DOCS = 9_200
DEFAULT_VAL_DOCS = 460
VOCAB_SIZE = 1024

GENERATOR = "data.make_smoke_data/markov-words-v1"
N_WORDS = 4096
WORD_LENGTHS = np.arange(2, 10)  # letters; ~250 of the 676 two-letter strings get used
WORD_LENGTH_PROBS = np.array([0.06, 0.12, 0.16, 0.17, 0.16, 0.14, 0.11, 0.08])
LENGTH_RANK_JITTER = 1.5  # ranks sort by length + U(0, jitter): short words are frequent
ZIPF_EXPONENT, ZIPF_OFFSET = 1.0, 2.7
BACKGROUND = 0.25
SUCCESSORS = 32
DIRICHLET_ALPHA = 0.5
DOC_WORDS_MIN, DOC_WORDS_MAX = 48, 208

SOURCE_STREAM, TRAIN_STREAM, VAL_STREAM = 0, 1, 2
ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _sample_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling along the last axis (cdf rows end at ~1)."""
    if cdf.ndim == 1:
        idx = np.searchsorted(cdf, u, side="right")
    else:
        idx = (cdf <= u[:, None]).sum(axis=1)
    return np.minimum(idx, cdf.shape[-1] - 1)


@dataclass(frozen=True)
class MarkovWordSource:
    """The synthetic language: words, transition structure and its exact statistics."""

    words: list[str]
    word_bytes: np.ndarray  # (V,) UTF-8 length of each word
    unigram: np.ndarray  # (V,) background Zipf distribution u
    successors: np.ndarray  # (V, K) successor ids per word (distinct within a row)
    successor_weights: np.ndarray  # (V, K) Dirichlet weights, rows sum to 1
    background: float
    stationary: np.ndarray  # (V,) pi
    row_entropy: np.ndarray  # (V,) H(P(. | i)) in bits
    doc_words_min: int
    doc_words_max: int

    # ---- analytic quantities -------------------------------------------------
    @property
    def doc_len_entropy_bits(self) -> float:
        return math.log2(self.doc_words_max - self.doc_words_min + 1)

    @property
    def mean_doc_words(self) -> float:
        return (self.doc_words_min + self.doc_words_max) / 2

    @property
    def entropy_rate_bits_per_word(self) -> float:
        return float((self.stationary * self.row_entropy).sum())

    @property
    def stationary_entropy_bits(self) -> float:
        return _entropy_bits(self.stationary)

    @property
    def expected_doc_bytes(self) -> float:
        mean_word = float((self.stationary * self.word_bytes).sum())
        return self.mean_doc_words * mean_word + self.mean_doc_words - 1

    @property
    def expected_doc_entropy_bits(self) -> float:
        return (
            self.doc_len_entropy_bits
            + self.stationary_entropy_bits
            + (self.mean_doc_words - 1) * self.entropy_rate_bits_per_word
        )

    @property
    def entropy_bits_per_byte(self) -> float:
        return self.expected_doc_entropy_bits / self.expected_doc_bytes

    @property
    def unigram_bits_per_byte(self) -> float:
        """bpb of the best context-free model (knows pi and the length law)."""
        bits = self.doc_len_entropy_bits + self.mean_doc_words * self.stationary_entropy_bits
        return bits / self.expected_doc_bytes

    # ---- probabilities and sampling -----------------------------------------
    def log2_transition(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log2 P(nxt | prev), elementwise over 1-D id arrays."""
        out = np.empty(prev.shape[0], dtype=np.float64)
        step = 1 << 16
        for s in range(0, prev.shape[0], step):
            p, n = prev[s : s + step], nxt[s : s + step]
            hit = self.successors[p] == n[:, None]
            sparse = (self.successor_weights[p] * hit).sum(axis=1)
            prob = self.background * self.unigram[n] + (1 - self.background) * sparse
            out[s : s + step] = np.log2(prob)
        return out

    def sample(self, rng: np.random.Generator, n_docs: int) -> tuple[list[str], np.ndarray]:
        """Draw ``n_docs`` documents; returns (texts, exact -log2 P(doc) per doc)."""
        lengths = rng.integers(self.doc_words_min, self.doc_words_max + 1, size=n_docs)
        max_len = int(lengths.max()) if n_docs else 0
        ids = np.zeros((n_docs, max_len), dtype=np.int64)
        if max_len:
            ids[:, 0] = _sample_cdf(np.cumsum(self.stationary), rng.random(n_docs))
        unigram_cdf = np.cumsum(self.unigram)
        succ_cdf = np.cumsum(self.successor_weights, axis=1)
        rows = np.arange(n_docs)
        for t in range(1, max_len):
            prev = ids[:, t - 1]
            use_bg = rng.random(n_docs) < self.background
            u = rng.random(n_docs)
            bg = _sample_cdf(unigram_cdf, u)
            k = _sample_cdf(succ_cdf[prev], u)
            ids[:, t] = np.where(use_bg, bg, self.successors[prev, k])
        # exact log-probabilities of what was drawn
        mask = np.arange(max_len)[None, :] < lengths[:, None]
        trans_mask = mask[:, 1:]
        prev_ids = ids[:, :-1][trans_mask]
        next_ids = ids[:, 1:][trans_mask]
        trans_bits = -self.log2_transition(prev_ids, next_ids)
        doc_of = np.broadcast_to(rows[:, None], trans_mask.shape)[trans_mask]
        bits = np.bincount(doc_of, weights=trans_bits, minlength=n_docs)
        if max_len:
            bits += -np.log2(self.stationary[ids[:, 0]])
        bits += self.doc_len_entropy_bits
        words = np.asarray(self.words, dtype=object)
        texts = [" ".join(words[ids[d, : lengths[d]]].tolist()) for d in range(n_docs)]
        return texts, bits


def _make_words(rng: np.random.Generator) -> list[str]:
    """N_WORDS unique random lowercase words, ordered by rank (frequent first)."""
    lengths = rng.choice(WORD_LENGTHS, size=N_WORDS, p=WORD_LENGTH_PROBS)
    seen: set[str] = set()
    words: list[str] = []
    for length in lengths.tolist():
        while True:
            w = ALPHABET[rng.integers(0, 26, size=length)].tobytes().decode("ascii")
            if w not in seen:
                seen.add(w)
                words.append(w)
                break
    key = lengths + rng.uniform(0.0, LENGTH_RANK_JITTER, size=N_WORDS)
    return [words[i] for i in np.argsort(key, kind="stable")]


def build_source(seed: int) -> MarkovWordSource:
    """Deterministically build the synthetic language for ``seed``."""
    rng = _rng(seed, SOURCE_STREAM)
    words = _make_words(rng)
    v = len(words)
    ranks = np.arange(v, dtype=np.float64)
    unigram = (ranks + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    unigram /= unigram.sum()
    # successors: K distinct ids per row drawn without replacement proportionally to u
    # (exponential race: the K smallest E_j / u_j), in row blocks to bound memory
    successors = np.empty((v, SUCCESSORS), dtype=np.int64)
    inv_u = (1.0 / unigram).astype(np.float32)
    for start in range(0, v, 512):
        race = rng.standard_exponential(size=(min(512, v - start), v), dtype=np.float32) * inv_u
        successors[start : start + 512] = np.argpartition(race, SUCCESSORS, axis=1)[:, :SUCCESSORS]
    successors.sort(axis=1)
    weights = rng.dirichlet(np.full(SUCCESSORS, DIRICHLET_ALPHA), size=v)
    lam = BACKGROUND
    # stationary distribution: pi = lam * u + (1 - lam) * pi @ S  (contraction 1 - lam)
    pi = unigram.copy()
    for _ in range(10_000):
        mass = (pi[:, None] * weights).ravel()
        new = lam * unigram + (1 - lam) * np.bincount(successors.ravel(), mass, minlength=v)
        new /= new.sum()
        delta = float(np.abs(new - pi).sum())
        pi = new
        if delta < 1e-15:
            break
    else:  # pragma: no cover - cannot happen with lam > 0
        raise RuntimeError("stationary distribution did not converge")
    # row entropies: background-only entries everywhere + correction on the K successors
    base = lam * unigram
    base_h = float(-(base * np.log2(base)).sum())
    b = base[successors]
    mixed = b + (1 - lam) * weights
    row_entropy = base_h + (b * np.log2(b)).sum(axis=1) - (mixed * np.log2(mixed)).sum(axis=1)
    return MarkovWordSource(
        words=words,
        word_bytes=np.array([len(w.encode("utf-8")) for w in words], dtype=np.int64),
        unigram=unigram,
        successors=successors,
        successor_weights=weights,
        background=lam,
        stationary=pi,
        row_entropy=row_entropy,
        doc_words_min=DOC_WORDS_MIN,
        doc_words_max=DOC_WORDS_MAX,
    )


def generate_documents(
    seed: int, train_docs: int, val_docs: int
) -> tuple[MarkovWordSource, dict[str, tuple[list[str], np.ndarray]]]:
    """The source and both splits' (texts, bits per doc); train/val use independent streams."""
    source = build_source(seed)
    splits = {
        "train": source.sample(_rng(seed, TRAIN_STREAM), train_docs),
        "val": source.sample(_rng(seed, VAL_STREAM), val_docs),
    }
    return source, splits


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _requested(seed: int, train_docs: int, val_docs: int) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "seed": seed,
        "train_docs": train_docs,
        "val_docs": val_docs,
        "vocab_size": VOCAB_SIZE,
    }


def _up_to_date(out_dir: Path, tokenizer_path: Path, requested: dict[str, Any]) -> dict[str, Any] | None:
    """The existing source.json if it matches ``requested`` and all files are intact."""
    try:
        info = json.loads((out_dir / "source.json").read_text())
        if any(info.get(k) != v for k, v in requested.items()):
            return None
        if (out_dir / info["tokenizer"]).resolve() != tokenizer_path.resolve():
            return None
        files = {shard_name("train"): info["train_sha256"], shard_name("val"): info["val_sha256"]}
        files[info["tokenizer"]] = info["tokenizer_sha256"]
        if all(_sha256(out_dir / name) == digest for name, digest in files.items()):
            return info
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _check_writable(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass


def make_smoke_dataset(
    out_dir: Path | str = DEFAULT_OUT,
    tokenizer_path: Path | str = DEFAULT_TOKENIZER,
    seed: int = DEFAULT_SEED,
    train_docs: int = DEFAULT_TRAIN_DOCS,
    val_docs: int = DEFAULT_VAL_DOCS,
    *,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Build (or confirm) the smoke dataset; returns the ``source.json`` content.

    Raises ``OSError`` if an output location is not writable (checked before
    any work) and ``ValueError`` for non-positive sizes or a negative seed.
    """
    if seed < 0 or train_docs < 1 or val_docs < 1:
        raise ValueError("need seed >= 0, train_docs >= 1, val_docs >= 1")
    emit = log or (lambda _msg: None)
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    requested = _requested(seed, train_docs, val_docs)
    existing = _up_to_date(out_dir, tokenizer_path, requested)
    if existing is not None:
        emit(f"smoke_data up_to_date:{out_dir} seed:{seed} (nothing to do)")
        return existing
    _check_writable(out_dir)
    _check_writable(tokenizer_path.parent)

    t0 = time.perf_counter()
    source, splits = generate_documents(seed, train_docs, val_docs)
    t_gen = time.perf_counter() - t0
    train_sentencepiece(splits["train"][0], tokenizer_path, VOCAB_SIZE)
    t_tok = time.perf_counter() - t0 - t_gen
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))

    stats: dict[str, Any] = {}
    for split, (texts, bits) in splits.items():
        tokens = encode_documents(sp, texts)
        path = out_dir / shard_name(split)
        write_shard(path, tokens)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        stats[split] = {
            "docs": len(texts),
            "tokens": int(tokens.size),
            "bytes": n_bytes,
            "words": sum(t.count(" ") + 1 for t in texts),
            "empirical_bits_per_byte": float(bits.sum() / n_bytes),
            "sha256": _sha256(path),
        }
    elapsed = time.perf_counter() - t0

    info: dict[str, Any] = {
        **requested,
        "tokenizer": os.path.relpath(tokenizer_path.resolve(), out_dir.resolve()),
        "tokenizer_sha256": _sha256(tokenizer_path),
        "entropy_bits_per_byte": source.entropy_bits_per_byte,
        "empirical_val_bits_per_byte": stats["val"]["empirical_bits_per_byte"],
        "empirical_train_bits_per_byte": stats["train"]["empirical_bits_per_byte"],
        "unigram_bits_per_byte": source.unigram_bits_per_byte,
    }
    for split in ("train", "val"):
        for key in ("docs", "tokens", "bytes", "words", "sha256"):
            info[f"{split}_{key}"] = stats[split][key]
    info["source"] = {
        "n_words": N_WORDS,
        "word_lengths": WORD_LENGTHS.tolist(),
        "word_length_probs": WORD_LENGTH_PROBS.tolist(),
        "length_rank_jitter": LENGTH_RANK_JITTER,
        "zipf_exponent": ZIPF_EXPONENT,
        "zipf_offset": ZIPF_OFFSET,
        "background_weight": BACKGROUND,
        "successors_per_word": SUCCESSORS,
        "dirichlet_alpha": DIRICHLET_ALPHA,
        "doc_words_range": [DOC_WORDS_MIN, DOC_WORDS_MAX],
        "doc_words_distribution": "uniform",
        "doc_len_entropy_bits": source.doc_len_entropy_bits,
        "stationary_entropy_bits_per_word": source.stationary_entropy_bits,
        "entropy_rate_bits_per_word": source.entropy_rate_bits_per_word,
        "expected_entropy_bits_per_doc": source.expected_doc_entropy_bits,
        "expected_bytes_per_doc": source.expected_doc_bytes,
    }
    info["notes"] = [
        "entropy_bits_per_byte = E[H(doc)] / E[bytes(doc)] with H(doc) = H(M) + H(pi) + (M-1)*h "
        "(M = words per doc, pi = exact stationary distribution, h = conditional entropy rate); "
        "bytes = UTF-8 length of the document text (words + single spaces; BOS is 0 bytes).",
        "H(M) is the information in the document end; a token model pays it when predicting the "
        "next BOS (a 0-byte target), so it is included.",
        "Tokenization is lossless and with add_dummy_prefix=False (no doc starts with a space) the "
        "challenge byte count of a doc's tokens equals its UTF-8 length, so entropy_bits_per_byte "
        "lower-bounds the expected val_bpb of any model; empirical_val_bits_per_byte is the score "
        "of an oracle that knows the source and sees the whole current document.",
        "unigram_bits_per_byte: best context-free model (knows pi and the length law).",
    ]
    atomic_write_bytes(out_dir / "source.json", (json.dumps(info, indent=2).encode() + b"\n",))

    emit(
        f"smoke_data out:{out_dir} tokenizer:{tokenizer_path} seed:{seed} "
        f"seconds:{elapsed:.1f} generate_s:{t_gen:.1f} tokenizer_s:{t_tok:.1f}"
    )
    for split in ("train", "val"):
        s = stats[split]
        emit(
            f"smoke_data {split}_docs:{s['docs']} {split}_tokens:{s['tokens']} "
            f"{split}_bytes:{s['bytes']} {split}_bytes_per_token:{s['bytes'] / s['tokens']:.3f}"
        )
    emit(
        f"smoke_data entropy_bits_per_byte:{info['entropy_bits_per_byte']:.4f} "
        f"empirical_val_bits_per_byte:{info['empirical_val_bits_per_byte']:.4f} "
        f"unigram_bits_per_byte:{info['unigram_bits_per_byte']:.4f}"
    )
    return info


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.make_smoke_data",
        description="Build a synthetic smoke dataset with a known entropy floor.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="dataset directory")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer .model path")
    parser.add_argument("--seed", type=_non_negative_int, default=DEFAULT_SEED)
    parser.add_argument("--train-docs", type=_positive_int, default=DEFAULT_TRAIN_DOCS)
    parser.add_argument("--val-docs", type=_positive_int, default=DEFAULT_VAL_DOCS)
    args = parser.parse_args(argv)
    try:
        make_smoke_dataset(args.out, args.tokenizer, args.seed, args.train_docs, args.val_docs)
    except OSError as exc:
        print(f"make_smoke_data error: cannot write outputs: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # e.g. too few --train-docs to reach vocab 1024
        print(f"make_smoke_data error: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
