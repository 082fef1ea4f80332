"""Super-resolution (the upscale mode): the SD x4 latent upscaler, GAN upscalers, or plain resampling.

- The x4 upscaler (``StableDiffusionUpscalePipeline``) is a diffusion model guided by the prompt: its latent
  is the input's own size and its VAE decodes 4x. Inputs larger than :data:`X4_TILE` pixels a side run
  in overlapping tiles (one generator seeded with the image's seed per tile), blended by
  :mod:`pipelines.tiling`. Scales under 4 are the x4 result resized down with Lanczos. A batch is one
  image per seed (``spec.seeds()``), so a batch equals single runs.
- GAN upscalers (spandrel) run at their native scale, repeated until the size is reached, then Lanczos
  to the exact size; deterministic, so a batch is copies.
- "Lanczos" and "Nearest" only resample.

``spec.width``/``height`` are the input's size; the output is ``spec.output_size``. Blocking: worker thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

from models.extras import ExtraEntry, ExtraKind
from pipelines.gan import GAN_OVERLAP, GAN_TILE, load_gan, upscale_with_gan
from pipelines.images import ResizeMode, resize_to
from pipelines.jobs import JobSpec
from pipelines.modes import RunContext, RunOutput, StepHook
from pipelines.samplers import make_scheduler
from pipelines.tiling import plan_tiles, run_tiled
from storage.errors import InvalidRequestError

__all__ = [
    "X4_MULTIPLE",
    "X4_OVERLAP",
    "X4_TILE",
    "X4Upscaler",
    "load_x4",
    "plain_upscale",
    "run",
    "upscale_image",
    "upscale_x4",
]

log = logging.getLogger(__name__)

X4_TILE = 128  # input pixels per tile side: a 512×512 decode per tile, fine on a CPU
X4_OVERLAP = 16  # input pixels (64 output pixels of cross-fade)
X4_MULTIPLE = 8  # the real x4 UNet downsamples its latent 3 times
_RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass
class X4Upscaler:
    """A loaded x4 upscaler and the scheduler config it was saved with (samplers start from it)."""

    pipe: Any  # StableDiffusionUpscalePipeline
    scheduler_config: dict[str, Any]


def load_x4(entry: ExtraEntry, *, device: torch.device, dtype: torch.dtype) -> X4Upscaler:
    """Load an x4 upscaler folder (local files only)."""
    diffusers.utils.logging.disable_progress_bar()
    pipe = StableDiffusionUpscalePipeline.from_pretrained(entry.location, dtype=dtype, local_files_only=True)
    if device.type != "cpu":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return X4Upscaler(pipe, dict(pipe.scheduler.config))


def _variant(ctx: RunContext) -> str:
    return f"{ctx.cache.device}/{ctx.cache.dtype}"


def plain_upscale(image: Image.Image, name: str, size: tuple[int, int]) -> Image.Image:
    """Resample to ``size`` with "Lanczos" or "Nearest" (case-insensitive)."""
    return image.resize(size, _RESAMPLING[name.lower()])


def _pad_to(array: np.ndarray, multiple: int) -> np.ndarray:
    height, width = array.shape[:2]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return array
    return np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _check_noise_level(up: X4Upscaler, noise_level: int) -> None:
    top = int(up.pipe.config.get("max_noise_level", 350))
    if noise_level > top:
        raise InvalidRequestError(f"This upscaler takes a noise level of at most {top}, not {noise_level}.")


def upscale_x4(
    up: X4Upscaler,
    image: Image.Image,
    spec: JobSpec,
    seed: int,
    *,
    tile: int = X4_TILE,
    overlap: int = X4_OVERLAP,
    on_step: StepHook | None = None,
) -> Image.Image:
    """``image`` at 4x with the x4 upscaler: prompt, negative prompt, steps, CFG, sampler, clip skip and
    noise level from ``spec``; tiled when a side exceeds ``tile`` input pixels.

    Args:
        seed: Seeds the generator of every tile (the low-res noise and the starting latents).
        on_step: Progress over all tiles' denoising steps.
    """
    _check_noise_level(up, spec.noise_level)
    pipe = up.pipe
    pipe.scheduler = make_scheduler(spec.sampler, up.scheduler_config)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    padded = _pad_to(array, X4_MULTIPLE)
    tiles = len(plan_tiles(padded.shape[1], padded.shape[0], tile, overlap, X4_MULTIPLE))
    total = spec.steps * tiles
    progress = {"done": 0, "end": 0}  # steps reported so far; where the current tile's steps end

    def callback(step: int, timestep: Any, latents: torch.Tensor) -> None:
        progress["done"] = min(progress["done"] + 1, progress["end"])  # second-order samplers call back more
        if on_step is not None:
            on_step(progress["done"], total)

    def run_one(piece: np.ndarray) -> np.ndarray:
        progress["end"] += spec.steps
        out = pipe(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            image=piece[None],
            num_inference_steps=spec.steps,
            guidance_scale=spec.cfg,
            noise_level=spec.noise_level,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback=callback,
            output_type="np",
        )
        progress["done"] = progress["end"]
        result: np.ndarray = out.images[0]
        return result

    upscaled = run_tiled(padded, run_one, scale=4, tile=tile, overlap=overlap, multiple=X4_MULTIPLE)
    height, width = array.shape[:2]
    pixels = (upscaled[: height * 4, : width * 4] * 255.0).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _require_entry(ctx: RunContext, name: str | None) -> ExtraEntry:
    return ctx.extras.registry.require_upscaler(name)


def _load_gan_entry(ctx: RunContext, entry: ExtraEntry) -> Any:
    device, dtype = ctx.cache.device, ctx.cache.dtype
    return ctx.extras.get(
        entry, lambda e: load_gan(e.path, e.name, device=device, dtype=dtype), variant=_variant(ctx)
    )


def _load_x4_entry(ctx: RunContext, entry: ExtraEntry) -> X4Upscaler:
    device, dtype = ctx.cache.device, ctx.cache.dtype
    up: X4Upscaler = ctx.extras.get(entry, lambda e: load_x4(e, device=device, dtype=dtype), _variant(ctx))
    return up


def upscale_image(
    ctx: RunContext,
    image: Image.Image,
    name: str | None,
    size: tuple[int, int],
    seed: int,
    on_step: StepHook | None = None,
) -> Image.Image:
    """``image`` at exactly ``size`` by the upscaler ``name`` (plain, GAN or x4; None: the default one).

    Raises:
        NotFoundError: no such upscaler.
        IncompatibleAssetError: its file is not a model spandrel recognises.
    """
    if name is not None and name.lower() in _RESAMPLING:
        return plain_upscale(image, name, size)
    entry = _require_entry(ctx, name)
    if entry.kind == ExtraKind.latent_upscaler:
        result = upscale_x4(_load_x4_entry(ctx, entry), image, ctx.spec, seed, on_step=on_step)
    else:
        result = upscale_with_gan(_load_gan_entry(ctx, entry), image, size, on_step=on_step)
    if result.size != size:
        result = result.resize(size, Image.Resampling.LANCZOS)
    return result


def _tile_keys(image: Image.Image, tile: int, overlap: int, multiple: int = 1) -> dict[str, object]:
    width = -(-image.width // multiple) * multiple
    height = -(-image.height // multiple) * multiple
    if len(plan_tiles(width, height, tile, overlap, multiple)) == 1:
        return {}
    return {"Tile size": tile, "Tile overlap": overlap}


def _x4_keys(spec: JobSpec) -> dict[str, object]:
    return {
        "Steps": spec.steps,
        "Sampler": spec.sampler,
        "CFG scale": spec.cfg,
        "Noise level": spec.noise_level,
    }


def _batch_progress(ctx: RunContext, index: int, count: int) -> StepHook:
    def progress(done: int, total: int) -> None:
        ctx.step(index * total + done, total * count)

    return progress


def run(ctx: RunContext) -> RunOutput:
    """The upscale runner: ``spec.batch`` images of ``spec.output_size``."""
    spec = ctx.spec
    image = ctx.init_image()
    if image.size != (spec.width, spec.height):
        image = resize_to(image, spec.width, spec.height, ResizeMode(spec.resize_mode))
    size = spec.output_size
    if spec.upscaler is not None and spec.upscaler.lower() in _RESAMPLING:
        result = plain_upscale(image, spec.upscaler, size)
        return RunOutput([result.copy() for _ in range(spec.batch)])
    entry = _require_entry(ctx, spec.upscaler)
    if entry.kind == ExtraKind.latent_upscaler:
        seeds = spec.seeds()
        images = [
            upscale_image(ctx, image, entry.name, size, seed, _batch_progress(ctx, index, len(seeds)))
            for index, seed in enumerate(seeds)
        ]
        return RunOutput(images, _x4_keys(spec) | _tile_keys(image, X4_TILE, X4_OVERLAP, X4_MULTIPLE))
    result = upscale_image(ctx, image, entry.name, size, spec.seed, ctx.step)
    return RunOutput([result.copy() for _ in range(spec.batch)], _tile_keys(image, GAN_TILE, GAN_OVERLAP))
