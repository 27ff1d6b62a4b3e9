"""python -m convgpt_vllm check FOLDER | serve FOLDER [vLLM server arguments ...]

check: one line, `ok FOLDER ...` (exit 0) or `error: ...` (exit 2).
serve: checks FOLDER, then runs vLLM's OpenAI-compatible server on it with ConvGPT's settings (--trust-remote-code,
       --tokenizer-mode convgpt, --dtype float32, --kv-cache-memory-bytes 1 GiB unless a memory flag is given); every
       further argument goes to the server (--port, --max-num-seqs, --served-model-name, ...).
"""

from __future__ import annotations

import os
import sys

from convgpt_vllm import KV_CACHE_BYTES, TOKENIZER_MODE, NotConvGPT, check_folder

MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def server_argv(folder: str, rest: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--trust-remote-code",
            "--tokenizer-mode", TOKENIZER_MODE, "--dtype", "float32"]
    if not any(arg.split("=")[0] in MEMORY_FLAGS for arg in rest):
        argv += ["--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    return argv + rest


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("check", "serve"):
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    command, folder, rest = argv[0], argv[1], argv[2:]
    try:
        config = check_folder(folder)
    except NotConvGPT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if command == "check":
        print(f"ok {folder} model_type:{config['model_type']} max_seq_len:{config['max_position_embeddings']} "
              f"vocab_size:{config['vocab_size']}")
        return 0
    args = server_argv(folder, rest)
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
