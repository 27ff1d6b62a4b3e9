"""tools/pack_code.py: one self-extracting train_gpt.py that runs exactly like the three plain files."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, trainer_env

from tools import check_record, make_record, pack_code, runlog

TIMING = re.compile(r" ?\b(train_time|step_avg|tok_s|eval_time|warmup_time|time):\S+")


def packed_folder(tmp_path: Path) -> Path:
    out = tmp_path / "packed" / "train_gpt.py"
    assert pack_code.main([str(out)]) == 0
    return out.parent


def run_from(folder: Path, work: Path, smoke_data, **env: str) -> str:
    work.mkdir(parents=True)
    full = trainer_env(smoke_data, work, RUN_ID="run", PYTHONPATH="", ARTIFACT_PATH=str(work / "model.ptz"), **env)
    proc = subprocess.run([sys.executable, "-B", str(folder / "train_gpt.py")], env=full, cwd=work, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (work / "logs" / "run.txt").read_text()


def comparable(log: str) -> list[str]:
    """The log without timings, the code line, the size line's code bytes and the artifact path."""
    lines = []
    for line in log.splitlines():
        if line.startswith(("code ", "hp artifact_path:")):
            continue
        line = re.sub(r" bytes_code:\d+ bytes_total:\d+", "", line)
        lines.append(TIMING.sub("", line))
    return lines


def test_packed_file_is_smaller_and_carries_the_code_exactly(tmp_path, capsys):
    folder = packed_folder(tmp_path)
    text = (folder / "train_gpt.py").read_text()
    plain = sum((ROOT / name).stat().st_size for name in pack_code.CODE_FILES)
    assert text.startswith(pack_code.MARKER) and len(text.encode()) < plain / 2
    assert pack_code.unpack(text) == [(ROOT / name).read_text() for name in pack_code.CODE_FILES]
    assert pack_code.main(["--check", str(folder / "train_gpt.py")]) == 0
    assert make_record.counted_code(folder) == ("train_gpt.py",) and make_record.counted_code(ROOT) == pack_code.CODE_FILES
    capsys.readouterr()
    edited = tmp_path / "src"
    edited.mkdir()
    for name in pack_code.CODE_FILES:
        (edited / name).write_text((ROOT / name).read_text() + ("\n" if name == "quantize.py" else ""))
    assert pack_code.main(["--check", str(folder / "train_gpt.py"), "--src", str(edited)]) == 1
    assert pack_code.main([str(tmp_path / "run.py")]) == 2 and "must be named train_gpt.py" in capsys.readouterr().err
    loader_edit = tmp_path / "loader_edit" / "train_gpt.py"
    loader_edit.parent.mkdir()
    loader_edit.write_text(text.replace('exec(globals().pop("C"))', 'import os;exec(globals().pop("C"))'))
    assert pack_code.unpack(loader_edit.read_text()) == pack_code.unpack(text)  # same code, other loader
    assert pack_code.main(["--check", str(loader_edit)]) == 1
    (folder / "quantize.py").write_text("stray")
    with pytest.raises(make_record.RecordError, match="quantize.py beside the packed train_gpt.py"):
        make_record.counted_code(folder)


KERNELS_FROM_PACKED_SOURCE = """
import torch, convgpt_ops as o
t = o.conv_taps(40, 4, 3, "hilbert"); u, w = torch.randn(1, 40, 8), torch.randn(8, t.shape[1])
q, k, v = torch.randn(1, 2, 48, 16), torch.randn(1, 1, 48, 16), torch.randn(1, 1, 48, 16)
errors = [(o.gated_gather_conv(u, u, t, o.conv_taps_inverse(t), w)[1] - o.gated_gather_conv_ref(u, u, t, w)).abs().max(),
          (o.chunk_memory_triton(q, k, v, 16, 1) - o.chunk_memory_ref(q, k, v, 16, 1)).abs().max()]
print(max(float(e) for e in errors))
"""


def test_packed_file_imports_alone_counts_itself_and_runs_its_kernels(tmp_path):
    folder = packed_folder(tmp_path)
    code = ("import train_gpt, convgpt_ops, quantize; print(train_gpt.code_bytes(), train_gpt.code_sha256(), "
            "convgpt_ops.__file__, callable(train_gpt.main))\n"
            "leaked = {'base64', 'linecache', 'types', 'lzma', 'zstandard', 'C', 'D', 'S', 'n', 's', 'm', 'f'} & set(vars(train_gpt))\n"
            "assert not leaked, f'the loader leaks {sorted(leaked)} into train_gpt'" + KERNELS_FROM_PACKED_SOURCE)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-B", "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, digest, ops_file, has_main, kernel_error = proc.stdout.split()
    assert float(kernel_error) < 1e-4  # Triton read the kernels' sources from the packed file (linecache)
    packed = (folder / "train_gpt.py").read_bytes()
    assert int(size) == len(packed) and digest == hashlib.sha256(packed).hexdigest() == make_record.code_sha256(folder)
    assert ops_file == f"{folder / 'train_gpt.py'}!/convgpt_ops.py" and has_main == "True"


@pytest.mark.slow
def test_packed_run_logs_what_the_plain_run_logs_and_packages_as_a_record(smoke_data, tmp_path, capsys):
    folder = packed_folder(tmp_path)
    plain_log = run_from(ROOT, tmp_path / "plain", smoke_data)
    packed_log = run_from(folder, tmp_path / "run", smoke_data)
    assert comparable(packed_log) == comparable(plain_log) and len(comparable(plain_log)) > 70
    plain, packed = runlog.parse_log(plain_log), runlog.parse_log(packed_log)
    assert packed.code_files == ("train_gpt.py",) and plain.code_files == pack_code.CODE_FILES
    assert packed.sizes.code == (folder / "train_gpt.py").stat().st_size < plain.sizes.code
    assert packed.sizes.model == plain.sizes.model and packed.score.val_bpb == plain.score.val_bpb
    assert plain.code_sha256 == make_record.code_sha256(ROOT)
    log = tmp_path / "run" / "logs" / "run.txt"
    record = make_record.package([log], name="2026-12-02_Packed", track="non_record", author="a", github_id="b",
                                 blurb="c", code_dir=folder, records_dir=tmp_path / "records")
    assert sorted(p.name for p in record.iterdir()) == ["README.md", "submission.json", "train_gpt.py", f"train_seed{packed.seed}.log"]
    assert check_record.main([str(record)]) == 0
    out = capsys.readouterr().out
    assert "ok: files: README.md, submission.json, train_gpt.py (packed)" in out and "ok: self-contained" in out
    with pytest.raises(make_record.RecordError, match="is not the code of"):
        make_record.package([log], name="2026-12-02_Plain", track="non_record", author="a", github_id="b", blurb="c",
                            code_dir=ROOT, records_dir=tmp_path / "records")
