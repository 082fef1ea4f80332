"""txt2img: a prompt in, ``batch`` images out. Blocking: call only on the worker thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from models.cache import LoadedModel
from pipelines.conditioning import conditioned
from pipelines.jobs import JobSpec
from pipelines.modes import RunContext, RunOutput, StepHook
from pipelines.samplers import make_scheduler

__all__ = [
    "StepHook",
    "generate_arrays",
    "generators_for",
    "run",
    "run_text_to_image",
    "step_callback",
    "to_pil",
]


def generators_for(spec: JobSpec) -> list[torch.Generator]:
    """One CPU generator per image, so a batch of N equals N single runs with their seeds."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in spec.seeds()]


def step_callback(on_step: StepHook | None, total: int) -> Callable[..., dict[str, Any]] | None:
    """Adapt a :data:`StepHook` to diffusers' ``callback_on_step_end``."""
    if on_step is None:
        return None

    def callback(pipe: DiffusionPipeline, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, total)
        return kwargs

    return callback


def generate_arrays(model: LoadedModel, spec: JobSpec, on_step: StepHook | None = None) -> np.ndarray:
    """Generate ``spec.batch`` images for a complete spec (size and seed already resolved).

    Returns:
        Float32 array of shape (batch, height, width, 3) with values in [0, 1].
    """
    pipe = model.pipeline(model.base_class_name)
    pipe.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    output = pipe(
        # the webui's prompt language: weights, BREAK, long prompts, prompt editing switched per step
        **conditioned(model, spec, step_callback(on_step, spec.steps)),
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.cfg,
        generator=generators_for(spec),
        output_type="np",
    )
    images: np.ndarray = output.images
    return images


def run_text_to_image(
    model: LoadedModel, spec: JobSpec, on_step: StepHook | None = None
) -> list[Image.Image]:
    """:func:`generate_arrays` as PIL images."""
    return to_pil(generate_arrays(model, spec, on_step))


def to_pil(arrays: np.ndarray) -> list[Image.Image]:
    """Float images in [0, 1], shape (n, h, w, 3), as 8-bit PIL images."""
    return [Image.fromarray(a) for a in (arrays * 255).round().clip(0, 255).astype(np.uint8)]


def run(ctx: RunContext) -> RunOutput:
    """The txt2img runner."""
    return RunOutput(run_text_to_image(ctx.model(), ctx.spec, ctx.on_step))
