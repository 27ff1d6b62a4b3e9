"""Decode speed of one artifact served by vLLM (serve/convgpt_vllm) against tools/sample.py's cached decoder.

Runbook
  pip install -r requirements.txt -r requirements-serve.txt && pip uninstall -y torchvision torchaudio torchcodec
  python bench/bench_serve.py --artifact final_model.int6.ptz --log logs/RUN.txt            # the table
  python bench/bench_serve.py --artifact A --log L --prompt-tokens 128 --new-tokens 128 --requests 8

What it measures (fp32, CPU, this machine's threads)
  * The artifact is exported (tools/export_hf.py) into a temporary folder; every prompt is [BOS] + random pieces of
    --prompt-tokens, and every request decodes exactly --new-tokens greedy tokens (vLLM: ignore_eos; sample.py:
    stop_at_bos off), so both sides decode the same number of tokens.
  * tools/sample.py: its generate() on the artifact's model, one prompt, then --requests prompts of one length as
    one batch (as sample.py batches prompts of equal length).
  * vLLM: one request, then --requests concurrent requests (max_num_seqs = --requests), after one warm-up request.
  * tokens/s = new tokens decoded / wall seconds, the prompt's prefill included; the best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import export_hf, sample  # noqa: E402


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(2, vocab, (length - 1,), generator=generator).tolist() for _ in range(n)]


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_sample(model, batch: list[list[int]], new: int, repeats: int) -> float:
    ids = torch.tensor(batch)
    with torch.no_grad():
        seconds = best_of(repeats, lambda: sample.generate(model, ids, new, 0.0, stop_at_bos=False))
    return len(batch) * new / seconds


def bench_vllm(folder: Path, batch: list[list[int]], new: int, repeats: int, max_num_seqs: int) -> float:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from convgpt_vllm import engine_args
    llm = LLM(**engine_args(folder, max_num_seqs=max_num_seqs, enable_prefix_caching=False, enforce_eager=True))
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    requests = [TokensPrompt(prompt_token_ids=p) for p in batch]
    llm.generate(requests[:1], params, use_tqdm=False)  # warm-up
    seconds = best_of(repeats, lambda: llm.generate(requests, params, use_tqdm=False))
    return len(batch) * new / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--tokenizer", help="default: TOKENIZER_PATH, then the log's")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one clock
    model, _ = sample.load_model(a.artifact, sample.settings(a.log, {}))
    if a.prompt_tokens + a.new_tokens > model.args.max_seq_len:
        print(f"error: --prompt-tokens + --new-tokens = {a.prompt_tokens + a.new_tokens} exceeds the model's "
              f"{model.args.max_seq_len}", file=sys.stderr)
        return 2
    batch = prompts(a.requests, a.prompt_tokens, model.args.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "convgpt"
        argv = ["--artifact", a.artifact, "--log", a.log, "--out", str(folder)]
        if export_hf.main(argv + (["--tokenizer", a.tokenizer] if a.tokenizer else [])) != 0:
            return 2
        rows = [("tools/sample.py", 1, bench_sample(model, batch[:1], a.new_tokens, a.repeats)),
                ("tools/sample.py", a.requests, bench_sample(model, batch, a.new_tokens, a.repeats)),
                ("vLLM", 1, bench_vllm(folder, batch[:1], a.new_tokens, a.repeats, 1)),
                ("vLLM", a.requests, bench_vllm(folder, batch, a.new_tokens, a.repeats, a.requests))]
    print(f"bench_serve params:{sum(t.numel() for t in model.parameters())} prompt_tokens:{a.prompt_tokens} "
          f"new_tokens:{a.new_tokens} torch_threads:{torch.get_num_threads()} dtype:float32")
    print("| decoder | requests | new tokens/s |\n|---|---|---|")
    for name, n, rate in rows:
        print(f"| {name} | {n} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
