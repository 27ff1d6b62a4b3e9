"""Shared helpers for building datasets in the challenge's shard format.

Runbook
-------
Not a script; imported by ``data/make_smoke_data.py`` (and usable by any other
dataset builder)::

    from data.common import encode_documents, train_sentencepiece, write_shard

    train_sentencepiece(texts, "data/tokenizers/my_1024_bpe.model", vocab_size=1024)
    sp = spm.SentencePieceProcessor(model_file="data/tokenizers/my_1024_bpe.model")
    write_shard("data/datasets/my_sp1024/fineweb_val_000000.bin", encode_documents(sp, texts))

Shard format (must match the challenge exactly): a header of 256 little-endian
int32 (``[0]`` = 20240520 magic, ``[1]`` = 1 version, ``[2]`` = token count N,
rest 0) followed by N little-endian uint16 tokens; file size = 1024 + 2 * N.
Every document is ``[BOS] + tokens`` (BOS id 1), no EOS.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
#: first/last id of the 256 byte-fallback pieces ``<0x00>`` .. ``<0xFF>``.
FIRST_BYTE_ID, LAST_BYTE_ID = 4, 259


def shard_name(split: str, index: int = 0) -> str:
    """Challenge file name of a shard, e.g. ``fineweb_train_000000.bin``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return f"fineweb_{split}_{index:06d}.bin"


def atomic_write_bytes(path: Path | str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` via a temp file in the same dir + ``os.replace``.

    Either the complete new file or the previous state is visible at ``path``;
    an interrupted write leaves at most a ``.<name>.*.tmp`` file, never a
    truncated ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def write_shard(path: Path | str, tokens: np.ndarray) -> None:
    """Write a 1-D token array as a challenge shard (atomically).

    Raises ``ValueError`` if ``tokens`` is not 1-D integer data within
    ``[0, 65535]`` (uint16) or has more than 2**31 - 1 entries.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size >= 2**31:
        raise ValueError(f"too many tokens for one shard: {arr.size}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.uint16).max):
        raise ValueError(
            f"tokens must fit uint16 [0, 65535], got range [{int(arr.min())}, {int(arr.max())}]"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = arr.size
    body = arr.astype("<u2", copy=False)
    atomic_write_bytes(path, (header.tobytes(), body.tobytes()))


def read_shard(path: Path | str) -> np.ndarray:
    """Read and validate a shard; returns its tokens as a uint16 array."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: bad shard header")
    n = int(header[2])
    size = path.stat().st_size
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: size {size} != {HEADER_BYTES} + 2 * {n}")
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)


def train_sentencepiece(
    texts: Iterable[str],
    model_path: Path | str,
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    num_threads: int = 16,
) -> None:
    """Train a BPE SentencePiece model with the challenge's settings.

    Settings: BPE, ``byte_fallback=True`` (pieces ``<0x00>..<0xFF>`` at ids
    4..259), ``split_digits=True``, ``nmt_nfkc`` normalisation,
    ``add_dummy_prefix=False``, pad/bos/eos/unk = 0/1/2/3. One text is one
    training sentence (texts must not contain newlines; SentencePiece skips
    sentences longer than 4192 bytes). ``hard_vocab_limit`` stays on, so a
    corpus too small to reach ``vocab_size`` raises instead of silently
    producing a smaller vocabulary. The result is checked (vocab size, byte
    pieces) and written atomically to ``model_path`` (no ``.vocab`` file).

    For the same texts and settings the output bytes are identical (BPE
    training in SentencePiece 0.2.x involves no randomness when every
    sentence is used, as here: ``input_sentence_size=0``). ``num_threads`` is
    recorded in the model's trainer spec, so it is a fixed default rather than
    the machine's core count (the pieces do not depend on it, the bytes do).
    """
    model_path = Path(model_path)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            character_coverage=character_coverage,
            input_sentence_size=0,
            hard_vocab_limit=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise RuntimeError(f"SentencePiece training failed (vocab_size={vocab_size}): {exc}") from exc
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    if sp.vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {sp.vocab_size()} pieces, wanted {vocab_size}")
    if not all(sp.is_byte(i) for i in (FIRST_BYTE_ID, LAST_BYTE_ID)):
        raise RuntimeError("byte-fallback pieces are not at ids 4..259")
    atomic_write_bytes(model_path, (proto,))


def encode_documents(sp: spm.SentencePieceProcessor, texts: Sequence[str]) -> np.ndarray:
    """Concatenate ``[BOS] + sp.encode(text)`` for every text; returns uint16."""
    if sp.vocab_size() > 65536:
        raise ValueError(f"vocab size {sp.vocab_size()} does not fit uint16")
    encoded: list[list[int]] = sp.encode(list(texts), out_type=int)
    total = sum(len(ids) + 1 for ids in encoded)
    out = np.empty(total, dtype=np.uint16)
    pos = 0
    for ids in encoded:
        out[pos] = BOS_ID
        out[pos + 1 : pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return out
