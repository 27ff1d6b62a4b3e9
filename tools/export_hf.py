"""Export a trained artifact and its run log as a folder that Hugging Face `transformers` loads (trust_remote_code).

Runbook
  python tools/export_hf.py --artifact final_model.int6.ptz --log logs/RUN.txt --out hf/convgpt-golf
  python tools/export_hf.py ... --tokenizer data/tokenizers/fineweb_1024_bpe.model --force   # replace a full --out

  Settings: the log's `hp` lines. Tokenizer: --tokenizer, else TOKENIZER_PATH, else the log's tokenizer_path.
  The folder holds config.json (model_type convgpt, auto_map, every Hyperparameters field; the local paths of
  LOCAL_PATHS at their defaults), generation_config.json,
  model.safetensors, modeling_convgpt.py, tokenizer.model (sentencepiece, copied) and README.md (the model card).
  Load it with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True); uploading it is your own step
  (huggingface-cli upload USER/REPO folder .).

Invariants
  * One definition of the math: modeling_convgpt.py is tools/hf_modeling_template.py with the definitions NEEDED
    copied verbatim (ast line ranges, decorators included) from convgpt_ops.py then train_gpt.py, in source order.
    A NEEDED name that the source no longer defines, or a global the copied code uses but nobody defines, stops the
    export with one error line; TRITON_ONLY names (kernels, QAT) become stubs that raise, never called because the
    model is built with every .triton and .qat flag off. The file imports only torch, numpy, transformers and the
    standard library (checked with transformers' own import scan), so it runs on CPU without Triton.
  * The weights are the int6 artifact's, dequantized (tools/sample.load_model); model.safetensors holds the HF
    model's state_dict. Before anything is published, the written folder is loaded back with the generated class
    (from_pretrained) and must give the trainer model's logits on a probe (max |diff| <= PROBE_ATOL).
  * The tied head has no tensor of its own (lm_head is None: the logits use tok_emb.weight) and the tap tables are
    non-persistent buffers, so no tensor is saved twice; the HF model recomputes the tables in _init_weights and
    initializes nothing else, so loading never overwrites a saved weight.
  * generate() decodes through ConvGPT.forward_logits's own cache (ConvGPTCache, in the template), one position per
    new token. tests/test_export_hf.py loads the folder where Triton and the trainer cannot be imported and checks
    the logits and the greedy tokens against tools/sample.py on the same artifact.
  * Bad input (a missing artifact, log or tokenizer, an artifact that does not match the log's settings or size, a
    full --out without --force): one "error: ..." line on stderr, exit code 2, and --out untouched. Everything is
    written to a temporary folder beside --out and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import hashlib
import importlib.util
import os
import shutil
import symtable
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from types import ModuleType

import torch
from transformers.utils.logging import disable_progress_bar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from tools import sample  # noqa: E402
from tools.runlog import HEADLINE, read_log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("hf_modeling_template.py")
MARKER = "# @@EXTRACTED@@"
MODELING_FILE = "modeling_convgpt.py"
# The top-level definitions the model needs, per source file, the sources in this order (the trainer imports the ops).
NEEDED = {
    "convgpt_ops.py": ("HILBERT_SIDE", "MAX_SEQ_LEN", "hilbert_d2xy", "CONV2D_LAYOUTS", "conv_taps",
                       "causal_gather_conv_ref", "conv_taps_inverse", "gated_gather_conv_ref", "memory_is_dense",
                       "chunk_picks", "chunk_routing", "chunk_memory_mask", "chunk_memory_ref"),
    "train_gpt.py": ("BOS_ID", "GLOBAL_MICROBATCHES", "TIED_EMBED_INIT_STD", "QK_GAIN_INIT", "SMEAR_INIT",
                     "LEAKY_SLOPE", "DOC_CHUNK", "BIGRAM_HASH", "BIGRAM_SCALE_INIT", "PRESETS", "CHOICES",
                     "FatalError", "Hyperparameters", "parse_value", "rms_norm", "CastedLinear", "apply_rotary",
                     "TapTable", "ConvMix", "ChunkMemory", "MLP", "Block", "BigramHash", "ConvGPT"),
}
TRITON_ONLY = ("gated_gather_conv", "chunk_memory_triton", "fake_quant_int6")  # called only with .triton / .qat on
ALLOWED_IMPORTS = {"torch", "numpy", "transformers", *sys.stdlib_module_names}
AUTO_MAP = {"AutoConfig": "modeling_convgpt.ConvGPTConfig",
            "AutoModelForCausalLM": "modeling_convgpt.ConvGPTForCausalLM"}
PROBE_ATOL = 1e-5
LOCAL_PATHS = ("data_path", "tokenizer_path", "artifact_path")  # this machine's paths: the defaults go public instead
FatalError = train_gpt.FatalError


# ----------------------------------------------------------------------------- the modeling file

def top_level_definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    """Each name a module's top-level def, class or assignment binds -> that statement."""
    found: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update({n.id: node for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)})
    return found


def extract(filename: str, names: tuple[str, ...]) -> str:
    """The source of names' definitions in filename (decorators included), in source order."""
    lines = (ROOT / filename).read_text().splitlines()
    defs = top_level_definitions(ast.parse("\n".join(lines), filename))
    missing = [name for name in names if name not in defs]
    if missing:
        raise FatalError(f"{filename} defines no top-level {', '.join(missing)}, which the exported model needs "
                         f"(renamed? update NEEDED in tools/export_hf.py)")
    nodes = sorted({id(defs[name]): defs[name] for name in names}.values(), key=lambda node: node.lineno)
    starts = [min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) for node in nodes]
    return "\n\n\n".join("\n".join(lines[start - 1:node.end_lineno]) for start, node in zip(starts, nodes))


def undefined_globals(code: str) -> set[str]:
    """Global names the code reads that nothing in it defines and builtins lack (annotations are not evaluated)."""
    top = symtable.symtable(code, MODELING_FILE, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        used |= {s.get_name() for s in table.get_symbols() if s.is_referenced() and (table is top or s.is_global())}
        tables += table.get_children()
    return used - defined - set(dir(builtins))


def modeling_source() -> str:
    """tools/hf_modeling_template.py with the NEEDED definitions and the TRITON_ONLY stubs in place of its marker."""
    digests = ", ".join(f"{name} sha256:{hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:16]}"
                        for name in NEEDED)
    parts = [f"# ---- copied verbatim by tools/export_hf.py from {digests}",
             *(extract(name, names) for name, names in NEEDED.items()),
             "\n".join(f"{name} = triton_only({name!r})" for name in TRITON_ONLY),
             "# ---- end of the copied definitions"]
    template = TEMPLATE.read_text()
    if template.count(MARKER) != 1:
        raise FatalError(f"{TEMPLATE} must hold the line {MARKER!r} exactly once")
    code = template.replace(MARKER, "\n\n\n".join(parts))
    unknown = undefined_globals(code)
    if unknown:
        raise FatalError(f"the exported model code uses {', '.join(sorted(unknown))} but does not define it: "
                         f"add the definition to NEEDED (or TRITON_ONLY) in tools/export_hf.py")
    return code


def check_imports(path: Path) -> None:
    from transformers.dynamic_module_utils import get_imports
    extra = set(get_imports(path)) - ALLOWED_IMPORTS
    if extra:
        raise FatalError(f"{path.name} would import {', '.join(sorted(extra))}: only torch, numpy, transformers and "
                         f"the standard library may be imported there")


def import_modeling(path: Path) -> ModuleType:
    """The generated file as a module of its own (registered only while it runs: dataclasses look it up)."""
    name = f"convgpt_export_{os.getpid()}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever stops the generated file from importing stops the export
        raise FatalError(f"the generated {path.name} does not import ({type(e).__name__}: {e})") from None
    finally:
        del sys.modules[name]
    return module


# ----------------------------------------------------------------------------- inputs

class Inputs:
    """What the export reads: the run's settings and log, the artifact's model (CPU fp32) and size, the tokenizer."""

    def __init__(self, args: argparse.Namespace):
        self.hp = sample.settings(args.log, {})
        try:
            self.run = read_log(args.log, require_finished=False)
            self.score = self.run.score
        except ValueError as e:
            raise FatalError(str(e)) from None
        self.tokenizer = Path(args.tokenizer or os.environ.get("TOKENIZER_PATH") or self.hp.tokenizer_path)
        sp = sample.load_tokenizer(str(self.tokenizer))
        if sp.vocab_size() != self.hp.vocab_size:
            raise FatalError(f"tokenizer {self.tokenizer} has {sp.vocab_size()} pieces, the model "
                             f"VOCAB_SIZE={self.hp.vocab_size}")
        self.artifact = Path(args.artifact)
        self.model, self.artifact_bytes = sample.load_model(args.artifact, self.hp)
        logged = self.run.artifact.model if self.run.artifact else None
        if logged not in (None, self.artifact_bytes):
            raise FatalError(f"artifact {args.artifact} is {self.artifact_bytes} bytes but the run of {args.log} wrote "
                             f"{logged} (bytes_model): it is not this run's artifact")


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FatalError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FatalError(f"--out {out} exists and is not empty (--force replaces it)")


# ----------------------------------------------------------------------------- the folder

def public_settings(hp: train_gpt.Hyperparameters) -> train_gpt.Hyperparameters:
    """The settings with this machine's paths (LOCAL_PATHS) set back to their defaults, for config.json and the card."""
    return replace(hp, **{name: train_gpt.Hyperparameters.__dataclass_fields__[name].default for name in LOCAL_PATHS})


def hf_model(module: ModuleType, inputs: Inputs) -> torch.nn.Module:
    """ConvGPTForCausalLM of the generated module, with the artifact's dequantized weights."""
    config = module.ConvGPTConfig(**asdict(public_settings(inputs.hp)))
    config.auto_map = dict(AUTO_MAP)
    model = module.ConvGPTForCausalLM(config).eval()
    model.model.load_state_dict(inputs.model.state_dict())
    return model


@torch.no_grad()
def check_logits(model: torch.nn.Module, inputs: Inputs) -> None:
    """The exported model's logits are the trainer model's on a seeded probe: 2 sequences of the longest length."""
    hp = inputs.hp
    ids = torch.randint(hp.vocab_size, (2, hp.max_seq_len), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = train_gpt.BOS_ID
    diff = (model(ids, use_cache=False).logits - inputs.model.forward_logits(ids)).abs().max().item()
    if not diff <= PROBE_ATOL:
        raise FatalError(f"the exported model's logits differ from the artifact's by {diff:.3g} (> {PROBE_ATOL}); "
                         f"nothing written")


def settings_table(inputs: Inputs) -> str:
    hp = public_settings(inputs.hp)
    rows = [f"| {f.name.upper()} | `{getattr(hp, f.name)}` |" for f in fields(hp)]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def scores_table(inputs: Inputs) -> str:
    run = inputs.run
    finals = [("final_int6_zstd_roundtrip_exact", run.roundtrip), (HEADLINE, run.sliding), ("final_ttt_exact", run.ttt)]
    rows = [f"| {name}{' (headline)' if score is inputs.score else ''} | {score.val_bpb:.8f} | {score.val_loss:.8f} |"
            for name, score in finals if score is not None]
    sizes = run.artifact
    size_rows = [f"| artifact bytes (int6 + zstd) | {inputs.artifact_bytes} | |"]
    if sizes is not None:
        size_rows += [f"| counted code bytes | {sizes.code} | |",
                      f"| total bytes (limit {sizes.limit}) | {sizes.total} | |"]
    return "\n".join(["| | val_bpb | val_loss (nats/token) |", "|---|---|---|", *rows, *size_rows])


def mixers(hp: train_gpt.Hyperparameters) -> str:
    memory = [i + 1 for i in range(hp.num_layers) if hp.mem_every and (i + 1) % hp.mem_every == 0]
    if not memory:
        return "ConvMix in every block"
    rest = "ConvMix in the others" if len(memory) < hp.num_layers else "no ConvMix"
    return f"ChunkMemory in block{'s' * (len(memory) > 1)} {', '.join(map(str, memory))} of {hp.num_layers}, {rest}"


def model_card(inputs: Inputs, out: Path) -> str:
    hp, score = inputs.hp, inputs.score
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [convgpt, parameter-golf, custom_code]
---

# ConvGPT-v2 `{inputs.run.run_id}`: val_bpb {score.val_bpb:.4f}

A ConvGPT-v2 language model from a Parameter Golf run (train_gpt.py). Its token mixers are a causal 1D and a
Hilbert-curve 2D convolution (ConvMix) and a sparse chunk-token memory (ChunkMemory): {mixers(hp)}. Width
{hp.model_dim}, vocabulary {hp.vocab_size} (sentencepiece), sequences of up to {hp.max_seq_len} tokens.

{scores_table(inputs)}

The weights are the int6 artifact's (`{inputs.artifact.name}`, {inputs.artifact_bytes} bytes), dequantized to fp32:
this is the model that was scored, and its logits equal the trainer's on that artifact. Scores from the run's log
`{Path(inputs.run.source).name}`; val_bpb is bits per byte of the run's validation set (FineWeb's, in a challenge
run), headline: {HEADLINE}, or final_ttt_exact when the run used test-time training.

## Use

```python
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM

folder = "{out}"  # or huggingface_hub.snapshot_download("USER/REPO") once uploaded
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
sp = spm.SentencePieceProcessor(model_file=f"{{folder}}/tokenizer.model")
ids = torch.tensor([[1] + sp.encode("The history of")])  # [BOS=1] + pieces: every document starts with BOS
out = model.generate(ids, max_new_tokens=100, do_sample=False)  # stops where the model starts a new document (BOS)
print(sp.decode(out[0].tolist()))
```

The code (`modeling_convgpt.py`) is the trainer's own model code on its PyTorch reference path (no Triton), run in
fp32; it needs torch, numpy and transformers. Prompts in one batch must have one length (there is no padding; pass
`attention_mask=torch.ones_like(ids)` to silence transformers' warning about batches without a mask).
`generate` uses the model's own decoding cache, so each new token costs one position; greedy and sampling work,
beam search does not.

## Upload

The export writes this folder only; uploading it is your own step:

```bash
huggingface-cli login
huggingface-cli upload USER/REPO {out} .
```

## Settings

{settings_table(inputs)}
"""


def write_folder(folder: Path, code: str, inputs: Inputs, out: Path) -> None:
    (folder / MODELING_FILE).write_text(code)
    check_imports(folder / MODELING_FILE)
    module = import_modeling(folder / MODELING_FILE)
    hf_model(module, inputs).save_pretrained(folder)
    try:
        reloaded = module.ConvGPTForCausalLM.from_pretrained(folder)  # the files, loaded as a user loads them
        check_logits(reloaded, inputs)
    except (FatalError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - an exported model that fails to load or run stops the export
        detail = " ".join(str(e).split())[:300]
        raise FatalError(f"the exported model fails to load or run ({type(e).__name__}: {detail})") from None
    shutil.copyfile(inputs.tokenizer, folder / "tokenizer.model")
    (folder / "README.md").write_text(model_card(inputs, out))


def publish(folder: Path, out: Path) -> None:
    """folder becomes out; an existing out (empty, or full with --force) is moved aside first and deleted last."""
    old = out.with_name(f".{out.name}.old{os.getpid()}") if out.exists() else None
    if old is not None:
        out.rename(old)
    folder.rename(out)
    if old is not None:
        shutil.rmtree(old)


def export(args: argparse.Namespace) -> Inputs:
    out = Path(args.out)
    check_out(out, args.force)
    code = modeling_source()
    inputs = Inputs(args)
    folder = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        folder.mkdir(parents=True)
        write_folder(folder, code, inputs, out)
        publish(folder, out)
    except OSError as e:
        raise FatalError(f"cannot write {out}: {e}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return inputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="the int6 + zstd artifact (ARTIFACT_PATH of the run)")
    p.add_argument("--log", required=True, help="the run's log (logs/<RUN_ID>.txt): its hp lines are the settings")
    p.add_argument("--out", required=True, help="the folder to write (must be absent or empty, unless --force)")
    p.add_argument("--tokenizer", help="sentencepiece model (default: TOKENIZER_PATH, then the log's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    disable_progress_bar()
    try:
        inputs = export(args)
    except FatalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"export_hf out:{args.out} val_bpb:{inputs.score.val_bpb:.8f} artifact_bytes:{inputs.artifact_bytes} "
          f"params:{sum(p.numel() for p in inputs.model.parameters())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
