"""The real CLIP BPE tokenizer kept in the repository (``models/clip_tokenizer/``).

Stable Diffusion 1.x and both SDXL text encoders share this vocabulary (49,408 tokens). SD 1.x pads with
``<|endoftext|>``; SDXL's second tokenizer and SD 2.x pad with ``!`` (id 0): pass ``pad_token="!"`` for those.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers import CLIPTokenizer

__all__ = [
    "CLIP_TOKENIZER_FILES",
    "clip_tokenizer_dir",
    "copy_clip_tokenizer",
    "load_clip_tokenizer",
]

log = logging.getLogger(__name__)

_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
#: The files CLIPTokenizer.from_pretrained reads (the README with the licence note is not needed to load).
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
_EOS = "<|endoftext|>"


def clip_tokenizer_dir() -> Path:
    """The folder holding the real CLIP tokenizer files (vocab.json, merges.txt, configs)."""
    return _DIR


def load_clip_tokenizer(pad_token: str = _EOS) -> CLIPTokenizer:
    """Load the real CLIP tokenizer from the repository, offline.

    Args:
        pad_token: ``<|endoftext|>`` (SD 1.x, SDXL's first tokenizer) or ``!`` (SDXL's second, SD 2.x).
    """
    if pad_token == _EOS:
        return CLIPTokenizer.from_pretrained(str(_DIR), local_files_only=True)
    return CLIPTokenizer.from_pretrained(str(_DIR), local_files_only=True, pad_token=pad_token)


def copy_clip_tokenizer(dest: Path, pad_token: str = _EOS) -> Path:
    """Copy the tokenizer files into ``dest`` (e.g. a pipeline's ``tokenizer`` folder), setting the pad token.

    Copying the small vocab/merges files (rather than ``save_pretrained``, which writes a 3.6 MB
    tokenizer.json) keeps folders small and loads faster.

    Args:
        dest: The folder to create or fill.
        pad_token: The padding token written into the configs.

    Returns:
        ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in CLIP_TOKENIZER_FILES:
        src = _DIR / name
        if name.endswith(".json") and name != "vocab.json" and pad_token != _EOS:
            data = json.loads(src.read_text(encoding="utf-8"))
            data["pad_token"] = pad_token
            (dest / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, dest / name)
    log.debug("copied the CLIP tokenizer to %s (pad %r)", dest, pad_token)
    return dest
