"""The offline tiny model family: random-weight, real-architecture models for fast tests and plumbing.

``ensure_tiny_models(root)`` builds, once, under ``root``:

- ``sd15/``            StableDiffusionPipeline (real CLIP tokenizer, 8x VAE, PNDM, no safety checker)
- ``sd15-inpaint/``    StableDiffusionInpaintPipeline (9-channel UNet)
- ``sd15-controlnet/`` ControlNetModel made from the sd15 UNet (zero convolutions given random weights)
- ``sdxl/``            StableDiffusionXLPipeline (two text encoders, text_time UNet, Euler; pads "!" in
                       tokenizer_2)
- ``sdxl-controlnet/`` ControlNetModel made from the sdxl UNet (text_time conditioning, same treatment)
- ``upscaler-x4/``     StableDiffusionUpscalePipeline (7-channel UNet, noise level as class label, 4x VAE)
- ``vae-alt/``         a second AutoencoderKL compatible with sd15
- ``esrgan/tiny_esrgan_x4.safetensors``  a 4x RRDBNet in Real-ESRGAN's key layout (spandrel: ESRGAN)
- ``VERSION``          the stamp of the build, written last

Everything is built from configs with fixed seeds (byte-identical on every build), saved as safetensors and
loads with ``local_files_only=True``; the network is never used. Identical files (the shared text encoder,
VAE and tokenizer files) are hard links to one copy: never write into these folders in place. Outputs are
noise, since the weights are random. The default size is 64x64 (sample_size 8 x VAE factor 8).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from models import tiny_components as tc
from models.tokenizer import copy_clip_tokenizer, load_clip_tokenizer

__all__ = [
    "ESRGAN_FILENAME",
    "TINY_MODELS_VERSION",
    "TINY_NAMES",
    "build_tiny_models",
    "ensure_tiny_models",
    "is_current",
    "tiny_esrgan_path",
    "tiny_path",
]

log = logging.getLogger(__name__)

#: Bump whenever a config, seed or file layout changes: cached families with another stamp are rebuilt.
TINY_MODELS_VERSION = 4
TINY_NAMES: tuple[str, ...] = (
    "sd15",
    "sd15-inpaint",
    "sd15-controlnet",
    "sdxl",
    "sdxl-controlnet",
    "upscaler-x4",
    "vae-alt",
    "esrgan",
)
ESRGAN_FILENAME = "tiny_esrgan_x4.safetensors"
_STAMP_FILE = "VERSION"
_LOCK_FILE = ".lock"
_STAMP = f"dreamcord tiny models v{TINY_MODELS_VERSION}\n"

# One seed per component; equal seeds and configs give equal weights (shared text encoders, VAEs).
_SEED_TEXT, _SEED_TEXT_2, _SEED_VAE, _SEED_UNET = 0, 1, 2, 3
_SEED_INPAINT_UNET, _SEED_CONTROLNET, _SEED_SDXL_UNET, _SEED_UPSCALER_UNET = 4, 5, 6, 7
_SEED_UPSCALER_VAE, _SEED_VAE_ALT, _SEED_ESRGAN, _SEED_SDXL_CONTROLNET = 8, 9, 10, 11


def tiny_path(root: Path, name: str) -> Path:
    """The folder of one tiny model, e.g. ``tiny_path(root, "sd15")``.

    Raises:
        KeyError: ``name`` is not one of :data:`TINY_NAMES`.
    """
    if name not in TINY_NAMES:
        raise KeyError(f"unknown tiny model {name!r}; expected one of {', '.join(TINY_NAMES)}")
    return root / name


def tiny_esrgan_path(root: Path) -> Path:
    """The tiny ESRGAN's safetensors file (load it with ``spandrel.ModelLoader().load_from_file``)."""
    return tiny_path(root, "esrgan") / ESRGAN_FILENAME


def is_current(root: Path) -> bool:
    """True when ``root`` holds a complete family built by this :data:`TINY_MODELS_VERSION`."""
    stamp = root / _STAMP_FILE
    try:
        current = stamp.read_text(encoding="utf-8") == _STAMP
    except OSError:
        return False
    return current and all((root / name).is_dir() for name in TINY_NAMES)


def ensure_tiny_models(root: Path) -> Path:
    """Build the family under ``root`` unless a current one is there; returns ``root``.

    Safe to call from parallel processes: builders queue on an exclusive lock file in ``root``.
    """
    if is_current(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / _LOCK_FILE):
        if not is_current(root):
            for stale in root.glob(".build-*"):  # left by a builder that was killed
                shutil.rmtree(stale, ignore_errors=True)
            build_tiny_models(root)
    return root


def build_tiny_models(root: Path) -> None:
    """Build every tiny model into ``root/<name>/`` (replacing old ones), then write the ``VERSION`` stamp.

    Each model is built in a temporary folder inside ``root`` and renamed into place, so an interrupted build
    never leaves a half-written model folder; the stamp is removed first and written last, so an
    interrupted build is simply redone by :func:`ensure_tiny_models`. Callers that may race should use
    :func:`ensure_tiny_models`, which holds the lock.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / _STAMP_FILE).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _quiet_progress():
            for name, builder in _BUILDERS.items():
                log.info("building tiny model %s", name)
                builder(staging / name)
        _link_duplicates(staging)
        for name in TINY_NAMES:
            _replace_dir(staging / name, root / name, staging / f".old-{name}")
        _write_atomic(root / _STAMP_FILE, _STAMP)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny models v%d ready in %s", TINY_MODELS_VERSION, root)


# --- builders ---------------------------------------------------------------------------------------


def _build_sd15(dest: Path) -> None:
    pipe = StableDiffusionPipeline(
        vae=tc.vae(_SEED_VAE),
        text_encoder=tc.text_encoder(_SEED_TEXT),
        tokenizer=load_clip_tokenizer(),
        unet=tc.sd15_unet(_SEED_UNET),
        scheduler=tc.sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, dest, {"tokenizer": "<|endoftext|>"})


def _build_sd15_inpaint(dest: Path) -> None:
    pipe = StableDiffusionInpaintPipeline(
        vae=tc.vae(_SEED_VAE),
        text_encoder=tc.text_encoder(_SEED_TEXT),
        tokenizer=load_clip_tokenizer(),
        unet=tc.sd15_unet(_SEED_INPAINT_UNET, in_channels=9),
        scheduler=tc.sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, dest, {"tokenizer": "<|endoftext|>"})


def _build_sd15_controlnet(dest: Path) -> None:
    controlnet = tc.controlnet_from_unet(tc.sd15_unet(_SEED_UNET), _SEED_CONTROLNET)
    controlnet.save_pretrained(dest, safe_serialization=True)


def _build_sdxl(dest: Path) -> None:
    pipe = StableDiffusionXLPipeline(
        vae=tc.vae(_SEED_VAE, scaling_factor=0.13025),
        text_encoder=tc.text_encoder(_SEED_TEXT),
        text_encoder_2=tc.text_encoder_with_projection(_SEED_TEXT_2),
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=tc.sdxl_unet(_SEED_SDXL_UNET),
        scheduler=tc.sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _save_pipeline(pipe, dest, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})


def _build_sdxl_controlnet(dest: Path) -> None:
    controlnet = tc.controlnet_from_unet(tc.sdxl_unet(_SEED_SDXL_UNET), _SEED_SDXL_CONTROLNET)
    controlnet.save_pretrained(dest, safe_serialization=True)


def _build_upscaler(dest: Path) -> None:
    scheduler, low_res_scheduler = tc.upscaler_schedulers()
    pipe = StableDiffusionUpscalePipeline(
        vae=tc.upscaler_vae(_SEED_UPSCALER_VAE),
        text_encoder=tc.text_encoder(_SEED_TEXT),
        tokenizer=load_clip_tokenizer(pad_token="!"),
        unet=tc.upscaler_unet(_SEED_UPSCALER_UNET),
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )
    _save_pipeline(pipe, dest, {"tokenizer": "!"})


def _build_vae_alt(dest: Path) -> None:
    tc.vae(_SEED_VAE_ALT).save_pretrained(dest, safe_serialization=True)


def _build_esrgan(dest: Path) -> None:
    dest.mkdir(parents=True)
    save_file(tc.esrgan_state_dict(_SEED_ESRGAN), str(dest / ESRGAN_FILENAME))


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "sd15": _build_sd15,
    "sd15-inpaint": _build_sd15_inpaint,
    "sd15-controlnet": _build_sd15_controlnet,
    "sdxl": _build_sdxl,
    "sdxl-controlnet": _build_sdxl_controlnet,
    "upscaler-x4": _build_upscaler,
    "vae-alt": _build_vae_alt,
    "esrgan": _build_esrgan,
}


def _save_pipeline(pipe: object, dest: Path, tokenizers: dict[str, str]) -> None:
    """Save a pipeline, then swap its tokenizer folders for the repo's small vocab/merges files."""
    pipe.save_pretrained(dest, safe_serialization=True)  # type: ignore[attr-defined]
    for folder, pad_token in tokenizers.items():
        shutil.rmtree(dest / folder)
        copy_clip_tokenizer(dest / folder, pad_token=pad_token)


# --- file helpers -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _link_duplicates(folder: Path) -> None:
    """Replace byte-identical files under ``folder`` by hard links to one copy (saves ~25 MB).

    The shared text encoder, VAE and tokenizer files are stored once (``save_pretrained`` writes a new file
    and renames it, so saving over a copy never changes the others; never write into the cache in place).
    """
    first: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path.chmod(0o644)  # the savers write weights through 0600 temporary files
        key = f"{path.stat().st_size}:{_sha256(path)}"
        if key not in first:
            first[key] = path
            continue
        tmp = path.with_name(path.name + ".link")
        try:
            os.link(first[key], tmp)
        except OSError:  # a file system without hard links: keep the copy
            continue
        os.replace(tmp, path)


def _replace_dir(new: Path, target: Path, trash: Path) -> None:
    """Move ``new`` to ``target``, moving an existing ``target`` out of the way first."""
    if target.exists():
        os.replace(target, trash)
    os.replace(new, target)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' "Writing model shards" progress bar during the build."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if needed) for the ``with`` block."""
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
