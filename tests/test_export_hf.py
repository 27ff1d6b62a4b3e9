"""tools/export_hf.py: the exported folder loads with transformers (trust_remote_code) where Triton and the trainer
cannot be imported, gives the trainer's logits and greedy tokens on the same artifact through its own decoding cache,
and every bad input is one error line with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.dynamic_module_utils import get_imports

from conftest import ROOT
from tools import export_hf, sample
from tools.runlog import read_log

FILES = {"config.json", "generation_config.json", "model.safetensors", "modeling_convgpt.py", "tokenizer.model",
         "README.md"}
PROMPT, NEW = 20, 40  # 60 of the tiny model's 64 positions: decoding crosses the chunk boundaries at 32 and 48
ATOL = 1e-5

LOAD_SCRIPT = '''
import importlib.util
import sys

sys.modules["triton"] = None  # `import triton` fails from here on, as on a machine without Triton
import torch
from transformers import AutoModelForCausalLM

folder, probe_path, result_path = sys.argv[1:]
probe = torch.load(probe_path)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
results = {"importable": [name for name in ("triton", "train_gpt", "convgpt_ops") if importlib.util.find_spec(name)],
           "flags_on": [name for name, m in model.named_modules()
                        if getattr(m, "triton", False) or getattr(m, "qat", False)]}
with torch.no_grad():
    out = model(probe["ids"], labels=probe["ids"], use_cache=False)
results.update(logits=out.logits, loss=out.loss)
lengths = []
model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                with_kwargs=True)
for use_cache in (True, False):
    lengths.clear()
    gen = model.generate(probe["prompt"], max_new_tokens=probe["new"], do_sample=False, use_cache=use_cache,
                         output_logits=True, return_dict_in_generate=True)
    results[use_cache] = {"tokens": gen.sequences, "logits": torch.stack(gen.logits, 1), "lengths": list(lengths)}
torch.save(results, result_path)
'''


def export_argv(run: dict[str, Path], out: Path, **overrides: str) -> list[str]:
    args = {"--artifact": str(run["artifact"]), "--log": str(run["log"]), "--tokenizer": str(run["tokenizer"]),
            "--out": str(out), **overrides}
    return [word for pair in args.items() for word in pair]


@pytest.fixture(scope="module")
def trainer_model(tiny_run: dict[str, Path]):
    return sample.load_model(str(tiny_run["artifact"]), sample.settings(str(tiny_run["log"]), {}))[0]


@pytest.fixture(scope="module")
def exported(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export with --force over a folder that held a stale file."""
    out = tmp_path_factory.mktemp("hf") / "convgpt-golf"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    assert export_hf.main(export_argv(tiny_run, out) + ["--force"]) == 0
    return out


def test_folder_holds_the_files_and_nothing_else(exported: Path) -> None:
    assert {p.name for p in exported.iterdir()} == FILES  # --force replaced the stale folder
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temporary folder left beside it


def test_config_holds_every_setting_typed(exported: Path, tiny_run: dict[str, Path]) -> None:
    config = json.loads((exported / "config.json").read_text())
    hp = asdict(sample.settings(str(tiny_run["log"]), {}))
    assert config["model_type"] == "convgpt" and config["architectures"] == ["ConvGPTForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_convgpt.ConvGPTConfig",
                                  "AutoModelForCausalLM": "modeling_convgpt.ConvGPTForCausalLM"}
    local = {name: hp.pop(name) for name in export_hf.LOCAL_PATHS}
    assert {name: (config[name], type(config[name])) for name in hp} == {k: (v, type(v)) for k, v in hp.items()}
    assert {name: config[name] for name in local} == {name: getattr(sample.train_gpt.Hyperparameters, name) for name in local}
    assert not any(str(path) in (exported / "config.json").read_text() + (exported / "README.md").read_text()
                   for path in local.values())  # this machine's paths stay private
    assert config["vocab_size"] == 1024 and config["bos_token_id"] == 1
    assert config["max_position_embeddings"] == 64  # the longest sequence, which vLLM reads as its max_model_len
    generation = json.loads((exported / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 1, 1)


def test_weights_are_the_artifacts_dequantized(exported: Path, tiny_run: dict[str, Path], trainer_model) -> None:
    saved = load_file(exported / "model.safetensors")
    state = trainer_model.state_dict()
    assert set(saved) == {f"model.{name}" for name in state}
    assert not any("lm_head" in name or "tap_table" in name for name in saved)  # tied head, non-persistent tables
    assert all(torch.equal(saved[f"model.{name}"], tensor) for name, tensor in state.items())
    assert (exported / "tokenizer.model").read_bytes() == tiny_run["tokenizer"].read_bytes()


def test_model_card(exported: Path, tiny_run: dict[str, Path]) -> None:
    card = (exported / "README.md").read_text()
    run = read_log(tiny_run["log"])
    assert run.score is run.ttt and f"final_ttt_exact (headline) | {run.score.val_bpb:.8f}" in card
    assert f"final_sliding_window_exact | {run.sliding.val_bpb:.8f}" in card
    assert f"| {tiny_run['artifact'].stat().st_size} |" in card and f"| {run.sizes.total} |" in card
    assert "dequantized" in card and "huggingface-cli upload" in card and "[1] + sp.encode(" in card
    assert "| NUM_LAYERS | `2` |" in card and "| MEM_CHUNK | `16` |" in card


def test_modeling_file_is_the_trainers_code_without_triton(exported: Path) -> None:
    code = (exported / "modeling_convgpt.py").read_text()
    assert "import triton" not in code and "from triton" not in code
    allowed = {"torch", "numpy", "transformers", *sys.stdlib_module_names}
    assert set(get_imports(exported / "modeling_convgpt.py")) <= allowed
    for filename, names in export_hf.NEEDED.items():  # verbatim copies, one definition of the math
        assert export_hf.extract(filename, names) in code
    module = export_hf.import_modeling(exported / "modeling_convgpt.py")
    with pytest.raises(RuntimeError, match="Triton/QAT path"):
        module.gated_gather_conv()


def test_loads_and_generates_without_triton(exported: Path, tiny_run: dict[str, Path], trainer_model,
                                            tmp_path: Path) -> None:
    """A fresh interpreter outside the repository, where triton, train_gpt and convgpt_ops cannot be imported."""
    ids = torch.randint(1024, (2, 64), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    torch.save({"ids": ids, "prompt": ids[:, :PROMPT], "new": NEW}, tmp_path / "probe.pt")
    (tmp_path / "load_hf.py").write_text(LOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "load_hf.py", str(exported), "probe.pt", "result.pt"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt")
    assert got["importable"] == [] and got["flags_on"] == []
    with torch.no_grad():
        assert (got["logits"] - trainer_model.forward_logits(ids)).abs().max() <= ATOL
        assert abs(got["loss"] - trainer_model(ids[:, :-1], ids[:, 1:])) <= ATOL
        expected = sample.generate(trainer_model, ids[:, :PROMPT], NEW, 0.0)
        cached = got[True]
        assert torch.equal(cached["tokens"][:, :PROMPT], ids[:, :PROMPT])
        assert torch.equal(cached["tokens"][:, PROMPT:], expected)
        # each step's logits are the full forward's at that position: the cache holds the right context
        full = trainer_model.forward_logits(cached["tokens"][:, :-1])[:, PROMPT - 1:]
        assert (cached["logits"] - full).abs().max() <= ATOL
    n = expected.shape[1]
    assert n > 32 - PROMPT  # the decoded tokens reach the second memory chunk: routing runs on the cache
    assert cached["lengths"] == [PROMPT] + [1] * (n - 1)  # the prompt once, then one position per token
    assert torch.equal(got[False]["tokens"], cached["tokens"])
    assert got[False]["lengths"] == list(range(PROMPT, PROMPT + n))  # without the cache: the whole sequence each step


def edited_log(tiny_run: dict[str, Path], tmp_path: Path, old: str, new: str) -> Path:
    text = tiny_run["log"].read_text()
    assert old in text
    path = tmp_path / "edited.txt"
    path.write_text(text.replace(old, new))
    return path


BAD_INPUTS = {  # case -> (how the arguments change, a phrase of the error)
    "missing artifact": (lambda run, tmp: {"--artifact": str(tmp / "nope.ptz")}, "does not exist"),
    "settings mismatch": (lambda run, tmp: {"--log": str(edited_log(run, tmp, "hp num_layers:2", "hp num_layers:3"))},
                          "does not match the model settings"),
    "another run's artifact": (lambda run, tmp: {"--log": str(edited_log(run, tmp, "bytes_model:", "bytes_model:1"))},
                               "not this run's artifact"),
    "missing tokenizer": (lambda run, tmp: {"--tokenizer": str(tmp / "nope.model")}, "does not exist"),
    "missing log": (lambda run, tmp: {"--log": str(tmp / "nope.txt")}, "cannot be read"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_nothing_written(case: str, tiny_run: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    change, phrase = BAD_INPUTS[case]
    overrides = change(tiny_run, tmp_path)
    before = sorted(tmp_path.iterdir())
    assert export_hf.main(export_argv(tiny_run, tmp_path / "hf" / "model", **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert sorted(tmp_path.iterdir()) == before


def test_full_out_is_refused_from_the_command_line(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), *export_argv(tiny_run, out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: --out {out} exists and is not empty (--force replaces it)"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_late_failure_leaves_nothing(tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_hf, "PROBE_ATOL", -1.0)  # the logit check, after every file but the card, fails
    assert export_hf.main(export_argv(tiny_run, tmp_path / "model")) == 2
    assert "logits differ" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_renamed_definition_stops_the_export(tiny_run: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    needed = dict(export_hf.NEEDED, **{"train_gpt.py": (*export_hf.NEEDED["train_gpt.py"], "ConvGPTv3")})
    monkeypatch.setattr(export_hf, "NEEDED", needed)
    assert export_hf.main(export_argv(tiny_run, tmp_path / "model")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train_gpt.py defines no top-level ConvGPTv3, which the exported model needs (renamed? "
                   "update NEEDED in tools/export_hf.py)"]
    assert list(tmp_path.iterdir()) == []


def test_an_undefined_dependency_stops_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = tuple(name for name in export_hf.NEEDED["train_gpt.py"] if name != "apply_rotary")
    needed = dict(export_hf.NEEDED, **{"train_gpt.py": kept})
    monkeypatch.setattr(export_hf, "NEEDED", needed)
    with pytest.raises(export_hf.FatalError, match="uses apply_rotary but does not define it"):
        export_hf.modeling_source()


def test_padding_and_foreign_caches_are_refused(exported: Path) -> None:
    """No padding (a 0 in attention_mask) and no transformers cache: either would decode the wrong positions."""
    module = export_hf.import_modeling(exported / "modeling_convgpt.py")
    model = module.ConvGPTForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert model(ids, attention_mask=torch.ones_like(ids)).logits.shape == (1, 4, 1024)
        with pytest.raises(ValueError, match="no padding"):
            model(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))
        with pytest.raises(TypeError, match="ConvGPTCache"):
            model(ids, cache={})
