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

TIMING = re.compile(r" ?\b(train_time|step_avg|tok_s|eval_time|warmup_time|time|plain_scoring_predicted|pace|"
                    r"eager_pace|final_eval_time|stop_elapsed|stop_need):\S+")


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


PACKED_BUDGET = 30_000  # bytes: issue 26's target for the packed code (46,160 before minifying, in base85)


def test_packed_file_is_small_and_carries_the_minified_code_exactly(tmp_path, capsys):
    folder = packed_folder(tmp_path)
    data = (folder / "train_gpt.py").read_bytes()
    text = data.decode(pack_code.ENCODING)
    assert text.startswith(pack_code.MARKER) and b"\0" not in data and b"\r" not in data
    assert len(data) <= PACKED_BUDGET, f"packed code {len(data):,} bytes is over its {PACKED_BUDGET:,}-byte budget"
    texts = [(ROOT / name).read_text() for name in pack_code.CODE_FILES]
    assert pack_code.unpack(text) == [pack_code.minify(t) for t in texts]
    assert pack_code.main(["--check", str(folder / "train_gpt.py")]) == 0
    assert make_record.counted_code(folder) == ("train_gpt.py",) and make_record.counted_code(ROOT) == pack_code.CODE_FILES
    capsys.readouterr()
    edited = tmp_path / "src"
    edited.mkdir()
    for name, source in zip(pack_code.CODE_FILES, texts):
        (edited / name).write_text(source + ("EXTRA = 1\n" if name == "quantize.py" else "# a comment\n"))
    assert pack_code.main(["--check", str(folder / "train_gpt.py"), "--src", str(edited)]) == 1  # code added
    (edited / "quantize.py").write_text(texts[2] + "# only a comment\n")
    assert pack_code.main(["--check", str(folder / "train_gpt.py"), "--src", str(edited)]) == 0  # comments aside
    assert pack_code.main([str(tmp_path / "run.py")]) == 2 and "must be named train_gpt.py" in capsys.readouterr().err
    loader_edit = tmp_path / "loader_edit" / "train_gpt.py"
    loader_edit.parent.mkdir()
    loader_edit.write_bytes(data.replace(b'exec(globals().pop("C"))', b'import os;exec(globals().pop("C"))'))
    assert pack_code.unpack(pack_code.read(loader_edit)) == pack_code.unpack(text)  # same code, other loader
    assert pack_code.main(["--check", str(loader_edit)]) == 1
    (folder / "quantize.py").write_text("stray")
    with pytest.raises(make_record.RecordError, match="quantize.py beside the packed train_gpt.py"):
        make_record.counted_code(folder)


def test_latin1_literal_carries_every_byte_through_the_python_parser(tmp_path):
    tricky = bytes(range(256)) + b"\x0007\r\n\r\\\\'''\x85\x0c\x1c\n\\"
    for i, blob in enumerate((tricky, tricky + b"'", b"'", b"\\", b"")):
        source = tmp_path / f"lit{i}.py"
        source.write_bytes(f"# coding: latin-1\nB={pack_code.literal(blob)}.encode('latin-1')\n".encode("latin-1"))
        proc = subprocess.run([sys.executable, "-B", "-c", f"import runpy; print(runpy.run_path({str(source)!r})['B'].hex())"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and bytes.fromhex(proc.stdout.strip()) == blob, proc.stderr[-500:]


MINIFY_CASE = r'''"""Module docstring."""
from __future__ import annotations

X = """keep
    this indented line
        and this one"""  # a comment


class A:
    """Class docstring."""

    def f(self, y: int = 2) -> str:
        """Only a docstring."""

    def g(self):
        # comment
        return f"{X!r:>{4}} {'a'}" + \
            'b'
'''


def test_minify_drops_docstrings_and_comments_and_keeps_the_program():
    code = pack_code.minify(MINIFY_CASE)
    assert "docstring" not in code and "comment" not in code
    assert "\nclass A:\n\n def f(self, y: int=2) -> str:\n  pass\n\n def g(self):\n" in code  # one space a level
    namespace: dict = {}
    exec(compile(code, "minified", "exec"), namespace)
    assert namespace["X"] == "keep\n    this indented line\n        and this one"
    assert namespace["A"]().g() == f"{namespace['X']!r:>4} a" + "b" and namespace["A"]().f() is None
    assert pack_code.minify(code) == code


def test_reindent_leaves_the_lines_of_a_multiline_string_alone():
    code = 'if x:\n    y = """a\n    b\n\n        c"""\n\n    z = 1\n'
    assert pack_code.reindent(code) == 'if x:\n y = """a\n    b\n\n        c"""\n\n z = 1\n'


def test_compare_reports_every_codec_and_encoding(capsys):
    assert pack_code.main(["--compare"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [(r.split(" ")[0], r.split(") ")[1].split(":")[0]) for r in rows] == [
        ("plain", "lzma"), ("plain", "zstd"), ("minified", "lzma"), ("minified", "zstd")]
    assert all("base85" in r and "latin-1 literal" in r for r in rows)


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
