"""Hyperparameters from the environment: parsing, validation, typo warnings, no side effects at import."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

import train_gpt as tg
from conftest import ROOT


def test_defaults_and_overrides():
    args = tg.Hyperparameters.from_env({})
    assert (args.num_layers, args.model_dim, args.mlp_mult, args.vocab_size, args.train_seq_len) == (12, 512, 4.0, 1024, 1024)
    assert args.eval_len == 1024 and args.head_dim == 64
    args = tg.Hyperparameters.from_env({"NUM_LAYERS": "11", "MEM_TOPK": "8", "QAT": "false", "MATRIX_LR": "0.02",
                                        "EVAL_SEQ_LEN": "2048", "RUN_ID": "x"})
    assert (args.num_layers, args.mem_topk, args.qat, args.matrix_lr, args.eval_len, args.run_id) == (11, 8, False, 0.02, 2048, "x")


@pytest.mark.parametrize("env,needle", [
    ({"NUM_LAYERS": "two"}, "NUM_LAYERS='two' is not a valid int"),
    ({"QAT": "maybe"}, "QAT='maybe' is not a valid 0/1"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR='nan'"),
    ({"TRAIN_SEQ_LEN": "70000"}, "Hilbert grid"),
    ({"EVAL_SEQ_LEN": "65537"}, "Hilbert grid"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000"),
    ({"MODEL_DIM": "100", "NUM_HEADS": "3"}, "MODEL_DIM=100"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3"),
    ({"CONV2D_K": "4"}, "CONV2D_K=4"),
    ({"CONV1D_K": "0", "CONV2D_K": "0"}, "no taps"),
    ({"EVAL_STRIDE": "0"}, "EVAL_STRIDE=0"),
    ({"MLP_ACT": "gelu"}, "MLP_ACT='gelu' must be one of"),
    ({"MEM_ROPE": "some"}, "MEM_ROPE"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE=70000"),
    ({"QAT_START_FRAC": "1.5"}, "QAT_START_FRAC=1.5"),
    ({"CONV2D_LAYOUT": "spiral"}, "CONV2D_LAYOUT='spiral' must be one of hilbert, dilated"),
    ({"BIGRAM_BUCKETS": "1"}, "BIGRAM_BUCKETS=1 must be 0 or >= 2"),
    ({"TTT_EPOCHS": "-1"}, "TTT_EPOCHS=-1"),
    ({"GPTQ": "1", "MAX_WALLCLOCK_SECONDS": "10", "GPTQ_RESERVE_SECONDS": "10"}, "GPTQ_RESERVE_SECONDS=10.0 leaves no"),
    ({"GPTQ_DAMP": "0"}, "GPTQ_DAMP > 0"),
    ({"MAX_EVAL_SECONDS": "-1"}, "TTT_EPOCHS=1 and MAX_EVAL_SECONDS=-1.0 must be >= 0"),
    ({"TTT_DOC_CHUNK": "2000"}, "TTT_DOC_CHUNK=2000 in 0..1024"),
    ({"TTT_DOC_CHUNK": "-1"}, "TTT_DOC_CHUNK=-1 in 0..1024"),
    ({"GPTQ_CALIB_BATCHES": "0"}, "GPTQ_CALIB_BATCHES=0"),
    ({"MATRIX_CLIP_K": "0"}, "MATRIX_CLIP_K=0.0, BIGRAM_CLIP_K=12.85 and EMBED_CLIP_K=6.0 must be finite and > 0"),
    ({"BIGRAM_CLIP_K": "-3"}, "BIGRAM_CLIP_K=-3.0"),
    ({"EMBED_CLIP_K": "inf"}, "EMBED_CLIP_K"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(tg.FatalError, match=needle.replace("(", r"\(")):
        tg.Hyperparameters.from_env(env)


def test_typo_warnings_suggest_the_setting():
    env = {"NUM_LAYER": "3", "MEM_TPOK": "2", "num_heads": "4", "EVAL_STRIDES": "32", "HOME": "/root", "PATH": "/bin",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1", "MASTER_PORT": "1", "NUM_LAYERS": "3"}
    warnings = tg.typo_warnings(env)
    assert warnings == [
        "warning: env EVAL_STRIDES is not a setting; did you mean EVAL_STRIDE?",
        "warning: env MEM_TPOK is not a setting; did you mean MEM_TOPK?",
        "warning: env NUM_LAYER is not a setting; did you mean NUM_LAYERS?",
        "warning: env num_heads is not a setting; did you mean NUM_HEADS?",
    ]


def test_one_edit_apart():
    assert tg.one_edit_apart("SEED", "SEEDS") and tg.one_edit_apart("SEDE", "SEED") and tg.one_edit_apart("SEAD", "SEED")
    assert not tg.one_edit_apart("SEED", "SPEED_") and not tg.one_edit_apart("ESDE", "SEED") and not tg.one_edit_apart("AB", "BA_")


def test_every_field_has_an_env_name_and_a_parsable_default():
    for f in fields(tg.Hyperparameters):
        assert type(f.default) in (str, int, float, bool)
        assert tg.parse_value(f.name.upper(), str(f.default), type(f.default)) == f.default


def test_import_has_no_side_effects(tmp_path):
    code = ("import os, torch.distributed as dist, train_gpt; "
            "print(dist.is_initialized(), os.listdir('.'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "NUM_LAYERS": "oops"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []"


def test_gptq_reserve_shortens_the_training_cap_and_its_warmdown():
    plain = tg.Hyperparameters.from_env({"WARMDOWN_ITERS": "100", "ITERATIONS": "100000"})
    gptq = tg.Hyperparameters.from_env({"WARMDOWN_ITERS": "100", "ITERATIONS": "100000", "GPTQ": "1"})
    assert plain.train_seconds == 600 and gptq.train_seconds == 600 - gptq.gptq_reserve_seconds
    uncapped = tg.Hyperparameters.from_env({"GPTQ": "1", "MAX_WALLCLOCK_SECONDS": "0"})
    assert uncapped.train_seconds == 0
    shorter = tg.Hyperparameters.from_env({"WARMDOWN_ITERS": "100", "ITERATIONS": "100000",
                                           "MAX_WALLCLOCK_SECONDS": str(600 - gptq.gptq_reserve_seconds)})
    for elapsed_ms in (540_000, 560_000, 570_000, 584_000):
        assert tg.lr_multiplier(gptq, 1000, elapsed_ms) == tg.lr_multiplier(shorter, 1000, elapsed_ms) < 1
    assert tg.lr_multiplier(gptq, 1000, 585_000) == 0.0 < tg.lr_multiplier(plain, 1000, 585_000)


def test_schedule_warning_names_warmdown_iters_when_the_run_is_shorter_than_its_warmdown():
    default = tg.Hyperparameters.from_env({})
    assert tg.schedule_warning(default, 5, 5 * 45.0) is None  # 8xH100 pace: ITERATIONS binds, far above 1200
    slow = tg.schedule_warning(default, 5, 5 * 1000.0)  # 1 s a step: 600 of the 1200 warmdown steps fit
    assert slow == ("warning: about 600 steps fit in this run, fewer than WARMDOWN_ITERS=1200: the learning rate "
                    "never reaches its peak (it starts at 50% of it); set WARMDOWN_ITERS below 600")
    assert f"{tg.lr_multiplier(default, 5, 5 * 1000.0):.0%}" == "50%"
    short = tg.Hyperparameters.from_env({"ITERATIONS": "100", "MAX_WALLCLOCK_SECONDS": "0"})
    assert "about 100 steps" in tg.schedule_warning(short, 5, 1e9) and f"{tg.lr_multiplier(short, 0, 0):.0%}" == "8%"
    assert tg.schedule_warning(tg.Hyperparameters.from_env({"ITERATIONS": "1200", "MAX_WALLCLOCK_SECONDS": "0"}), 5, 1.0) is None
    assert tg.schedule_warning(tg.Hyperparameters.from_env({"ITERATIONS": "100", "WARMDOWN_ITERS": "0"}), 5, 1e9) is None


def test_preset_sets_defaults_that_explicit_settings_override():
    assert tg.Hyperparameters.from_env({"PRESET": "sp8192"}).num_layers == 10
    sp = tg.Hyperparameters.from_env({"PRESET": "sp8192", "NUM_LAYERS": "3"})
    assert (sp.preset, sp.vocab_size, sp.embed_quant, sp.mlp_mult) == ("sp8192", 8192, "int8", 4.0)
    assert sp.num_layers == 3 and sp.tokenizer_path.endswith("fineweb_8192_bpe.model") and sp.data_path.endswith("_sp8192")
    assert tg.Hyperparameters.from_env({}).vocab_size == 1024
    with pytest.raises(tg.FatalError, match="PRESET='sp4096' must be one of none, sp8192"):
        tg.Hyperparameters.from_env({"PRESET": "sp4096"})


def test_ttt_doc_chunk_defaults_to_128_or_the_evaluation_window():
    assert tg.Hyperparameters().doc_chunk == 128 and tg.Hyperparameters(train_seq_len=64).doc_chunk == 64
    assert tg.Hyperparameters(train_seq_len=64, ttt_doc_chunk=32).doc_chunk == 32
