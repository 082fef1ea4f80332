"""ControlNet mode: one or several control images steer txt2img (or img2img when the job has an init image).

Each unit's stored control image is resized to the output size (the job's resize mode), turned into its map
(:mod:`pipelines.preprocess`) and fed to its ControlNet; several units run as diffusers' MultiControlNet,
each with its own weight and guidance start/end. The ControlNet pipeline is made once per model and
pipeline class from the model's components (``from_pipe``: nothing is copied) and kept with the model;
each job sets its ControlNet(s) and scheduler on it. ControlNets load through the job's
:class:`~pipelines.modes.ExtraCache`, at the model's device and dtype. The maps come back as previews.
Blocking: call only on the worker thread.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from models.cache import LoadedModel
from models.extras import ExtraEntry
from models.families import Family
from models.registry import file_sha256
from pipelines.conditioning import conditioned
from pipelines.image_to_image import progress_callback
from pipelines.images import ResizeMode, resize_to
from pipelines.jobs import ControlUnit, JobSpec
from pipelines.modes import RunContext, RunOutput
from pipelines.parameters import controlnet_unit_text
from pipelines.preprocess import preprocess
from pipelines.samplers import make_scheduler
from pipelines.text_to_image import generators_for, to_pil
from storage.errors import GenerationError, IncompatibleAssetError, InvalidRequestError, NotFoundError

__all__ = [
    "PIPELINE_CLASSES",
    "control_maps",
    "controlnet_hash",
    "controlnet_pipeline",
    "load_controlnet",
    "run",
]

log = logging.getLogger(__name__)

#: (family, with an init image) -> the diffusers pipeline class.
PIPELINE_CLASSES: dict[tuple[Family, bool], str] = {
    (Family.sd15, False): "StableDiffusionControlNetPipeline",
    (Family.sd15, True): "StableDiffusionControlNetImg2ImgPipeline",
    (Family.sdxl, False): "StableDiffusionXLControlNetPipeline",
    (Family.sdxl, True): "StableDiffusionXLControlNetImg2ImgPipeline",
}
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
_hash_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}


# --- loading ----------------------------------------------------------------------------------------


def _sidecar_config(path: Path) -> Path:
    """``<stem>.config/`` beside a single-file ControlNet: the folder holding its diffusers config.json."""
    return path.with_name(path.stem + ".config")


def _read_controlnet(entry: ExtraEntry, dtype: torch.dtype) -> ControlNetModel:
    path = entry.path
    if path.is_dir():
        return ControlNetModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    if path.suffix != ".safetensors":
        raise IncompatibleAssetError(
            f"The ControlNet {entry.name!r} is not a .safetensors file or a diffusers folder; "
            "ask an admin to convert it."
        )
    config = _sidecar_config(path)
    if not (config / "config.json").is_file():
        # from_single_file would fetch the config from the Hugging Face hub; the bot stays offline.
        raise IncompatibleAssetError(
            f"The ControlNet {entry.name!r} is a single file with no config beside it, so it cannot be "
            f"loaded offline; ask an admin to add its config.json in a {config.name!r} folder next to it."
        )
    return ControlNetModel.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True)


def load_controlnet(entry: ExtraEntry, device: torch.device, dtype: torch.dtype) -> ControlNetModel:
    """Load a ControlNet folder, or a single ``.safetensors`` file with a ``<stem>.config/`` folder beside it.

    Raises:
        IncompatibleAssetError: a format that cannot be loaded offline.
        GenerationError: the files are missing or damaged.
    """
    log.info("loading ControlNet %s on %s/%s", entry.name, device, dtype)
    try:
        controlnet = _read_controlnet(entry, dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        log.exception("could not load the ControlNet %s", entry.name)
        raise GenerationError(
            f"The ControlNet {entry.name!r} could not be loaded; its files may be missing or damaged, "
            "so ask an admin to check it."
        ) from exc
    controlnet.to(device)
    controlnet.eval()
    return controlnet


def controlnet_hash(entry: ExtraEntry) -> str | None:
    """sha256 of the ControlNet's weights file (cached by path, size and mtime); None if there is none."""
    path = entry.path
    if path.is_dir():
        path = next((path / name for name in _WEIGHT_FILES if (path / name).is_file()), path)
    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        cached = _hashes.get(key)
    if cached is None:
        cached = file_sha256(path)
        with _hash_lock:
            _hashes[key] = cached
    return cached


def _entry(ctx: RunContext, unit: ControlUnit) -> ExtraEntry:
    entry = ctx.extras.registry.get_controlnet(unit.model or "")
    if entry is None:
        raise NotFoundError(f"The ControlNet {unit.model!r} is no longer installed; pick another one.")
    return entry


def _check_fits(controlnet: ControlNetModel, name: str, model: LoadedModel) -> None:
    """Refuse a ControlNet whose residuals cannot be added to this model's UNet (another family or base)."""
    unet, net = model.base.unet.config, controlnet.config
    if unet.in_channels != net.in_channels:
        raise IncompatibleAssetError(
            f"The model {model.entry.name!r} is an inpainting model, which ControlNet cannot steer; "
            "pick a regular model."
        )
    fits = (
        unet.cross_attention_dim == net.cross_attention_dim
        and tuple(unet.block_out_channels) == tuple(net.block_out_channels)
        and unet.addition_embed_type == net.addition_embed_type
    )
    if not fits:
        raise IncompatibleAssetError(
            f"The ControlNet {name!r} was made for another kind of model than {model.entry.name!r}; "
            "pick a ControlNet made for it."
        )


# --- the pipeline -----------------------------------------------------------------------------------


def controlnet_pipeline(model: LoadedModel, controlnets: list[ControlNetModel], img2img: bool) -> Any:
    """The model's ControlNet pipeline (txt2img or img2img), made once and kept with the model, set to use
    ``controlnets`` (one, or several as a MultiControlNet)."""
    class_name = PIPELINE_CLASSES[(model.family, img2img)]
    controlnet: ControlNetModel | MultiControlNetModel = (
        controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    )
    pipe = model.by_class.get(class_name)
    if pipe is None:
        cls = getattr(diffusers, class_name)
        # dtype: from_pipe casts every shared component to it (float32 when left out).
        pipe = cls.from_pipe(model.base, controlnet=controlnet, dtype=model.base.dtype)
        pipe.set_progress_bar_config(disable=True)
        model.by_class[class_name] = pipe
    else:
        pipe.controlnet = controlnet
    return pipe


def control_maps(ctx: RunContext) -> list[Image.Image]:
    """Each unit's control image at the output size, then preprocessed into its map (RGB)."""
    spec = ctx.spec
    maps = []
    for unit in spec.controls:
        image = resize_to(ctx.image(unit.image), spec.width, spec.height, ResizeMode(spec.resize_mode))
        maps.append(preprocess(unit.type, image, low=unit.low, high=unit.high))
    return maps


def _unit_values(spec: JobSpec, single: bool) -> dict[str, Any]:
    weights = [float(u.weight) for u in spec.controls]
    starts = [float(u.start) for u in spec.controls]
    ends = [float(u.end) for u in spec.controls]
    if single:
        return {
            "controlnet_conditioning_scale": weights[0],
            "control_guidance_start": starts[0],
            "control_guidance_end": ends[0],
        }
    return {
        "controlnet_conditioning_scale": weights,
        "control_guidance_start": starts,
        "control_guidance_end": ends,
    }


def _init_image(ctx: RunContext) -> Image.Image:
    spec = ctx.spec
    if int(spec.steps * spec.strength) < 1:
        raise InvalidRequestError(
            f"With {spec.steps} steps and denoising strength {spec.strength:g} no step would run; "
            "raise the steps or the strength."
        )
    return resize_to(ctx.init_image(), spec.width, spec.height, ResizeMode(spec.resize_mode))


def _parameters(spec: JobSpec, entries: list[ExtraEntry]) -> dict[str, object]:
    """The webui's ControlNet unit text, with each model's short hash as its extension writes it."""
    params: dict[str, object] = {}
    for index, (unit, entry) in enumerate(zip(spec.controls, entries, strict=True)):
        digest = controlnet_hash(entry)
        name = f"{entry.name} [{digest[:8]}]" if digest else entry.name
        params[f"ControlNet {index}"] = controlnet_unit_text(unit, name, spec.resize_mode)
    return params


def run(ctx: RunContext) -> RunOutput:
    """The controlnet runner: ``spec.batch`` images steered by every unit of ``spec.controls``."""
    spec = ctx.spec
    maps = control_maps(ctx)  # bad control images fail before any model is loaded
    init = _init_image(ctx) if spec.init_image else None
    model = ctx.model()
    device, dtype = model.base.device, model.base.dtype
    entries = [_entry(ctx, unit) for unit in spec.controls]
    nets = []
    for entry in entries:
        net = ctx.extras.get(entry, lambda e: load_controlnet(e, device, dtype), variant=f"{device}/{dtype}")
        _check_fits(net, entry.name, model)
        nets.append(net)
    pipe = controlnet_pipeline(model, nets, img2img=init is not None)
    pipe.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    single = len(nets) == 1
    control_images: Image.Image | list[Image.Image] = maps[0] if single else maps
    images: dict[str, Any] = {"image": control_images}
    if init is not None:
        images = {"image": init, "control_image": control_images, "strength": spec.strength}
    output = pipe(
        **conditioned(model, spec, progress_callback(ctx.on_step)),
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.cfg,
        generator=generators_for(spec),
        output_type="np",
        **images,
        **_unit_values(spec, single),
    )
    labels = [f"control {i + 1}: {unit.type}" for i, unit in enumerate(spec.controls)]
    previews = list(zip(labels, maps, strict=True))
    return RunOutput(to_pil(output.images), _parameters(spec, entries), previews)
