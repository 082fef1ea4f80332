"""Cheap live previews: a linear map from latent channels to RGB, no VAE decode.

This is AUTOMATIC1111's "Approx cheap" live preview (``sd_vae_approx.cheap_approximation``; ComfyUI calls
the same kind of numbers ``latent_rgb_factors``). Stock SD VAEs use the published per-family tables; any
other VAE (the built-in shapes model's, the tiny random ones, custom VAEs) gets a map fitted to it by
least squares on a few synthetic images.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from models.families import Family

if TYPE_CHECKING:
    from models.cache import LoadedModel

__all__ = [
    "SD15_FACTORS",
    "SDXL_FACTORS",
    "RgbFactors",
    "factors_for_vae",
    "fit_rgb_factors",
    "latents_to_preview",
    "rgb_factors_for",
    "stock_factors",
]

log = logging.getLogger(__name__)

Rgb = tuple[float, float, float]


@dataclass(frozen=True)
class RgbFactors:
    """``rgb = latent_pixel @ weights + bias`` (one weights row per latent channel), in [-1, 1]-ish units."""

    weights: tuple[Rgb, ...]
    bias: Rgb
    source: str


# From AUTOMATIC1111/stable-diffusion-webui, modules/sd_vae_approx.py, cheap_approximation() (commit 326c869);
# SD 1.x/2.x rows originally from discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2.
SD15_FACTORS = RgbFactors(
    weights=((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    bias=(0.0, 0.0, 0.0),
    source="webui SD 1.x table",
)
SDXL_FACTORS = RgbFactors(
    weights=(
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    ),
    bias=(0.0, 0.0, 0.0),
    source="webui SDXL table",
)
_TABLES = {Family.sd15: (SD15_FACTORS, 0.18215), Family.sdxl: (SDXL_FACTORS, 0.13025)}
_STOCK_BLOCKS = (128, 256, 512, 512)


def stock_factors(vae_config: Any, family: Family) -> RgbFactors | None:
    """The family's published table if the VAE is a stock-size SD VAE in that family's latent space."""
    table, scaling = _TABLES[family]
    stock = (
        vae_config.latent_channels == 4
        and tuple(vae_config.block_out_channels) == _STOCK_BLOCKS
        and abs(float(vae_config.scaling_factor) - scaling) < 1e-4
        and getattr(vae_config, "shift_factor", None) is None
        and getattr(vae_config, "latents_mean", None) is None
    )
    return table if stock else None


def _reference_images(block: int) -> torch.Tensor:
    """27×3×4b×4b solid images in [0, 1]: the {0, ½, 1}³ grid of colours, four latent pixels wide.

    Solids give clean (latent pixel, colour) pairs. Colour blocks and gradients were tried too: on the
    shapes model's generations they made the fitted previews slightly worse (their boundary latents mix
    colours), and each extra image costs an encoder pass.
    """
    levels = torch.tensor([0.0, 0.5, 1.0])
    palette = torch.cartesian_prod(levels, levels, levels)
    return palette[:, :, None, None].expand(-1, -1, 4 * block, 4 * block).contiguous()


def _unet_space(mean: torch.Tensor, config: Any) -> torch.Tensor:
    """Posterior means -> the latent space the UNet works in (as diffusers pipelines scale them)."""
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        lm = torch.tensor(config.latents_mean, dtype=mean.dtype).view(1, -1, 1, 1)
        ls = torch.tensor(config.latents_std, dtype=mean.dtype).view(1, -1, 1, 1)
        return (mean - lm) * float(config.scaling_factor) / ls
    shift = getattr(config, "shift_factor", None) or 0.0
    return (mean - float(shift)) * float(config.scaling_factor)


@torch.no_grad()
def fit_rgb_factors(vae: Any) -> RgbFactors:
    """Least-squares linear map from ``vae``'s (UNet-space) latent pixels to their blocks' mean RGB.

    Encodes 27 small solid-colour images (posterior means, scaled as the UNet sees them) and solves for the
    weights and bias; the VAE's weights and mode are left as they are.
    """
    block = 2 ** (len(vae.config.block_out_channels) - 1)
    param = next(vae.parameters())
    images = _reference_images(block)
    mean = vae.encode((images * 2 - 1).to(param.device, param.dtype)).latent_dist.mean
    z = _unet_space(mean.detach().to("cpu", torch.float64), vae.config)
    x = _pixels(torch.cat([z, torch.ones_like(z[:, :1])], dim=1))  # the last column fits the bias
    y = _pixels(F.avg_pool2d(images.double() * 2 - 1, block))  # each latent pixel's block, in [-1, 1]
    solution = torch.linalg.lstsq(x, y).solution  # (C+1)×3
    rows = solution.tolist()
    weights = tuple(_rgb(r) for r in rows[:-1])
    return RgbFactors(weights=weights, bias=_rgb(rows[-1]), source="fitted to this VAE")


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """B×C×h×w -> (B·h·w)×C."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _rgb(row: list[float]) -> Rgb:
    return (float(row[0]), float(row[1]), float(row[2]))


def factors_for_vae(vae: Any, family: Family) -> RgbFactors:
    """The published table for a stock SD VAE of ``family``, else a map fitted to ``vae``."""
    table = stock_factors(vae.config, family)
    if table is not None:
        return table
    fitted = fit_rgb_factors(vae)
    if not all(math.isfinite(v) for row in (*fitted.weights, fitted.bias) for v in row):
        fallback = _TABLES[family][0]
        log.warning("preview colours: the fit gave non-finite numbers; using the %s", fallback.source)
        return fallback
    return fitted


_lock = threading.Lock()
# id(model) -> (weak reference to the model, id of its VAE when fitted, factors)
_cache: dict[int, tuple[weakref.ref[LoadedModel], int, RgbFactors]] = {}


def rgb_factors_for(model: LoadedModel) -> RgbFactors:
    """The preview factors for a loaded model, cached per model object (refitted if its VAE is swapped)."""
    key, vae = id(model), model.base.vae
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is model and hit[1] == id(vae):
            return hit[2]
        factors = factors_for_vae(vae, model.family)
        log.debug("preview factors for %s: %s", model.entry.name, factors.source)
        _cache[key] = (weakref.ref(model, lambda _: _forget(key)), id(vae), factors)
        return factors


def _forget(key: int) -> None:
    _cache.pop(key, None)  # no lock: a weakref callback may run while this thread holds it


def latents_to_preview(
    latents: torch.Tensor, factors: RgbFactors, *, max_side: int = 256, vae_scale: int = 8
) -> list[Image.Image]:
    """One RGB preview per batch row of ``latents`` (B×C×h×w, UNet space, any dtype or device).

    The longer side is at most ``max_side`` and at most the final image's (``vae_scale`` × latent side).
    """
    if latents.ndim != 4 or latents.shape[1] != len(factors.weights):
        raise ValueError(f"expected B×{len(factors.weights)}×h×w latents, got {tuple(latents.shape)}")
    x = latents.detach().to("cpu", torch.float32)
    weights = torch.tensor(factors.weights, dtype=torch.float32)
    bias = torch.tensor(factors.bias, dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->bhwr", x, weights) + bias
    pixels = (((rgb + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    h, w = x.shape[2:]
    scale = min(max_side / max(h, w), float(vae_scale))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.BILINEAR
    return [Image.fromarray(p).resize(size, resample) for p in pixels]
