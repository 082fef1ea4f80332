"""inpaint: repaint the white part of a mask, keep the rest. Worker thread only.

As the webui does it: the init image and mask are fitted to the job's size, the mask is made binary
(:func:`pipelines.masks.binarise`), the diffusion pipeline repaints every latent cell the mask touches,
and the result is pasted back over the original through the blurred mask, so pixels beyond the blur's
reach are exactly the original's. "Only masked" generates the masked region (plus padding, at the job's
aspect ratio) at the full job size and scales it back. The model is the family's inpainting (9-channel)
model when the registry pairs one with the job's model, else the job's model through the inpaint pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from models.cache import LoadedModel
from models.families import Family
from pipelines.conditioning import conditioned
from pipelines.image_to_image import fitted, progress_callback
from pipelines.jobs import JobSpec
from pipelines.masks import binarise, is_empty, latent_aligned, only_masked_box, overlay_alpha, paste_back
from pipelines.modes import RunContext, RunOutput, StepHook
from pipelines.samplers import make_scheduler
from pipelines.text_to_image import generators_for, to_pil
from storage.errors import InvalidRequestError

__all__ = [
    "INPAINT_CLASSES",
    "Inpainted",
    "fitted_mask",
    "inpaint_arrays",
    "inpaint_images",
    "inpaint_model",
    "run",
]

log = logging.getLogger(__name__)

INPAINT_CLASSES: dict[Family, str] = {
    Family.sd15: "StableDiffusionInpaintPipeline",
    Family.sdxl: "StableDiffusionXLInpaintPipeline",
}


@dataclass
class Inpainted:
    """Inpainted images (one per seed) and the PNG-info keys only the inpaint path knows."""

    images: list[Image.Image]
    parameters: dict[str, object] = field(default_factory=dict)


def inpaint_model(ctx: RunContext) -> tuple[LoadedModel, dict[str, object]]:
    """The model that inpaints the job, and PNG-info keys naming it.

    The inpainting variant paired with the job's model (``ModelRegistry.inpaint_variant``) is loaded
    instead of the job's model, which is then not loaded at all; the PNG info keeps the job's model as
    ``Model`` (so the parameters re-run the same way) and adds ``Inpaint model``.
    """
    registry = ctx.cache.registry
    entry = registry.require(ctx.spec.model)
    variant = registry.inpaint_variant(entry)
    if variant is None or variant.name == entry.name:
        return ctx.model(), {}
    log.info("inpainting with %s, the inpainting model of %s", variant.name, entry.name)
    model_hash = registry.model_hash(entry)
    parameters: dict[str, object] = {
        "Model hash": model_hash[:10] if model_hash else None,
        "Model": entry.name,
        "Inpaint model": variant.name,
    }
    return ctx.load(variant.name), parameters


def inpaint_arrays(
    model: LoadedModel,
    spec: JobSpec,
    image: Image.Image,
    mask: Image.Image,
    strength: float,
    on_step: StepHook | None = None,
) -> np.ndarray:
    """The inpaint pipeline's raw output for ``image`` and binary ``mask`` (both at the generation size).

    Nothing is pasted back here. Returns float32 (batch, height, width, 3) in [0, 1].
    """
    pipe = model.pipeline(INPAINT_CLASSES[model.family])
    pipe.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    output = pipe(
        **conditioned(model, spec, progress_callback(on_step)),
        image=image,
        mask_image=latent_aligned(mask, int(pipe.vae_scale_factor)),
        height=image.height,
        width=image.width,
        strength=strength,
        num_inference_steps=spec.steps,
        guidance_scale=spec.cfg,
        generator=generators_for(spec),
        output_type="np",
    )
    images: np.ndarray = output.images
    return images


def inpaint_images(
    ctx: RunContext,
    image: Image.Image,
    mask: Image.Image,
    strength: float,
    *,
    model: LoadedModel | None = None,
) -> Inpainted:
    """Inpaint ``image`` where the binary ``mask`` is white, with the job's prompt, seeds and mask options.

    Args:
        ctx: The job's context (spec: prompt, sampler, seeds, mask blur, only masked, padding).
        image: RGB, at the job's ``width``×``height``.
        mask: ``L``, same size, white = repaint; must not be empty.
        strength: Denoising strength of this pass (the erase mode passes its own).
        model: The model to use; None: :func:`inpaint_model`.
    """
    spec = ctx.spec
    parameters: dict[str, object] = {}
    if model is None:
        model, parameters = inpaint_model(ctx)
    alpha = overlay_alpha(mask, spec.mask_blur)
    box = only_masked_box(alpha, spec.masked_padding, image.width, image.height) if spec.only_masked else None
    work_image, work_mask = image, mask
    if box is not None:
        log.debug("only masked: generating %s at %dx%d", box, image.width, image.height)
        work_image = image.crop(box).resize(image.size, Image.Resampling.LANCZOS)
        work_mask = binarise(mask.crop(box).resize(image.size, Image.Resampling.BILINEAR))
    arrays = inpaint_arrays(model, spec, work_image, work_mask, strength, ctx.on_step)
    return Inpainted([paste_back(image, out, alpha, box) for out in to_pil(arrays)], parameters)


def fitted_mask(ctx: RunContext) -> Image.Image:
    """The job's mask at the job's size (same resize as the image), binary.

    Raises:
        InvalidRequestError: resizing left nothing of the painted area.
    """
    spec = ctx.spec
    mask = binarise(fitted(ctx.mask_image(), spec))
    if is_empty(mask):
        raise InvalidRequestError(
            f"At {spec.width}×{spec.height} nothing of the mask's white area is left; "
            "paint a larger area or use the fit resize mode."
        )
    return mask


def run(ctx: RunContext) -> RunOutput:
    """The inpaint runner."""
    spec = ctx.spec
    image = fitted(ctx.init_image(), spec)
    result = inpaint_images(ctx, image, fitted_mask(ctx), spec.strength)
    return RunOutput(result.images, result.parameters)
