"""ConvGPT-v2 as a vLLM model, with its decoding state in vLLM's paged, per-token cache.

The math is the exported folder's modeling_convgpt.py, which tools/export_hf.py copies verbatim from train_gpt.py
and convgpt_ops.py: this file builds that module's ConvGPT and runs its own forward_logits with its own decoding
cache (the dict that tools/sample.py and transformers' generate() use). It writes no model code of its own.

The state. ConvGPT.forward_logits's cache holds, per block, every earlier position's conv input u (ConvMix: a
Hilbert tap reaches far back) or key and value (ChunkMemory: the chunk mean keys are recomputed from them), and the
token ids (BigramHash and SmearGate read the two previous tokens). All are functions of the prefix only, so they
are kept per token in vLLM's paged KV cache: one StateLayer per block, each token's row [state | id] in a page of
identical shape for every block. For each request of a step, forward gathers its earlier positions' rows through
the block table into the cache dict, runs forward_logits on its new tokens, and writes the new rows at their slots.
Prefix caching, chunked prefill and continuous batching then work as for attention: a reused page holds exactly the
rows this prefix produces. Requests run writers first (writers_first: a prefix hit can read a page that another
request fills in the same step), and those with equal earlier and new lengths as one batch (batches).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionMetadata,
                                       AttentionMetadataBuilder, CommonAttentionMetadata)
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from convgpt_vllm import MODEL_TYPE, NotConvGPT

SERVED_DTYPE = torch.float32  # the exported weights' and the parity tests' dtype (bf16 on CPU: ~6x slower, drifts)
EXACT_FLOAT_IDS = 2 ** 24  # token ids are stored in an fp32 column: exact below 2^24


def modeling_module(config) -> ModuleType:
    """The exported folder's modeling_convgpt module, which transformers loaded for config (trust_remote_code)."""
    try:
        module = importlib.import_module(type(config).__module__)
    except ImportError:
        module = None
    if getattr(config, "model_type", None) != MODEL_TYPE or not hasattr(module, "ConvGPT"):
        raise NotConvGPT(f"not an exported ConvGPT folder: config model_type is {getattr(config, 'model_type', None)!r}"
                         f" from {type(config).__module__} (tools/export_hf.py writes model_type {MODEL_TYPE!r} and "
                         f"modeling_convgpt.py; load it with trust_remote_code=True)")
    return module


# ----------------------------------------------------------------------------- the paged state

@dataclass
class StateMetadata(AttentionMetadata):
    query_start_loc: Tensor  # [R + 1] (CPU) first new token of each request in the step's flat batch
    block_table: Tensor  # [R, max_blocks] each request's pages
    slot_mapping: Tensor  # [T] each new token's row: page * block_size + offset


class StateMetadataBuilder(AttentionMetadataBuilder[StateMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # the base declares __init__ abstract

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> StateMetadata:
        m = common_attn_metadata
        return StateMetadata(query_start_loc=m.query_start_loc_cpu[:m.num_reqs + 1],
                             block_table=m.block_table_tensor[:m.num_reqs], slot_mapping=m.slot_mapping)


class StateBackend(AttentionBackend):
    """No attention kernel: the layer's pages are read and written by ConvGPTvLLM.forward."""

    @staticmethod
    def get_name() -> str:
        return "CONVGPT_STATE"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("ConvGPT's state pages have no attention kernel; ConvGPTvLLM.forward uses them")

    @staticmethod
    def get_builder_cls() -> type[StateMetadataBuilder]:
        return StateMetadataBuilder

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        return dtype == SERVED_DTYPE


class StateLayer(nn.Module, AttentionLayerBase):
    """One block's per-token rows in vLLM's paged cache: [num_pages, 1, block_size, width] once bound."""

    def __init__(self, name: str, width: int):
        super().__init__()
        self.name, self.width = name, width
        self.kv_cache = torch.tensor([])
        forward_context = get_current_vllm_config().compilation_config.static_forward_context
        if name in forward_context:
            raise ValueError(f"duplicate layer name {name}")
        forward_context[name] = self

    def get_attn_backend(self) -> type[AttentionBackend]:
        return StateBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        block_size = vllm_config.cache_config.block_size
        return FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=self.width, head_size_v=0,
                                 dtype=SERVED_DTYPE)

    def rows(self, slots: Tensor) -> Tensor:
        """The rows at flat slots [N] -> [N, width]."""
        pages = self.kv_cache[:, 0]
        return pages[slots // pages.shape[1], slots % pages.shape[1]]

    def write(self, slots: Tensor, rows: Tensor, column: int = 0) -> None:
        """rows [N, w] into columns column..column+w-1 of the rows at slots [N]."""
        pages = self.kv_cache[:, 0]
        pages[slots // pages.shape[1], slots % pages.shape[1], column:column + rows.shape[1]] = rows


# ----------------------------------------------------------------------------- the model

def is_conv(mixer: nn.Module) -> bool:
    """ConvMix (its cache holds u) or ChunkMemory (k and v). By name: the module's classes can exist twice in one
    process (transformers and vLLM each load the folder's code), so isinstance could say no to a ConvMix."""
    return type(mixer).__name__ == "ConvMix"


def state_widths(model: nn.Module) -> list[int]:
    """Each block's state width per token: ConvMix's u, ChunkMemory's keys and values."""
    a = model.args
    return [a.model_dim if is_conv(block.mixer) else 2 * a.num_kv_heads * a.head_dim for block in model.blocks]


def split_rows(rows: Tensor, mixer: nn.Module, heads: int) -> dict[str, Tensor]:
    """A block's rows [G, N, width] of G requests -> its forward_logits cache entry."""
    if is_conv(mixer):
        return {"u": rows}
    k, v = rows.view(*rows.shape[:2], 2 * heads, -1).transpose(1, 2).chunk(2, 1)
    return {"k": k, "v": v}


def join_rows(entry: dict[str, Tensor], n: int) -> Tensor:
    """The last n positions of a block's cache entry -> rows [G * n, width], request after request."""
    if "u" in entry:
        return entry["u"][:, -n:].flatten(0, 1)
    kv = torch.cat((entry["k"][:, :, -n:], entry["v"][:, :, -n:]), 1)
    return kv.transpose(1, 2).flatten(2).flatten(0, 1)


def writers_first(spans: list[tuple]) -> list[tuple]:
    """The step's requests (start, end, earlier slots, new slots) in an order where none reads a row that another
    writes later in this step. vLLM can give a request a prefix-cache hit on pages that a request earlier in the
    queue fills in this same step (they are marked cached when allocated); attention survives that because every
    layer writes all tokens before it reads, but here each request (or batch of them) runs whole, one after another."""
    pending, order = list(spans), []
    while pending:
        for i, span in enumerate(pending):
            others = [s[3] for j, s in enumerate(pending) if j != i]
            if not others or not torch.isin(span[2], torch.cat(others)).any():
                order.append(pending.pop(i))
                break
        else:
            raise RuntimeError("ConvGPT's requests in this step read each other's new rows: no order serves them")
    return order


def batches(spans: list[tuple]) -> list[list[tuple]]:
    """Consecutive requests with as many earlier and as many new positions run as one batch of forward_logits (it has
    no padding), unless one reads what another writes: a decode step of equal-length requests is one forward."""
    groups: list[list[tuple]] = []
    for span in spans:
        group = groups[-1] if groups else None
        if (group and (len(group[0][2]), group[0][1] - group[0][0]) == (len(span[2]), span[1] - span[0])
                and not torch.isin(span[2], torch.cat([s[3] for s in group])).any()):
            group.append(span)
        else:
            groups.append([span])
    return groups


class ConvGPTvLLM(nn.Module):
    """vLLM's model interface around the exported ConvGPT; forward returns the logits, compute_logits passes them on."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        module = modeling_module(model_config.hf_config)
        if model_config.dtype != SERVED_DTYPE:
            raise ValueError(f"ConvGPT is served in float32 (dtype='float32'), not {model_config.dtype}")
        # through the imported module's class, not the config's own method: vLLM's worker receives the config class
        # pickled by value, and the Hyperparameters it refers to arrives without its fields (all defaults)
        args = module.ConvGPTConfig.hyperparameters(model_config.hf_config)
        self.model = module.reference_path(module.ConvGPT(args))
        if self.model.args.vocab_size > EXACT_FLOAT_IDS:
            raise ValueError(f"vocabulary {self.model.args.vocab_size} does not fit the state's fp32 id column")
        self.widths = state_widths(self.model)
        width = max(self.widths) + 1  # + the token id column (read from block 0's): one page shape for every block
        self.states = nn.ModuleList(StateLayer(f"{prefix}convgpt_state.{i}", width) for i in range(len(self.widths)))

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.tok_emb(input_ids)

    def forward(self, input_ids: Tensor, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None, **kwargs) -> Tensor:
        metadata = get_forward_context().attn_metadata
        logits = torch.zeros(input_ids.shape[0], self.model.args.vocab_size, device=input_ids.device)
        if not isinstance(metadata, dict) or self.states[0].kv_cache.numel() == 0:
            return logits  # vLLM's profiling run, before the pages exist
        m = metadata[self.states[0].name]
        starts = m.query_start_loc.tolist()
        spans = [(start, end, self.slots(m.block_table[r], int(positions[start])), m.slot_mapping[start:end].long())
                 for r, (start, end) in enumerate(zip(starts[:-1], starts[1:]))]
        for group in batches(writers_first(spans)):
            ids = torch.stack([input_ids[start:end] for start, end, _, _ in group])
            out = self.request(ids, torch.stack([span[2] for span in group]), torch.cat([span[3] for span in group]))
            for (start, end, _, _), request_logits in zip(group, out):
                logits[start:end] = request_logits
        return logits

    def slots(self, pages: Tensor, done: int) -> Tensor:
        """The slots of a request's first done positions, through its page table."""
        page_size = self.states[0].kv_cache.shape[2]
        earlier = torch.arange(done, device=pages.device)
        return pages[earlier // page_size].long() * page_size + earlier % page_size

    def request(self, ids: Tensor, earlier: Tensor, new: Tensor) -> Tensor:
        """G requests' step as one batch: their new tokens ids [G, n], the slots of their earlier positions [G, done]
        and of the new ones [G * n]. Reads the earlier rows into forward_logits's cache, runs it, writes the new rows.
        Returns the logits [G, n, vocab]."""
        (G, n), done = ids.shape, earlier.shape[1]
        cache: dict = {}
        if done:
            slots = earlier.flatten()
            cache["ids"] = self.states[0].rows(slots)[:, -1].round().long().view(G, done)
            for i, (block, state, width) in enumerate(zip(self.model.blocks, self.states, self.widths)):
                rows = state.rows(slots)[:, :width].view(G, done, width)
                cache[i] = split_rows(rows, block.mixer, self.model.args.num_kv_heads)
        logits = self.model.forward_logits(ids, cache)
        for i, state in enumerate(self.states):
            state.write(new, join_rows(cache[i], n))
        self.states[0].write(new, ids.reshape(-1, 1).to(SERVED_DTYPE), column=self.states[0].width - 1)
        return logits

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """model.safetensors holds the HF model's state_dict: ConvGPT's, each name under `model.`."""
        params = dict(self.model.named_parameters(prefix="model"))
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise NotConvGPT(f"model.safetensors has a tensor {name} that the exported ConvGPT does not have")
            if params[name].shape != tensor.shape:
                raise NotConvGPT(f"model.safetensors's {name} is {tuple(tensor.shape)}, the config's model has "
                                 f"{tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise NotConvGPT(f"model.safetensors lacks {len(missing)} of the model's tensors, e.g. {min(missing)}")
        return loaded
