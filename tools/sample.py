"""Text from a trained artifact, decoded incrementally: the prompt in one forward, then one position per token.

Runbook
  python tools/sample.py --artifact final_model.int6.ptz --log logs/RUN.txt --prompt "The history of" \
      --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1
  python tools/sample.py --artifact A --log L --prompt-file prompts.txt --temperature 0   # greedy, one prompt a line

  Settings: the run's `hp` lines (--log), or without --log the environment, as train_gpt.py reads it.
  Tokenizer: --tokenizer, else TOKENIZER_PATH from the environment, else the log's tokenizer_path.
  Each prompt is a document: [BOS] + its pieces. A sample ends at --max-new-tokens or where the model starts a new
  document (BOS). Prompts of equal token length run as one batch.

Invariants
  * The decoder is ConvGPT.forward_logits with a cache (train_gpt.py): the same modules and the same math as the
    trainer's forward. Its logits equal the full forward's at every position (tests/test_sample.py, five layouts).
    A cache is filled block by block: after an exception inside a step, start a new one.
  * The weights are the artifact's, dequantized, on the PyTorch reference path (no Triton), in fp32.
  * Bad input (artifact and settings that disagree, a missing tokenizer, a prompt that does not fit the model's
    longest sequence): one "error: ..." line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from tools.runlog import read_log  # noqa: E402


def settings(log: str | None, env: dict[str, str]) -> train_gpt.Hyperparameters:
    """The run's Hyperparameters: its log's hp lines, or the environment."""
    if log is None:
        return train_gpt.Hyperparameters.from_env(env)
    try:
        hp = read_log(log, require_finished=False).hp
    except ValueError as e:
        raise train_gpt.FatalError(str(e)) from None
    if not hp:
        raise train_gpt.FatalError(f"log {log} has no `hp` lines: it is not a train_gpt.py log")
    names = {f.upper() for f in train_gpt.Hyperparameters.__dataclass_fields__}
    return train_gpt.Hyperparameters.from_env({key.upper(): value for key, value in hp.items() if key.upper() in names})


def load_model(artifact: str, args: train_gpt.Hyperparameters) -> tuple[train_gpt.ConvGPT, int]:
    """The artifact's weights in a CPU fp32 model on the reference path, in eval mode; and the artifact's bytes."""
    model = train_gpt.ConvGPT(replace(args, artifact_path=artifact))
    size = train_gpt.load_artifact(model)
    return model.eval(), size


def load_tokenizer(path: str):
    import sentencepiece as spm
    if not Path(path).is_file():
        raise train_gpt.FatalError(f"tokenizer {path} does not exist (set --tokenizer or TOKENIZER_PATH)")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise train_gpt.FatalError(f"tokenizer {path} is not a sentencepiece model ({' '.join(str(e).split())[:200]})") from None


def encode(sp, prompts: list[str], max_seq_len: int, max_new_tokens: int) -> list[list[int]]:
    """[BOS] + pieces per prompt; each must leave room for max_new_tokens in the model's longest sequence (the last
    new token is never fed back, so prompt + max_new_tokens - 1 positions must fit)."""
    out = []
    for i, prompt in enumerate(prompts):
        ids = [train_gpt.BOS_ID, *sp.encode(prompt)]
        if len(ids) + max_new_tokens - 1 > max_seq_len:
            raise train_gpt.FatalError(f"prompt {i + 1} is {len(ids)} tokens (BOS included): with --max-new-tokens "
                                       f"{max_new_tokens} it exceeds the model's longest sequence of {max_seq_len}")
        out.append(ids)
    return out


def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: argmax at temperature 0, else a sample from the top_k (0 = all) at temperature."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: train_gpt.ConvGPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, generator: torch.Generator | None = None, stop_at_bos: bool = True) -> torch.Tensor:
    """[B, P] prompt ids -> [B, max_new_tokens] new ids through the decoding cache; after a BOS, a row is BOS."""
    cache: dict = {}
    logits = model.forward_logits(prompt, cache)[:, -1]
    out, done = [], torch.zeros(prompt.shape[0], dtype=torch.bool)
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, generator)
        token = torch.where(done, train_gpt.BOS_ID, token)
        out.append(token)
        done |= stop_at_bos & (token == train_gpt.BOS_ID)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model.forward_logits(token[:, None], cache)[:, -1]
    return torch.stack(out, 1) if out else prompt.new_zeros(prompt.shape[0], 0)


@dataclass
class Sample:
    prompt: str
    ids: list[int]  # the new tokens
    text: str  # prompt and continuation, decoded together


def sample_prompts(model: train_gpt.ConvGPT, sp, prompts: list[str], max_new_tokens: int, temperature: float,
                   top_k: int, seed: int) -> list[Sample]:
    """Every prompt's continuation; prompts of one token length form one batch. Seeded per batch, in order."""
    encoded = encode(sp, prompts, model.args.max_seq_len, max_new_tokens)
    samples: list[Sample | None] = [None] * len(prompts)
    for length in sorted({len(ids) for ids in encoded}):
        rows = [i for i, ids in enumerate(encoded) if len(ids) == length]
        generator = torch.Generator().manual_seed(seed)
        new = generate(model, torch.tensor([encoded[i] for i in rows]), max_new_tokens, temperature, top_k, generator)
        for i, ids in zip(rows, new.tolist()):
            ids = ids[:ids.index(train_gpt.BOS_ID)] if train_gpt.BOS_ID in ids else ids
            samples[i] = Sample(prompts[i], ids, sp.decode(encoded[i][1:] + ids))
    return samples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="the int6 + zstd artifact (ARTIFACT_PATH of the run)")
    p.add_argument("--log", help="the run's log (logs/<RUN_ID>.txt): its hp lines are the settings")
    p.add_argument("--tokenizer", help="sentencepiece model (default: TOKENIZER_PATH, then the log's)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompt-file", help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = the whole vocabulary")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def prompts_of(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            prompts += [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise train_gpt.FatalError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise train_gpt.FatalError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    if not prompts:
        raise train_gpt.FatalError("no prompt: give --prompt TEXT or --prompt-file FILE")
    if args.max_new_tokens < 1 or not (math.isfinite(args.temperature) and args.temperature >= 0) or args.top_k < 0:
        raise train_gpt.FatalError("--max-new-tokens must be >= 1, --temperature finite and >= 0, --top-k >= 0")
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prompts = prompts_of(args)
        hp = settings(args.log, dict(os.environ))
        sp = load_tokenizer(args.tokenizer or os.environ.get("TOKENIZER_PATH") or hp.tokenizer_path)
        if sp.vocab_size() != hp.vocab_size:
            raise train_gpt.FatalError(f"tokenizer has {sp.vocab_size()} pieces, the model VOCAB_SIZE={hp.vocab_size}")
        model, _ = load_model(args.artifact, hp)
        t0 = time.perf_counter()
        samples = sample_prompts(model, sp, prompts, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    except train_gpt.FatalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    seconds, n = time.perf_counter() - t0, sum(len(s.ids) for s in samples)
    for s in samples:
        print(f"--- prompt: {s.prompt}\n{s.text}")
    print(f"sample prompts:{len(samples)} new_tokens:{n} time:{seconds:.2f}s tok_s:{n / seconds:.1f} "
          f"temperature:{args.temperature} top_k:{args.top_k} seed:{args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
