"""Regenerate the real CLIP BPE tokenizer files in ``models/clip_tokenizer/``.

The source is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` as shipped in the ``open_clip_torch`` 3.3.0 wheel on
PyPI. The vocabulary is rebuilt exactly as OpenAI's ``SimpleTokenizer`` does: the 256 byte-level characters,
the same with ``</w>`` appended, the first 48,894 merges joined, then ``<|startoftext|>`` and
``<|endoftext|>`` (49,408 entries in all).

Usage::

    python -m models.build_clip_vocab [--wheel PATH] [--out DIR]

Without ``--wheel`` the wheel is fetched with ``pip download --no-deps open_clip_torch==3.3.0`` into a
temporary folder (the package is never installed).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "OPEN_CLIP_REQUIREMENT",
    "OUT_DIR",
    "VOCAB_SIZE",
    "build_files",
    "bytes_to_unicode",
    "download_wheel",
    "main",
    "read_bpe_lines",
    "write_files",
]

log = logging.getLogger(__name__)

OPEN_CLIP_REQUIREMENT = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of the gzip member inside the wheel, so a tampered or different download is refused.
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
OUT_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

_README = """\
# CLIP BPE tokenizer (OpenAI CLIP, MIT licence)

These files are the byte-level BPE vocabulary of OpenAI's CLIP text encoder, the one Stable Diffusion 1.x/2.x
and both SDXL text encoders use (49,408 tokens, 48,894 merges). They are derived from
`bpe_simple_vocab_16e6.txt.gz`, as shipped in the `open_clip_torch` 3.3.0 wheel on PyPI, by
`models/build_clip_vocab.py`; run `python -m models.build_clip_vocab` to regenerate them byte for byte.

Licence of the source (https://github.com/openai/CLIP, MIT):

    Copyright (c) 2021 OpenAI

    Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
    associated documentation files (the "Software"), to deal in the Software without restriction, including
    without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
    following conditions:

    The above copyright notice and this permission notice shall be included in all copies or substantial
    portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
    LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
    EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
    IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
    THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable unicode character table, in its original order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def download_wheel(dest: Path) -> Path:
    """Fetch the open_clip_torch wheel with pip (no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    subprocess.run([*cmd, OPEN_CLIP_REQUIREMENT], check=True, capture_output=True)
    wheels = sorted(dest.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError("pip download did not produce an open_clip_torch wheel")
    return wheels[0]


def read_bpe_lines(wheel: Path) -> list[str]:
    """The lines of ``bpe_simple_vocab_16e6.txt`` from the wheel, checked against the pinned sha256."""
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(BPE_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BPE_SHA256:
        raise ValueError(f"{BPE_MEMBER} has sha256 {digest}, expected {BPE_SHA256}")
    return gzip.decompress(raw).decode("utf-8").split("\n")


def build_files(lines: Sequence[str]) -> dict[str, str]:
    """Build the tokenizer files' text (name -> content) from the BPE file's lines."""
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} unique tokens, got {len(vocab)} of {len(tokens)}")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "README.md": _README,
    }


def write_files(files: dict[str, str], out_dir: Path) -> None:
    """Write the files as UTF-8 with ``\\n`` line ends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_bytes(text.encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheel", type=Path, help="a local open_clip_torch 3.3.0 wheel (default: pip download)"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel else download_wheel(Path(tmp))
        files = build_files(read_bpe_lines(wheel))
    write_files(files, args.out)
    log.info("wrote %d files to %s", len(files), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
