"""img2img: an init image, noised by ``spec.strength`` and denoised towards the prompt. Worker thread only.

The init image is fitted to ``spec.width``×``spec.height`` by ``spec.resize_mode`` (default: the webui's
"crop and resize"). Sampler, per-image generators and clip skip follow txt2img, so a batch of N equals N
single runs with seeds ``seed + i``. Of ``spec.steps`` only ``int(steps × strength)`` run (diffusers skips
the noisiest ones; the engine refuses a job where none would); progress reports that real count. An
inpainting (9-channel) model cannot take a plain img2img input, so for one the job runs as an inpaint of
the whole image, as the webui does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from diffusers import DiffusionPipeline
from PIL import Image

from models.cache import LoadedModel
from models.families import Family
from pipelines.conditioning import conditioned
from pipelines.images import ResizeMode, resize_to
from pipelines.jobs import JobSpec
from pipelines.modes import RunContext, RunOutput, StepHook
from pipelines.samplers import make_scheduler
from pipelines.text_to_image import generators_for, to_pil

__all__ = [
    "IMG2IMG_CLASSES",
    "fitted",
    "img2img_arrays",
    "is_inpainting_model",
    "progress_callback",
    "run",
]

log = logging.getLogger(__name__)

IMG2IMG_CLASSES: dict[Family, str] = {
    Family.sd15: "StableDiffusionImg2ImgPipeline",
    Family.sdxl: "StableDiffusionXLImg2ImgPipeline",
}


def progress_callback(on_step: StepHook | None) -> Callable[..., dict[str, Any]] | None:
    """A ``callback_on_step_end`` reporting (steps done, steps this pipeline call really runs)."""
    if on_step is None:
        return None

    def callback(pipe: DiffusionPipeline, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, int(pipe.num_timesteps))
        return kwargs

    return callback


def fitted(image: Image.Image, spec: JobSpec) -> Image.Image:
    """``image`` at the job's size by its resize mode."""
    return resize_to(image, spec.width, spec.height, ResizeMode(spec.resize_mode))


def is_inpainting_model(model: LoadedModel) -> bool:
    """True for a 9-channel (inpainting) UNet, which needs a mask and a masked image as input."""
    return int(model.base.unet.config.in_channels) == 9


def img2img_arrays(
    model: LoadedModel, spec: JobSpec, image: Image.Image, on_step: StepHook | None = None
) -> np.ndarray:
    """Run img2img from ``image`` (already ``spec.width``×``spec.height``) for a complete spec.

    Returns:
        Float32 array of shape (batch, height, width, 3) with values in [0, 1].
    """
    pipe = model.pipeline(IMG2IMG_CLASSES[model.family])
    pipe.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    output = pipe(
        **conditioned(model, spec, progress_callback(on_step)),
        image=image,
        strength=spec.strength,
        num_inference_steps=spec.steps,
        guidance_scale=spec.cfg,
        generator=generators_for(spec),
        output_type="np",
    )
    images: np.ndarray = output.images
    return images


def run(ctx: RunContext) -> RunOutput:
    """The img2img runner."""
    spec = ctx.spec
    image = fitted(ctx.init_image(), spec)
    model = ctx.model()
    if is_inpainting_model(model):
        from pipelines.inpaint import inpaint_images  # imported here: inpaint builds on this module

        whole = Image.new("L", image.size, 255)
        return RunOutput(inpaint_images(ctx, image, whole, spec.strength, model=model).images)
    return RunOutput(to_pil(img2img_arrays(model, spec, image, ctx.on_step)))
