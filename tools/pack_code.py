"""Pack the three counted code files into one self-extracting train_gpt.py: the same run, fewer counted bytes.

Runbook
  python tools/pack_code.py OUT/train_gpt.py              # OUT/ then needs no other code file
  cd OUT && torchrun --standalone --nproc_per_node=8 train_gpt.py        # run the seeds from that folder
  python tools/make_record.py --code-dir OUT ... OUT/logs/seed*.txt      # package the packed file with its logs
  python tools/pack_code.py --check OUT/train_gpt.py      # is it exactly this tool's file for the repo's current code?

The challenge counts the bytes of the code a submission runs. The packed file holds train_gpt.py, convgpt_ops.py
and quantize.py joined by NUL bytes, compressed with lzma (raw LZMA2, preset 9e) or zstd level 22, whichever is
smaller, as one base85 string. Its loader, a few hundred bytes of plain Python, decodes them at start. It registers
convgpt_ops and quantize as modules, and their sources in linecache, because Triton reads a kernel's source through
inspect. Then it deletes its own names and runs train_gpt.py's source in its own namespace, with `__packed__` set. So `python train_gpt.py`
runs main() and `import train_gpt` imports the model, exactly as with the plain files. The trainer then logs the
packed file's size as bytes_code, and its sha256 in the `code` line.
Invariant: apart from the code line and the size line, a run's log is identical from the packed file and from
the plain files (tests/test_pack_code.py).
"""

from __future__ import annotations

import argparse
import base64
import lzma
import re
import sys
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ("train_gpt.py", "convgpt_ops.py", "quantize.py")  # train_gpt.COUNTED_CODE, in this order
MARKER = "# ConvGPT-v2 packed code v1"  # first line of every packed file: tools/make_record.py looks for it
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
ZSTD_LEVEL = 22
LOADER = '''{marker} (tools/pack_code.py): {files}, {codec} + base85
import base64,linecache,sys,types
{decode}
S=D(base64.b85decode({blob!r})).decode().split("\\0")
for n,s in zip({modules!r},S[1:]):
 m=types.ModuleType(n);f=m.__file__=__file__+"!/"+n+".py";linecache.cache[f]=(len(s),None,s.splitlines(True),f)
 sys.modules[n]=m;exec(compile(s,f,"exec"),m.__dict__)
f=__file__+"!/train_gpt.py";linecache.cache[f]=(len(S[0]),None,S[0].splitlines(True),f)
C=compile(S[0],f,"exec");__packed__=True;del base64,linecache,sys,types,D,S,n,s,m,f
exec(globals().pop("C"))
'''
DECODERS = {
    "lzma": "D=lambda b,z=__import__('lzma'):z.decompress(b,z.FORMAT_RAW,filters=[{'id':z.FILTER_LZMA2}])",
    "zstd": "D=lambda b,z=__import__('zstandard'):z.ZstdDecompressor().decompress(b)",
}


def sources(src: Path) -> list[str]:
    texts = [(src / name).read_text(encoding="utf-8") for name in CODE_FILES]
    if any("\0" in text for text in texts):
        raise ValueError("a code file contains a NUL byte, the packed format's separator")
    return texts


def pack(texts: list[str]) -> str:
    """The packed file's text for the sources of CODE_FILES, in order."""
    raw = "\0".join(texts).encode()
    blobs = {"lzma": lzma.compress(raw, lzma.FORMAT_RAW, filters=LZMA_FILTERS),
             "zstd": zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)}
    codec = min(blobs, key=lambda name: len(blobs[name]))
    return LOADER.format(marker=MARKER, files=", ".join(CODE_FILES), codec=codec, decode=DECODERS[codec],
                         blob=base64.b85encode(blobs[codec]).decode(), modules=tuple(n[:-3] for n in CODE_FILES[1:]))


def unpack(text: str) -> list[str]:
    """The sources a packed file carries (runs only its decoding lines, not the code)."""
    if not text.startswith(MARKER):
        raise ValueError(f"not a packed code file (its first line does not start with {MARKER!r})")
    lines = text.splitlines()
    decoding = next(i for i, line in enumerate(lines) if line.startswith("S="))
    namespace: dict = {}
    exec("\n".join(lines[1:decoding + 1]), namespace)
    return namespace["S"]


def carries(text: str, texts: list[str]) -> bool:
    """text is what pack() writes for texts, loader included, whichever codec it chose."""
    try:
        codec, blob = text.split("\n", 1)[0].rsplit(" ", 3)[1], re.search(r"b85decode\('([^']*)'\)", text).group(1)
        return unpack(text) == texts and text == LOADER.format(
            marker=MARKER, files=", ".join(CODE_FILES), codec=codec, decode=DECODERS[codec], blob=blob,
            modules=tuple(n[:-3] for n in CODE_FILES[1:]))
    except (AttributeError, KeyError, ValueError, StopIteration):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the packed file to write (train_gpt.py in a folder of its own)")
    parser.add_argument("--src", type=Path, default=ROOT, help="folder with the three code files")
    parser.add_argument("--check", action="store_true", help="compare OUT's contents with --src instead of writing")
    cli = parser.parse_args(argv)
    try:
        texts = sources(cli.src)
        if cli.check:
            same = carries(cli.out.read_text(encoding="utf-8"), texts)
            print(f"{cli.out}: {'carries' if same else 'differs from'} the code in {cli.src}")
            return 0 if same else 1
        if cli.out.name != "train_gpt.py":
            raise ValueError(f"{cli.out} must be named train_gpt.py (the command the challenge runs)")
        text = pack(texts)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_text(text, encoding="utf-8")
    plain = sum(len(t.encode()) for t in texts)
    print(f"packed {', '.join(CODE_FILES)} ({plain:,} bytes) into {cli.out}: {len(text.encode()):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
