"""serve/ (the vLLM plugin, requirements-serve.txt): an exported tiny model served by vLLM gives the HF folder's fp32
logprobs and tools/sample.py's greedy tokens, with continuous batching, chunked prefill and a prefix-cache hit; the
OpenAI server answers a completion; bad inputs are one clear line each.

vLLM runs in subprocesses (its CPU worker binds memory and threads), on a copy of the export whose matrices carry
added noise: the trained tiny model's mixers are near zero (zero-initialized output projections after 6 steps), so
a wrong conv or memory state would hardly move its logits. The noise makes every token depend on its context."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from tools import export_hf, sample

pytestmark = pytest.mark.slow
MAX_SEQ = 64  # TINY_ENV's longest sequence: the engine's max_model_len
BUDGET = 32  # max_num_batched_tokens: prompts longer than this are prefilled in chunks
MAX_SEQS = 2  # max_num_seqs: 6 prompts queue and join the running batch as others finish
# mixed; the two 16s prefill in one step and then decode as one batch of forward_logits; 47 crosses the memory
# chunks at 16 and 32 and fills 2 pages of 16
PROMPT_LENS = (16, 16, 1, 5, 33, 47)
NEW = 24  # greedy tokens per prompt (fewer where the prompt leaves less room)
SHARED = 40  # the prefix-cache prompt repeats the 47-token prompt's first 40 tokens: 2 full pages are reused
LOGPROB_LENS = (2, 9, 31, 63)  # teacher-forced sequences, up to the longest that leaves room for one output
LOGPROB_ATOL = 1e-4
SERVER_START_S = 240

ENGINE_SCRIPT = '''
import json, sys
import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from convgpt_vllm import engine_args

folder, probe_path, out_path, budget, max_seqs = sys.argv[1:]
probe = json.loads(open(probe_path).read())
steps, batch_rows = [], []  # (tokens, requests) of every model forward; rows of every forward_logits call

def record(model):
    from vllm.forward_context import get_forward_context
    def hook(module, args):
        meta = get_forward_context().attn_metadata
        if isinstance(meta, dict):
            loc = next(iter(meta.values())).query_start_loc
            steps.append((int(loc[-1]), len(loc) - 1))
    model.register_forward_pre_hook(hook)
    forward_logits = model.model.forward_logits
    def counted(ids, cache=None):
        batch_rows.append(ids.shape[0])
        return forward_logits(ids, cache)
    model.model.forward_logits = counted

def main():
    llm = LLM(**engine_args(folder, max_num_seqs=int(max_seqs), max_num_batched_tokens=int(budget),
                            enable_prefix_caching=True, block_size=16, enforce_eager=True,
                            kv_cache_memory_bytes=1 << 26))
    llm.apply_model(record)
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, logprobs=0)
    out = lambda o: {"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens,
                     "logprobs": [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
    prompts = [TokensPrompt(prompt_token_ids=p) for p in probe["prompts"]]
    outs = llm.generate(prompts, [greedy(min(probe["new"], probe["max_seq"] - len(p))) for p in probe["prompts"]])
    result = {"greedy": [out(o) for o in outs], "steps": list(steps), "batch_rows": list(batch_rows)}
    result["shared"] = out(llm.generate([TokensPrompt(prompt_token_ids=probe["shared"])], greedy(16))[0])
    before = len(steps)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in probe["same_step"]], [greedy(1), greedy(16), greedy(16)])
    result["same_step"] = {"outs": [out(o) for o in outs], "steps": steps[before:before + 2]}
    forced = llm.generate([TokensPrompt(prompt_token_ids=s) for s in probe["forced"]],
                          SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    result["logprobs"] = [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])]
                          for o, s in zip(forced, probe["forced"])]
    try:
        llm.generate([TokensPrompt(prompt_token_ids=[1] * (probe["max_seq"] + 1))], greedy(1))
        result["too_long"] = None
    except Exception as e:  # vLLM's VLLMValidationError
        result["too_long"] = str(e)
    json.dump(result, open(out_path, "w"))

if __name__ == "__main__":
    main()
'''


def serve_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               **overrides)
    return env


@pytest.fixture(scope="module")
def folder(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported, its matrices with unit-scale noise added (the docstring says why)."""
    out = tmp_path_factory.mktemp("serve") / "convgpt"
    argv = ["--artifact", str(tiny_run["artifact"]), "--log", str(tiny_run["log"]), "--tokenizer",
            str(tiny_run["tokenizer"]), "--out", str(out)]
    assert export_hf.main(argv) == 0
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    noisy = {name: w + torch.randn(w.shape, generator=generator) * w.shape[1] ** -0.5 if w.ndim == 2 else w
             for name, w in weights.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def trainer_model(folder: Path, tiny_run: dict[str, Path]):
    """The trainer's ConvGPT with the folder's weights: what tools/sample.py decodes with."""
    model = sample.train_gpt.ConvGPT(sample.settings(str(tiny_run["log"]), {})).eval()
    model.load_state_dict({name.removeprefix("model."): w for name, w in load_file(folder / "model.safetensors").items()})
    return model


@pytest.fixture(scope="module")
def probe() -> dict:
    generator = torch.Generator().manual_seed(1)
    seq = lambda n: [1] + torch.randint(2, 1024, (n - 1,), generator=generator).tolist()
    prompts = [seq(n) for n in PROMPT_LENS]
    shared = prompts[-1][:SHARED] + seq(4)[1:]
    fresh = seq(PROMPT_LENS[-1])
    return {"prompts": prompts, "shared": shared, "forced": [seq(n) for n in LOGPROB_LENS], "max_seq": MAX_SEQ,
            "new": NEW, "same_step": [[1], fresh, fresh[:SHARED] + seq(4)[1:]]}


@pytest.fixture(scope="module")
def engine(folder: Path, probe: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("engine")
    (work / "engine.py").write_text(ENGINE_SCRIPT)
    (work / "probe.json").write_text(json.dumps(probe))
    result = subprocess.run([sys.executable, "engine.py", str(folder), "probe.json", "out.json", str(BUDGET),
                             str(MAX_SEQS)], cwd=work, env=serve_env(work, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
                            capture_output=True, text=True, timeout=600)  # the engine in-process: the hook sees it
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "out.json").read_text())


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return sample.generate(model, torch.tensor([prompt]), n, 0.0)[0].tolist()


def assert_decoded(model, prompt: list[int], got: dict) -> None:
    """vLLM's greedy tokens are tools/sample.py's, and each token's logprob is the full forward's (teacher-forced on
    prompt + tokens): continuous values, so a wrong row anywhere in the state shows, not only a changed argmax."""
    assert got["tokens"] == reference_greedy(model, prompt, len(got["tokens"])), len(prompt)
    full = torch.tensor([prompt + got["tokens"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model.forward_logits(full[:, :-1])[0, len(prompt) - 1:], -1)
    want = logprobs[torch.arange(len(got["tokens"])), full[0, len(prompt):]]
    assert (torch.tensor(got["logprobs"]) - want).abs().max() <= LOGPROB_ATOL, len(prompt)


def test_teacher_forced_logprobs_equal_the_hf_folders(engine: dict, probe: dict, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    wants = []
    for ids, got in zip(probe["forced"], engine["logprobs"]):
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([ids]), use_cache=False).logits[0], -1)
        wants.append(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])])
        assert (torch.tensor(got) - wants[-1]).abs().max() <= LOGPROB_ATOL, len(ids)
    assert torch.cat(wants).std() > 0.3  # the noisy model's logprobs vary: a wrong state would show


def test_greedy_tokens_equal_tools_sample_with_batching_and_chunked_prefill(engine: dict, probe: dict,
                                                                             trainer_model) -> None:
    for prompt, got in zip(probe["prompts"], engine["greedy"]):
        assert_decoded(trainer_model, prompt, got)
    assert [len(g["tokens"]) for g in engine["greedy"]] == [min(NEW, MAX_SEQ - n) for n in PROMPT_LENS]  # none stopped
    tokens, requests = zip(*engine["steps"])
    assert max(tokens) <= BUDGET and max(requests) == MAX_SEQS  # chunked prefill, continuous batching
    assert engine["batch_rows"].count(2) >= NEW - 1  # the two 16-token prompts decoded as one batch
    assert sum(tokens) == sum(map(len, probe["prompts"])) + sum(len(g["tokens"]) for g in engine["greedy"]) - len(
        probe["prompts"])


def test_prefix_cache_hit_gives_the_same_tokens(engine: dict, probe: dict, trainer_model) -> None:
    assert engine["shared"]["cached"] == 32  # the 47-token prompt's two full pages, read back from the paged state
    assert_decoded(trainer_model, probe["shared"], engine["shared"])


def test_a_prefix_hit_on_pages_filled_in_the_same_step_reads_them_after_they_are_written(engine: dict, probe: dict,
                                                                                         trainer_model) -> None:
    """A 1-token request finishes after step 1 and frees the batch's first slot; in step 2 the 47-token prompt's last
    chunk fills its second page, which vLLM marks cached at once, and the request sharing its first 40 tokens takes
    that slot with a 32-token hit: it sits before its writer in the batch (writers_first orders them)."""
    same = engine["same_step"]
    assert same["steps"] == [[BUDGET, 2], [16 + 11, 2]]  # step 2: the writer's last 16 tokens and the reader's 11
    assert [o["cached"] for o in same["outs"]] == [0, 0, 32]
    for prompt, got in zip(probe["same_step"], same["outs"]):
        assert_decoded(trainer_model, prompt, got)


def test_prompt_longer_than_the_model_is_one_clear_line(engine: dict) -> None:
    message = engine["too_long"]
    assert message is not None and "\n" not in message.strip(), message
    assert f"maximum context length is {MAX_SEQ} tokens" in message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_server_answers_a_completion(folder: Path, tiny_run: dict[str, Path], trainer_model,
                                            tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "convgpt_vllm", "serve", str(folder), "--port", str(port),
                               "--host", "127.0.0.1", "--served-model-name", "convgpt", "--max-num-seqs", "2",
                               "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 26)],
                              env=serve_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "server did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        url = f"http://127.0.0.1:{port}/v1/completions"
        status, body = post(url, {"model": "convgpt", "prompt": "The history of", "max_tokens": 8, "temperature": 0})
        assert status == 200, (body, (tmp_path / "server.log").read_text()[-12000:])
        sp = sample.load_tokenizer(str(tiny_run["tokenizer"]))
        prompt = [1, *sp.encode("The history of")]
        want = reference_greedy(trainer_model, prompt, 8)
        assert body["usage"]["prompt_tokens"] == len(prompt)
        new = want[:len(want) - (want[-1] == 1)]  # a BOS ends the document; the text omits it
        assert body["choices"][0]["text"] == sp.decode(prompt + new)[len(sp.decode(prompt)):]  # as vLLM detokenizes
        status, body = post(url, {"model": "convgpt", "prompt": "word " * MAX_SEQ, "max_tokens": 1})
        assert status == 400 and f"maximum context length is {MAX_SEQ} tokens" in body["error"]["message"], body
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_folder_that_is_not_ours_is_one_error_line(command: str, tmp_path: Path, folder: Path) -> None:
    other = tmp_path / "llama"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    for bad, phrase in ((tmp_path / "absent", "lacks config.json"), (other, "model_type 'llama'")):
        result = subprocess.run([sys.executable, "-m", "convgpt_vllm", command, str(bad)], env=serve_env(tmp_path),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.stderr
    good = subprocess.run([sys.executable, "-m", "convgpt_vllm", "check", str(folder)], env=serve_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and good.stdout.startswith(f"ok {folder} ") and "max_seq_len:64" in good.stdout


def test_plugin_is_pinned_to_one_vllm_release() -> None:
    import importlib.metadata

    from convgpt_vllm import VLLM_VERSION
    requirement = next(line.split("#")[0].strip() for line in (ROOT / "requirements-serve.txt").read_text().splitlines()
                       if line.startswith("vllm"))
    assert requirement.endswith(f"=={VLLM_VERSION}")
    assert importlib.metadata.version(requirement.split("==")[0]) == VLLM_VERSION
    import vllm
    assert vllm.__version__ == VLLM_VERSION
