"""GAN upscalers (ESRGAN, Real-ESRGAN, SwinIR, ... whatever spandrel recognises), loaded without pickle.

spandrel 0.4.2's own ``ModelLoader.load_from_file`` reads ``.pth`` with a home-made restricted unpickler
and tries ``.pt`` as TorchScript first (``torch.jit.load``), so files are read here instead: safetensors,
or ``torch.load(weights_only=True)`` (plain tensors and containers only; a pickle that would run code is
refused), and only the state dict is handed to spandrel for architecture detection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError, canonicalize_state_dict

from pipelines.tiling import TileHook, run_tiled
from storage.errors import IncompatibleAssetError

__all__ = [
    "GAN_OVERLAP",
    "GAN_TILE",
    "MAX_PASSES",
    "gan_passes",
    "load_gan",
    "load_state_dict",
    "upscale_array",
    "upscale_with_gan",
]

log = logging.getLogger(__name__)

GAN_TILE = 192  # input pixels per tile side (the webui's ESRGAN default)
GAN_OVERLAP = 16  # input pixels shared by neighbouring tiles
MAX_PASSES = 3  # a 2x model reaches at most 8x, like the webui
_PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def _unreadable(name: str) -> IncompatibleAssetError:
    return IncompatibleAssetError(
        f"The upscaler {name!r} is not a model file I can recognise; pick another upscaler "
        "or ask an admin to replace it."
    )


def load_state_dict(path: Path, name: str) -> dict[str, Any]:
    """The tensors of an upscaler file: safetensors, or a torch file read with ``weights_only=True``.

    Raises:
        IncompatibleAssetError: another kind of file, unreadable, or a pickle that is more than tensors.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            state: object = load_file(str(path), device="cpu")
        elif suffix in _PICKLE_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise _unreadable(name)
    except IncompatibleAssetError:
        raise
    except Exception as exc:  # a damaged file or a forbidden pickle: the user can only pick another
        log.warning("upscaler %s (%s) could not be read: %s", name, path.name, exc)
        raise _unreadable(name) from exc
    if not isinstance(state, Mapping):
        raise _unreadable(name)
    return dict(state)


def _dtype_for(model: ImageModelDescriptor[Any], dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float16 and not model.supports_half:
        return torch.float32
    if dtype == torch.bfloat16 and not model.supports_bfloat16:
        return torch.float32
    return dtype


def load_gan(path: Path, name: str, *, device: torch.device, dtype: torch.dtype) -> ImageModelDescriptor[Any]:
    """A spandrel image model for the upscaler file at ``path``, on ``device`` in eval mode.

    Raises:
        IncompatibleAssetError: spandrel does not recognise it, or it is not an RGB image-to-image model.
    """
    state = canonicalize_state_dict(load_state_dict(path, name))
    try:
        model = ModelLoader(device="cpu").load_from_state_dict(state)
    except UnsupportedModelError as exc:
        raise _unreadable(name) from exc
    except Exception as exc:  # detection code may trip over a state dict it does not expect
        log.warning("spandrel failed on upscaler %s: %r", name, exc)
        raise _unreadable(name) from exc
    if not isinstance(model, ImageModelDescriptor) or model.purpose not in ("SR", "Restoration"):
        raise IncompatibleAssetError(
            f"The model {name!r} is not an image upscaler; pick an ESRGAN-style upscaler instead."
        )
    if model.input_channels != 3 or model.output_channels != 3:
        raise IncompatibleAssetError(
            f"The upscaler {name!r} works on {model.input_channels}-channel images, not RGB; pick another."
        )
    model.to(device=device, dtype=_dtype_for(model, dtype))
    log.info("loaded upscaler %s: %s x%d", name, model.architecture.name, model.scale)
    return model.eval()


def upscale_array(
    model: ImageModelDescriptor[Any],
    image: np.ndarray,
    *,
    tile: int = GAN_TILE,
    overlap: int = GAN_OVERLAP,
    on_tile: TileHook | None = None,
) -> np.ndarray:
    """One pass of ``model`` over ``image`` (float32 H×W×3 in [0, 1]), tiled: (H·s)×(W·s)×3 in [0, 1]."""

    def run_one(piece: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(piece.transpose(2, 0, 1)))[None]
        tensor = tensor.to(device=model.device, dtype=model.dtype)
        out = model(tensor)  # spandrel pads to the model's size needs and clamps to [0, 1]
        return np.asarray(out[0].float().permute(1, 2, 0).cpu().numpy(), dtype=np.float32)

    return run_tiled(image, run_one, scale=model.scale, tile=tile, overlap=overlap, on_tile=on_tile)


def gan_passes(native_scale: int, scale: float) -> int:
    """How many passes of a ``native_scale``× model reach ``scale`` (at least one, at most 3)."""
    passes, reached = 1, float(native_scale)
    while reached < scale - 1e-6 and passes < MAX_PASSES and native_scale > 1:
        passes += 1
        reached *= native_scale
    return passes


def upscale_with_gan(
    model: ImageModelDescriptor[Any],
    image: Image.Image,
    size: tuple[int, int],
    *,
    tile: int = GAN_TILE,
    overlap: int = GAN_OVERLAP,
    on_step: TileHook | None = None,
) -> Image.Image:
    """``image`` upscaled by the model (repeated until it reaches ``size``), then Lanczos to exactly ``size``.

    Args:
        size: The output width and height, pixels.
        on_step: Progress, counted in tiles over all passes.
    """
    scale = max(size[0] / image.width, size[1] / image.height)
    passes = gan_passes(model.scale, scale)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    done_before, per_pass = 0, 0

    def progress(done: int, total: int) -> None:
        nonlocal per_pass
        per_pass = total
        if on_step is not None:
            on_step(done_before + done, total * passes)

    with torch.inference_mode():
        for _ in range(passes):
            array = upscale_array(model, array, tile=tile, overlap=overlap, on_tile=progress)
            done_before += per_pass
    result = Image.fromarray((array * 255.0).round().clip(0, 255).astype(np.uint8))
    if result.size != size:
        result = result.resize(size, Image.Resampling.LANCZOS)
    return result
