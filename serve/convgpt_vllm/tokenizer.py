"""The exported folder's tokenizer.model (sentencepiece) as a vLLM tokenizer (tokenizer_mode="convgpt").

A text prompt becomes [BOS] + its pieces, exactly as tools/sample.py encodes it: every document starts with BOS and
there is no EOS (the model predicting BOS ends the document, as generation_config.json says)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from transformers import BatchEncoding

BOS_ID = 1  # train_gpt.BOS_ID: the shards' document separator


class ConvGPTTokenizer:
    """vLLM's TokenizerLike over sentencepiece. Special tokens: BOS only (also eos and pad, as in the config)."""

    def __init__(self, path: Path, truncation_side: str = "left"):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        if self.sp.bos_id() != BOS_ID:
            raise ValueError(f"{path} has BOS id {self.sp.bos_id()}, ConvGPT's is {BOS_ID}: not a ConvGPT tokenizer")
        self._truncation_side = truncation_side
        self.name_or_path = str(path.parent)
        self._vllm_space_marker_cache = "▁"  # vLLM's detokenizer restores a piece's leading space from it
        self._vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *args, truncation_side: str = "left", **kwargs) -> ConvGPTTokenizer:
        path = Path(path_or_repo_id) / "tokenizer.model"
        if not path.is_file():
            raise ValueError(f"{path_or_repo_id} has no tokenizer.model: not a folder from tools/export_hf.py")
        return cls(path, truncation_side)

    def num_special_tokens_to_add(self) -> int:
        return 1

    @property
    def all_special_tokens(self) -> list[str]:
        return [self.sp.id_to_piece(BOS_ID)]

    @property
    def all_special_ids(self) -> list[int]:
        return [BOS_ID]

    @property
    def bos_token_id(self) -> int:
        return BOS_ID

    @property
    def eos_token_id(self) -> int:
        return BOS_ID

    @property
    def pad_token_id(self) -> int:
        return BOS_ID

    @property
    def is_fast(self) -> bool:
        return False

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def max_token_id(self) -> int:
        return self.sp.vocab_size() - 1

    @property
    def max_chars_per_token(self) -> int:
        return max(len(piece) for piece in self._vocab)

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    def __hash__(self) -> int:
        return hash(id(self))

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, truncation: bool | None = None, max_length: int | None = None,
               add_special_tokens: bool = True) -> list[int]:
        pieces, bos = self.sp.encode(text), [BOS_ID] * add_special_tokens
        if truncation and max_length is not None and len(bos) + len(pieces) > max_length:
            keep = max(max_length - len(bos), 0)  # the document's BOS stays in front
            pieces = pieces[len(pieces) - keep:] if self._truncation_side == "left" else pieces[:keep]
        return bos + pieces

    def __call__(self, text: str | list[str], text_pair: str | None = None, add_special_tokens: bool = True,
                 truncation: bool = False, max_length: int | None = None) -> BatchEncoding:
        if text_pair is not None:
            raise ValueError("ConvGPT's tokenizer takes no text pairs")
        texts = [text] if isinstance(text, str) else text
        ids = [self.encode(t, truncation, max_length, add_special_tokens) for t in texts]
        ids = ids[0] if isinstance(text, str) else ids
        return BatchEncoding({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids] if ids and
                              isinstance(ids[0], list) else [1] * len(ids)})

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def get_added_vocab(self) -> dict[str, int]:
        return {}

    def apply_chat_template(self, messages, tools=None, **kwargs):
        raise ValueError("ConvGPT is a base language model with no chat template: use completions, not chat")

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens)
        return [self.sp.piece_to_id(t) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(tokens)

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != BOS_ID]
        return self.sp.decode(ids)

    def convert_ids_to_tokens(self, ids: Sequence[int], skip_special_tokens: bool = False) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids if not (skip_special_tokens and i == BOS_ID)]
