"""The webui ``parameters`` text of one output image, for every mode.

Keys and their order follow AUTOMATIC1111 (``Denoising strength``, ``Mask blur``, ``Hires upscale``...),
ControlNet units as its ControlNet extension writes them (``ControlNet 0: "Module: canny, ..."``) and
upscales as its Extras tab does (``Postprocess upscale by``). A runner may add or override keys.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.jobs import AdapterRef, ControlUnit, JobKind, JobSpec
from pipelines.pnginfo import format_parameters

__all__ = ["adapter_keys", "controlnet_unit_text", "webui_parameters"]

_RESIZE_NAMES = {"crop": "Crop and Resize", "fit": "Just Resize", "fill": "Resize and Fill"}


def controlnet_unit_text(unit: ControlUnit, model_name: str, resize_mode: str) -> str:
    """One unit in the ControlNet extension's words (it quotes the whole value)."""
    parts = {
        "Module": unit.type,
        "Model": model_name,
        "Weight": f"{unit.weight:g}",
        "Resize Mode": _RESIZE_NAMES.get(resize_mode, resize_mode),
        "Threshold A": unit.low if unit.type == "canny" else None,
        "Threshold B": unit.high if unit.type == "canny" else None,
        "Guidance Start": f"{unit.start:g}",
        "Guidance End": f"{unit.end:g}",
        "Control Mode": "Balanced",
    }
    return ", ".join(f"{key}: {value}" for key, value in parts.items() if value is not None)


def _mode_keys(spec: JobSpec) -> dict[str, object]:
    keys: dict[str, object] = {}
    with_init = spec.kind == JobKind.controlnet and spec.init_image
    if spec.kind in (JobKind.img2img, JobKind.inpaint) or with_init:
        keys["Denoising strength"] = spec.strength
    if spec.kind == JobKind.inpaint:
        keys["Mask blur"] = spec.mask_blur
        if spec.only_masked:
            keys["Inpaint area"] = "Only masked"
            keys["Masked area padding"] = spec.masked_padding
    if spec.kind == JobKind.erase:
        keys["Erase method"] = "Telea" if spec.erase_method == "telea" else "Navier-Stokes"
        if spec.erase_denoise:
            keys["Denoising strength"] = spec.erase_denoise
    if spec.kind == JobKind.txt2img and spec.hires_scale:
        keys["Denoising strength"] = spec.hires_denoise
        keys["Hires upscale"] = spec.hires_scale
        keys["Hires steps"] = spec.hires_steps or None
        keys["Hires upscaler"] = spec.hires_upscaler
    for index, unit in enumerate(spec.controls):
        keys[f"ControlNet {index}"] = controlnet_unit_text(unit, unit.model or "default", spec.resize_mode)
    return keys


def _weight_text(ref: AdapterRef) -> str:
    return f"{ref.weight:g}"


def adapter_keys(spec: JobSpec) -> dict[str, object]:
    """The webui's keys for the job's adapters.

    ``VAE``/``VAE hash``, ``Lora hashes``, ``TI hashes``, ``Hypernet``/``Hypernet hash``/``Hypernet strength``
    (the ``<lora:...>`` tags stay in the prompt text, as the webui keeps them).
    """
    keys: dict[str, object] = {}
    for vae in spec.adapters_of("vae"):
        keys["VAE hash"] = vae.short_hash[:10]
        keys["VAE"] = vae.name
    loras = spec.adapters_of("lora")
    if loras:
        keys["Lora hashes"] = ", ".join(f"{r.name}: {r.short_hash}" for r in loras)
    embeddings = spec.adapters_of("embedding")
    if embeddings:
        keys["TI hashes"] = ", ".join(f"{r.name}: {r.short_hash}" for r in embeddings)
    hypernets = spec.adapters_of("hypernetwork")
    if hypernets:
        keys["Hypernet"] = ", ".join(r.name for r in hypernets)
        keys["Hypernet hash"] = ", ".join(r.short_hash[:10] for r in hypernets)
        keys["Hypernet strength"] = ", ".join(_weight_text(r) for r in hypernets)
    return keys


def webui_parameters(
    spec: JobSpec,
    seed: int,
    model_name: str | None,
    model_hash: str | None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The A1111 ``parameters`` text for the image of ``spec`` made with ``seed``."""
    if spec.kind == JobKind.upscale:
        extra = dict(extra or {})
        params: dict[str, object] = {
            # a prompt-guided x4 upscale is seeded (its runner reports a noise level); a GAN's is not
            "Seed": seed if "Noise level" in extra else None,
            "Postprocess upscale by": spec.scale,
            "Postprocess upscaler": spec.upscaler,
            "Size": "{}x{}".format(*spec.output_size),
        }
        params.update(extra)
        return format_parameters(spec.prompt, spec.negative_prompt, params)
    width, height = spec.output_size
    params = {
        "Steps": spec.steps,
        "Sampler": spec.sampler,
        "CFG scale": spec.cfg,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash[:10] if model_hash else None,
        "Model": model_name,
        "Clip skip": spec.clip_skip if spec.clip_skip > 1 else None,
    }
    params.update(adapter_keys(spec))
    params.update(_mode_keys(spec))
    params.update(extra or {})
    return format_parameters(spec.prompt, spec.negative_prompt, params)
