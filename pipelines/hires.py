"""txt2img with the hires fix: the webui's two passes. Blocking: call only on the worker thread.

1. txt2img at the base size (``spec.width``×``height``), with the spec's steps, sampler and seeds.
2. Upscale to ``spec.output_size``: a "Latent ..." upscaler resizes the latents themselves
   (:data:`LATENT_UPSCALERS`: the webui's interpolation modes); any other name (Lanczos, Nearest, a GAN
   upscaler, the x4 upscaler) decodes, upscales the image, and the img2img pipeline encodes it again.
3. img2img at ``hires_denoise``, as the webui schedules it: ``N = int(hires_steps / min(denoise, 0.999))``
   sampler steps of which the last ``hires_steps`` are run (``hires_steps`` 0: ``spec.steps``), so the
   hires pass really denoises ``hires_steps`` steps, starting at ``hires_steps / N`` of the schedule.

Both passes use one CPU generator per image, seeded from ``spec.seeds()`` (fresh for each pass), so a
batch equals single runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from models.cache import LoadedModel
from pipelines.conditioning import conditioned
from pipelines.image_to_image import IMG2IMG_CLASSES
from pipelines.jobs import JobSpec
from pipelines.modes import RunContext, RunOutput, StepHook
from pipelines.samplers import make_scheduler
from pipelines.text_to_image import generators_for, to_pil
from pipelines.upscale import upscale_image
from storage.errors import InvalidRequestError, echo

__all__ = [
    "LATENT_UPSCALERS",
    "hires_schedule",
    "latent_mode",
    "run",
    "run_hires",
    "upscale_latents",
]

log = logging.getLogger(__name__)

#: webui latent upscaler name -> (torch interpolation mode, antialias).
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
_LATENT_BY_LOWER = {name.lower(): name for name in LATENT_UPSCALERS}


def hires_schedule(steps: int, denoise: float) -> tuple[int, float]:
    """The second pass's (scheduler steps, diffusers strength) that run exactly ``steps`` steps.

    The webui runs ``int(steps / min(denoise, 0.999))`` steps and skips all but the last ``steps``;
    diffusers' img2img runs ``int(num_inference_steps * strength)`` of ``num_inference_steps``, so the
    strength passed is ``(steps + 0.5) / N`` (capped at 1), which floors to exactly ``steps``.

    Args:
        steps: Steps to denoise, at least 1.
        denoise: The hires denoising strength, in (0, 1].
    """
    total = max(steps, int(steps / min(denoise, 0.999)))
    return total, min(1.0, (steps + 0.5) / total)


def latent_mode(name: str) -> tuple[str, bool] | None:
    """The interpolation of a "Latent ..." upscaler name (case-insensitive), None for an image upscaler.

    Raises:
        InvalidRequestError: a "Latent" name the webui does not have.
    """
    if not name.lower().startswith("latent"):
        return None
    canonical = _LATENT_BY_LOWER.get(name.lower())
    if canonical is None:
        known = ", ".join(LATENT_UPSCALERS)
        raise InvalidRequestError(
            f"There is no hires upscaler called {echo(name)!r}; the latent ones are {known}."
        )
    return LATENT_UPSCALERS[canonical]


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool) -> torch.Tensor:
    """Latents (B×C×h×w) resized to ``size`` = (height, width) in latent pixels, the webui's way."""
    if mode.startswith("nearest"):
        return F.interpolate(latents, size=size, mode=mode)
    return F.interpolate(latents, size=size, mode=mode, antialias=antialias)


def _hook(on_step: StepHook | None, offset: int, total: int) -> Callable[..., dict[str, Any]] | None:
    """``callback_on_step_end`` reporting ``offset + steps done`` of ``total`` (capped)."""
    if on_step is None:
        return None

    def callback(pipe: DiffusionPipeline, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(min(offset + step + 1, total), total)
        return kwargs

    return callback


def _first_pass(
    model: LoadedModel, spec: JobSpec, output_type: str, on_step: StepHook | None, total: int
) -> Any:
    pipe = model.pipeline(model.base_class_name)
    pipe.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    output = pipe(
        **conditioned(model, spec, _hook(on_step, 0, total)),
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.cfg,
        generator=generators_for(spec),
        output_type=output_type,
    )
    return output.images


def _upscaled_images(ctx: RunContext, arrays: np.ndarray) -> np.ndarray:
    """Decoded first-pass images upscaled one by one with the spec's image upscaler: (B, H, W, 3) floats."""
    spec = ctx.spec
    size = spec.output_size
    upscaled = [
        upscale_image(ctx, image, spec.hires_upscaler, size, seed)
        for image, seed in zip(to_pil(arrays), spec.seeds(), strict=True)
    ]
    return np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in upscaled])


def run_hires(ctx: RunContext) -> np.ndarray:
    """Both passes for the complete spec: float32 (batch, H, W, 3) in [0, 1] at ``spec.output_size``."""
    spec = ctx.spec
    mode = latent_mode(spec.hires_upscaler)  # a bad name fails before the model loads
    model = ctx.model()
    hires_steps = spec.hires_steps or spec.steps
    total = spec.steps + hires_steps
    width, height = spec.output_size
    first = _first_pass(model, spec, "latent" if mode else "np", ctx.on_step, total)
    img2img = model.pipeline(IMG2IMG_CLASSES[model.family])
    init: torch.Tensor | np.ndarray
    if mode is not None:
        factor = img2img.vae_scale_factor
        init = upscale_latents(first, (height // factor, width // factor), *mode)
    else:
        init = _upscaled_images(ctx, first)
    scheduler_steps, strength = hires_schedule(hires_steps, spec.hires_denoise)
    log.debug("hires pass: %d of %d steps (strength %.4f)", hires_steps, scheduler_steps, strength)
    img2img.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    output = img2img(
        **conditioned(model, spec, _hook(ctx.on_step, spec.steps, total)),
        image=init,
        strength=strength,
        num_inference_steps=scheduler_steps,
        guidance_scale=spec.cfg,
        generator=generators_for(spec),
        output_type="np",
    )
    images: np.ndarray = output.images
    return images


def run(ctx: RunContext) -> RunOutput:
    """The txt2img runner when ``spec.hires_scale`` is set (parameters.py writes the Hires keys)."""
    return RunOutput(to_pil(run_hires(ctx)))
