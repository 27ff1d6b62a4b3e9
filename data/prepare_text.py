"""Turn your own text (.jsonl / .txt) into challenge-format shards.

Runbook
-------
From the repository root (``python data/prepare_text.py ...`` works too)::

    # train a tokenizer on the train split, then write the shards
    python -m data.prepare_text --input my.jsonl --train-tokenizer --vocab-size 1024 \\
        --tokenizer-out data/tokenizers/my_1024_bpe.model --val-docs 1000 --out data/datasets/my_sp1024
    # or reuse an existing tokenizer (e.g. the challenge's)
    python -m data.prepare_text --input corpus_dir/ notes.txt \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --val-docs 1000 --out data/datasets/my_fw1024
    # then train on it
    DATA_PATH=data/datasets/my_sp1024 TOKENIZER_PATH=data/tokenizers/my_1024_bpe.model VOCAB_SIZE=1024 \\
        python train_gpt.py

Inputs: ``.jsonl`` (a document per line in ``--text-field``; blank lines
skipped), ``.txt`` (a document per file), directories (all .jsonl/.txt below,
sorted). Empty documents are dropped; exact duplicates (equal after
``strip()``) keep their first occurrence and are counted, so no text can be in
both splits. Unique documents are shuffled by
``numpy.random.default_rng(seed).permutation``: the first ``--val-docs`` are
val, the rest train (in shuffled order).

``--train-tokenizer`` sees the train split only (its first
``--tokenizer-train-docs`` docs if given), as lines (``str.splitlines``,
stripped, empty ones dropped) cut into pieces of <= 1024 characters (<= 4096
bytes: SentencePiece skips sentences over 4192). Default ``--tokenizer-out``:
``OUT/tokenizer_<vocab>_bpe.model``.

Shards: a document is ``[BOS] + ids``; each split is one token stream cut every
``--shard-tokens`` tokens, so documents may straddle shards (the trainer reads
them as one stream; a 1-token tail joins the previous shard). nmt_nfkc turns
newlines into spaces and collapses whitespace. ``OUT/prepare_text.json``
(written last) records inputs, seed, tokenizer path/sha256/vocab,
docs/tokens/bytes per split, dropped docs and shards with sha256. A non-empty
``--out`` or existing ``--tokenizer-out`` is refused without ``--force`` (which
also deletes stale ``fineweb_*.bin``). Exit codes: 0 ok; 1 one ``error: ...``
line on stderr (bad input writes nothing); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

if __package__ in (None, ""):  # run as a script: python data/prepare_text.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.common import BOS_ID, atomic_write_bytes, encode_documents, shard_name, train_sentencepiece, write_shard  # noqa: E402

SUFFIXES = (".jsonl", ".txt")
MAX_PIECE_CHARS = 1024  # tokenizer-training sentences: <= 4 * 1024 bytes < SentencePiece's 4192
ENCODE_BATCH_DOCS = 512


class PrepareError(Exception):
    """A user-facing problem (bad input, refused overwrite); main() prints it as ``error: ...``."""


def input_files(paths: Iterable[Path | str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise PrepareError(f"{p}: directory holds no .jsonl or .txt files")
            files += found
        elif not p.exists():
            raise PrepareError(f"{p}: no such file or directory")
        elif p.suffix not in SUFFIXES:
            raise PrepareError(f"{p}: unsupported input (want .jsonl, .txt or a directory)")
        else:
            files.append(p)
    return files


def read_documents(files: Sequence[Path], text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for f in files:
        try:
            if f.suffix == ".txt":
                docs.append(f.read_bytes().decode("utf-8-sig"))
                continue
            with open(f, "rb") as fh:  # binary: lines end at b"\n" only
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        text = obj.get(text_field) if isinstance(obj, dict) else None
                        if isinstance(text, str):
                            text.encode("utf-8")  # rejects JSON's lone surrogates ("\ud800")
                    except ValueError as exc:  # incl. UnicodeDecodeError / UnicodeEncodeError
                        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else exc
                        raise PrepareError(f"{f}:{lineno}: not valid JSON / UTF-8 ({msg})") from None
                    if not isinstance(text, str):
                        raise PrepareError(f"{f}:{lineno}: no string field {text_field!r}")
                    docs.append(text)
        except UnicodeDecodeError as exc:
            raise PrepareError(f"{f}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise PrepareError(f"{f}: cannot read ({exc.strerror})") from None
    return docs


def dedupe(docs: Sequence[str]) -> tuple[list[str], int, int]:
    """(unique non-empty docs in input order, empty dropped, duplicates dropped); key = text.strip()."""
    seen: set[bytes] = set()
    kept: list[str] = []
    empty = 0
    for text in docs:
        key = text.strip()
        if not key:
            empty += 1
        elif (digest := hashlib.sha256(key.encode("utf-8")).digest()) not in seen:
            seen.add(digest)
            kept.append(text)
    return kept, empty, len(docs) - len(kept) - empty


def split_order(n_docs: int, seed: int) -> np.ndarray:
    """Shuffled document order: the first ``val_docs`` entries are val, the rest train."""
    return np.random.default_rng(seed).permutation(n_docs)


def tokenizer_sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in map(str.strip, text.splitlines()):
            yield from (line[i : i + MAX_PIECE_CHARS] for i in range(0, len(line), MAX_PIECE_CHARS))


def token_shards(sp: spm.SentencePieceProcessor, texts: Sequence[str], shard_tokens: int) -> Iterator[np.ndarray]:
    """The split's token stream ([BOS]+ids per doc) cut into shards of ``shard_tokens`` (last: the rest)."""
    buf: list[np.ndarray] = []
    n = 0
    for i in range(0, len(texts), ENCODE_BATCH_DOCS):
        buf.append(encode_documents(sp, texts[i : i + ENCODE_BATCH_DOCS]))
        n += buf[-1].size
        while n >= shard_tokens + 2:  # leave >= 2 tokens for the next shard (the trainer needs 2)
            flat = np.concatenate(buf)
            yield flat[:shard_tokens]
            buf, n = [flat[shard_tokens:]], n - shard_tokens
    if n:
        yield np.concatenate(buf)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def prepare_text(inputs: Sequence[Path | str], out_dir: Path | str, *, val_docs: int, seed: int = 1337,
                 tokenizer: Path | str | None = None, vocab_size: int | None = None,
                 tokenizer_out: Path | str | None = None, tokenizer_train_docs: int | None = None,
                 text_field: str = "text", shard_tokens: int = 100_000_000, force: bool = False,
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build the dataset (trains a tokenizer iff ``tokenizer`` is None); returns prepare_text.json's content."""
    t0, emit, out_dir = time.perf_counter(), log or (lambda _msg: None), Path(out_dir)
    files = input_files(inputs)
    docs, n_empty, n_dups = dedupe(read_documents(files, text_field))
    if not docs:
        raise PrepareError(f"empty corpus: no non-empty documents in {', '.join(map(str, files))}")
    if len(docs) <= val_docs:
        raise PrepareError(f"{len(docs)} unique documents, need more than --val-docs={val_docs}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise PrepareError(f"{out_dir}: output exists and is not an empty directory (use --force to overwrite)")
    order = split_order(len(docs), seed)
    splits = {"val": [docs[i] for i in order[:val_docs]], "train": [docs[i] for i in order[val_docs:]]}
    tok_info: dict[str, Any] = {"trained": tokenizer is None}
    if tokenizer is None:
        if vocab_size is None:
            raise PrepareError("--train-tokenizer needs --vocab-size")
        tokenizer = Path(tokenizer_out or out_dir / f"tokenizer_{vocab_size}_bpe.model")
        if tokenizer.exists() and not force:
            raise PrepareError(f"{tokenizer}: tokenizer exists (use --force to overwrite)")
        train_texts = splits["train"][:tokenizer_train_docs]  # never a val document
        sentences = list(tokenizer_sentences(train_texts))
        try:
            train_sentencepiece(sentences, tokenizer, vocab_size)
        except RuntimeError as exc:
            raise PrepareError(str(exc).replace("\n", " ")) from None
        tok_info.update(train_docs=len(train_texts), train_sentences=len(sentences))
    tokenizer = Path(tokenizer)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except (OSError, RuntimeError) as exc:
        raise PrepareError(f"{tokenizer}: not a SentencePiece model ({exc})") from None
    if sp.bos_id() != BOS_ID or sp.vocab_size() > 65536 or vocab_size not in (None, sp.vocab_size()):
        raise PrepareError(f"{tokenizer}: need BOS id {BOS_ID} and {vocab_size or '<= 65536'} pieces, "
                           f"has BOS id {sp.bos_id()} and {sp.vocab_size()} pieces")
    tok_info.update(path=str(tokenizer), sha256=_sha256(tokenizer), vocab_size=sp.vocab_size())
    t_tok = time.perf_counter() - t0

    info: dict[str, Any] = {
        "inputs": [str(f) for f in files], "text_field": text_field, "seed": seed, "shard_tokens": shard_tokens,
        "tokenizer": tok_info, "vocab_size": sp.vocab_size(), "input_docs": len(docs) + n_empty + n_dups,
        "empty_dropped": n_empty, "duplicates_dropped": n_dups,
    }
    for split, texts in splits.items():
        shards = []
        for index, tokens in enumerate(token_shards(sp, texts, shard_tokens)):
            write_shard(path := out_dir / shard_name(split, index), tokens)
            shards.append({"file": path.name, "tokens": int(tokens.size), "sha256": _sha256(path)})
        for stale in set(out_dir.glob(f"fineweb_{split}_*.bin")) - {out_dir / s["file"] for s in shards}:
            stale.unlink()  # left over from an earlier (--force) run; the trainer would read it
        info[split] = {"docs": len(texts), "tokens": sum(s["tokens"] for s in shards),
                       "bytes": sum(len(t.encode("utf-8")) for t in texts), "shards": shards}
    atomic_write_bytes(out_dir / "prepare_text.json", (json.dumps(info, indent=2).encode() + b"\n",))
    emit(f"prepare_text out:{out_dir} tokenizer:{tokenizer} vocab_size:{sp.vocab_size()} "
         f"trained:{tok_info['trained']} seconds:{time.perf_counter() - t0:.1f} tokenizer_s:{t_tok:.1f}")
    emit(f"prepare_text input_files:{len(files)} input_docs:{info['input_docs']} empty_dropped:{n_empty} "
         f"duplicates_dropped:{n_dups}")
    for split in ("val", "train"):
        emit("prepare_text " + " ".join(f"{split}_{k}:{v}" for k, v in info[split].items() if k != "shards")
             + f" {split}_bytes_per_token:{info[split]['bytes'] / info[split]['tokens']:.3f}"
             + f" {split}_shards:{len(info[split]['shards'])}")
    return info


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if (value := int(text)) < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare_text", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--input", nargs="+", required=True, type=Path, help=".jsonl/.txt files or directories")
    add("--out", type=Path, required=True, help="dataset directory")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, help="existing SentencePiece model")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer on the train split")
    add("--vocab-size", type=_at_least(260), help="needed with --train-tokenizer")
    add("--tokenizer-out", type=Path, help="where --train-tokenizer writes the model")
    add("--tokenizer-train-docs", type=_at_least(1), help="train the tokenizer on the first K train docs")
    add("--val-docs", type=_at_least(1), required=True, help="documents in the val split")
    add("--seed", type=_at_least(0), default=1337, help="shuffle seed for the split")
    add("--text-field", default="text", help="jsonl field holding the text")
    add("--shard-tokens", type=_at_least(2), default=100_000_000, help="tokens per shard")
    add("--force", action="store_true", help="overwrite a non-empty --out / existing --tokenizer-out")
    args = parser.parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        parser.error("--train-tokenizer needs --vocab-size")
    if args.tokenizer and (args.tokenizer_out or args.tokenizer_train_docs):
        parser.error("--tokenizer-out / --tokenizer-train-docs only go with --train-tokenizer")
    kwargs = {k: v for k, v in vars(args).items() if k not in ("input", "out", "train_tokenizer")}
    try:
        prepare_text(args.input, args.out, **kwargs)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write outputs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
