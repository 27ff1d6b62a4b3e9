"""Pack the three counted code files into one self-extracting train_gpt.py: the same run, fewer counted bytes.

Runbook
  python tools/pack_code.py OUT/train_gpt.py              # OUT/ then needs no other code file
  cd OUT && torchrun --standalone --nproc_per_node=8 train_gpt.py        # run the seeds from that folder
  python tools/make_record.py --code-dir OUT ... OUT/logs/seed*.txt      # package the packed file with its logs
  python tools/pack_code.py --check OUT/train_gpt.py      # does it carry the repo's current code?
  python tools/pack_code.py --compare                     # bytes of every minification, codec and encoding

The challenge counts the bytes of the code a submission runs. The packed file holds train_gpt.py, convgpt_ops.py
and quantize.py, minified and joined by NUL bytes, compressed with lzma (raw LZMA2, preset 9e) or zstd level 22,
whichever is smaller, as one latin-1 string literal.
  * Minified: the docstrings and comments are dropped (from the AST, then ast.unparse) and the indentation is one
    space a level. Identifiers, strings and behaviour stay: the minified source must parse to the same AST as the
    original without its docstrings, or packing stops. Nothing in the counted code reads a docstring.
  * Latin-1: the file declares `coding: latin-1` in its first line, so every compressed byte is one byte of the
    file; only NUL, CR, quote and backslash are escaped. That is ~2% over the compressed size, where base85 is 25%.
Its loader, a few hundred bytes of plain Python, decodes the sources at start. It registers convgpt_ops and
quantize as modules, and their sources in linecache, because Triton reads a kernel's source through inspect.
Then it deletes its own names and runs train_gpt.py's source in its own namespace, with `__packed__` set. So
`python train_gpt.py` runs main() and `import train_gpt` imports the model, exactly as with the plain files. The
trainer then logs the packed file's size as bytes_code, and its sha256 in the `code` line.
Invariant: apart from the code line and the size line, a run's log is identical from the packed file and from
the plain files (tests/test_pack_code.py).
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import lzma
import re
import sys
import tokenize
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ("train_gpt.py", "convgpt_ops.py", "quantize.py")  # train_gpt.COUNTED_CODE, in this order
MARKER = "# ConvGPT-v2 packed code v2"  # first line of every packed file: tools/make_record.py looks for it
ENCODING = "latin-1"  # one file byte per compressed byte; declared in the first line (PEP 263)
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
ZSTD_LEVEL = 22
UNPARSE_INDENT = 4  # spaces per level in ast.unparse's output
ESCAPES = {0: "\\x00", 13: "\\r", 39: "\\'", 92: "\\\\"}  # the bytes a triple-quoted literal cannot hold raw
LOADER = '''{marker} (tools/pack_code.py): {files}, minified, {codec}, coding: latin-1
import linecache,sys,types
{decode}
S=D({blob}.encode("latin-1")).decode().split("\\0")
for n,s in zip({modules!r},S[1:]):
 m=types.ModuleType(n);f=m.__file__=__file__+"!/"+n+".py";linecache.cache[f]=(len(s),None,s.splitlines(True),f)
 sys.modules[n]=m;exec(compile(s,f,"exec"),m.__dict__)
f=__file__+"!/train_gpt.py";linecache.cache[f]=(len(S[0]),None,S[0].splitlines(True),f)
C=compile(S[0],f,"exec");__packed__=True;del linecache,sys,types,D,S,n,s,m,f
exec(globals().pop("C"))
'''
DECODERS = {
    "lzma": "D=lambda b,z=__import__('lzma'):z.decompress(b,z.FORMAT_RAW,filters=[{'id':z.FILTER_LZMA2}])",
    "zstd": "D=lambda b,z=__import__('zstandard'):z.ZstdDecompressor().decompress(b)",
}
COMPRESSORS = {
    "lzma": lambda raw: lzma.compress(raw, lzma.FORMAT_RAW, filters=LZMA_FILTERS),
    "zstd": lambda raw: zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw),
}
DECOMPRESSORS = {  # what DECODERS' lines do in the packed file, for unpack()
    "lzma": lambda blob: lzma.decompress(blob, lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]),
    "zstd": lambda blob: zstandard.ZstdDecompressor().decompress(blob),
}
LITERAL = re.compile(r"^S=D\(('''.*''')\.encode\(\"latin-1\"\)\)", re.S | re.M)


def sources(src: Path) -> list[str]:
    texts = [(src / name).read_text(encoding="utf-8") for name in CODE_FILES]
    if any("\0" in text for text in texts):
        raise ValueError("a code file contains a NUL byte, the packed format's separator")
    return texts


def without_docstrings(source: str) -> ast.Module:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def reindent(code: str) -> str:
    """ast.unparse's output with one space per indentation level; the lines of a multi-line string are kept.
    (Its blank lines stay too: without them lzma's output grew by 20 bytes.)"""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        inside.update(range(tok.start[0] + 1, tok.end[0] + 1))
    lines = code.split("\n")
    for i, line in enumerate(lines):
        if i + 1 not in inside:
            body = line.lstrip(" ")
            lines[i] = " " * ((len(line) - len(body)) // UNPARSE_INDENT) + body
    return "\n".join(lines)


def minify(source: str) -> str:
    """source without docstrings and comments, one space per indentation level: the same AST, docstrings aside."""
    tree = without_docstrings(source)
    code = reindent(ast.unparse(tree))
    if ast.dump(ast.parse(code)) != ast.dump(tree):
        raise ValueError("minified code parses to another program than its source (an ast.unparse limit)")
    return code + "\n"


def literal(blob: bytes) -> str:
    """A triple-quoted str literal whose latin-1 encoding is blob (the file must declare coding: latin-1)."""
    return "'''" + "".join(ESCAPES.get(b, chr(b)) for b in blob) + "'''"


def loader(codec: str, blob_literal: str) -> str:
    return LOADER.format(marker=MARKER, files=", ".join(CODE_FILES), codec=codec, decode=DECODERS[codec],
                         blob=blob_literal, modules=tuple(n[:-3] for n in CODE_FILES[1:]))


def pack(texts: list[str]) -> str:
    """The packed file's text for the sources of CODE_FILES, in order (write it with ENCODING)."""
    raw = "\0".join(minify(text) for text in texts).encode()
    blobs = {name: compress(raw) for name, compress in COMPRESSORS.items()}
    codec = min(blobs, key=lambda name: len(literal(blobs[name])))
    return loader(codec, literal(blobs[codec]))


def read(path: Path) -> str:
    return path.read_bytes().decode(ENCODING)


def parts(text: str) -> tuple[str, str]:
    """The codec a packed file names in its first line and its blob literal (ValueError if it is not one)."""
    if not text.startswith(MARKER):
        raise ValueError(f"not a packed code file of this version (its first line does not start with {MARKER!r})")
    codec = text.split("\n", 1)[0].split(", ")[-2]
    found = LITERAL.search(text)
    if codec not in DECODERS or found is None:
        raise ValueError("packed file without a known codec or blob literal")
    return codec, found.group(1)


def unpack(text: str) -> list[str]:
    """The minified sources a packed file carries (decodes its blob; runs none of its code)."""
    codec, blob_literal = parts(text)
    return DECOMPRESSORS[codec](ast.literal_eval(blob_literal).encode(ENCODING)).decode().split("\0")


def carries(text: str, texts: list[str]) -> bool:
    """text is a file pack() writes, loader included, for sources with the same ASTs as texts (docstrings aside)."""
    try:
        codec, blob_literal = parts(text)
        packed = unpack(text)
        return text == loader(codec, blob_literal) and len(packed) == len(texts) and all(
            ast.dump(ast.parse(p)) == ast.dump(without_docstrings(t)) for p, t in zip(packed, texts))
    except (SyntaxError, ValueError, lzma.LZMAError, zstandard.ZstdError):
        return False


def compare(texts: list[str]) -> list[str]:
    """Bytes of the payload for each minification, codec and text encoding (the loader adds ~700 bytes)."""
    rows = []
    for form, code in (("plain", texts), ("minified", [minify(t) for t in texts])):
        raw = "\0".join(code).encode()
        for name, compress in COMPRESSORS.items():
            blob = compress(raw)
            rows.append(f"{form} ({len(raw):,} bytes) {name}: compressed {len(blob):,}, base85 "
                        f"{len(base64.b85encode(blob)):,}, latin-1 literal {len(literal(blob)):,}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="the packed file to write (train_gpt.py in a folder of its own)")
    parser.add_argument("--src", type=Path, default=ROOT, help="folder with the three code files")
    parser.add_argument("--check", action="store_true", help="compare OUT's contents with --src instead of writing")
    parser.add_argument("--compare", action="store_true", help="print the bytes of each codec and encoding")
    cli = parser.parse_args(argv)
    try:
        texts = sources(cli.src)
        if cli.compare:
            print("\n".join(compare(texts)))
            return 0
        if cli.out is None:
            raise ValueError("name the packed file to write or check (OUT)")
        if cli.check:
            same = carries(read(cli.out), texts)
            print(f"{cli.out}: {'carries' if same else 'differs from'} the code in {cli.src}")
            return 0 if same else 1
        if cli.out.name != "train_gpt.py":
            raise ValueError(f"{cli.out} must be named train_gpt.py (the command the challenge runs)")
        text = pack(texts)
    except (OSError, SyntaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_bytes(text.encode(ENCODING))
    plain = sum(len(t.encode()) for t in texts)
    print(f"packed {', '.join(CODE_FILES)} ({plain:,} bytes) into {cli.out}: {len(text.encode(ENCODING)):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
