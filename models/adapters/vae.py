"""Users' VAEs: recognise the ldm single-file and diffusers layouts, check every shape, swap for one job.

SD 1.x and SDXL VAEs have the same shapes (4 latent channels), so a VAE file cannot tell which family it
was trained for: the caller names the family, and the file is checked against that pipeline's VAE config.
A file is accepted in the ldm layout (``encoder.down.0.block.0.norm1.weight``, ``quant_conv``, ...,
optionally under ``first_stage_model.`` or ``vae.``) or diffusers' (``encoder.down_blocks.0.resnets.0...``,
including the old ``query``/``key``/``value``/``proj_attn`` attention names). Training leftovers
(``model_ema.*``, the ``loss.*`` discriminator) are ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from models.adapters.base import AssetInfo
from models.families import Family, family_info
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

__all__ = ["VaeSwap", "default_vae_config", "inspect_vae", "load_vae", "swap_vae"]

log = logging.getLogger(__name__)

_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
_PREFIXES = ("first_stage_model.", "vae.")
_IGNORED = ("model_ema.", "loss.")
#: Keys of a whole checkpoint (UNet, text encoders): such a file is not a VAE.
_CHECKPOINT = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_LATENT_KEY = "decoder.conv_in.weight"


def default_vae_config(family: Family) -> dict[str, Any]:
    """The VAE config of the family's reference model (``models/configs/<family>/vae/config.json``)."""
    path = _CONFIGS / str(family) / "vae" / "config.json"
    with path.open(encoding="utf-8") as fh:
        config: dict[str, Any] = json.load(fh)
    return config


def _layout(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "ldm"
    return None


def _strip(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, int] | None:
    """The VAE's own weights without prefix or training leftovers, the layout, and how many were ignored."""
    if any(k.startswith(_CHECKPOINT) for k in tensors):
        return None
    kept = {k: v for k, v in tensors.items() if not k.startswith(_IGNORED)}
    ignored = len(tensors) - len(kept)
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in kept):
            if not all(k.startswith(prefix) for k in kept):
                raise InvalidRequestError(
                    "This VAE file mixes VAE weights with other weights; upload the VAE alone."
                )
            kept = {k.removeprefix(prefix): v for k, v in kept.items()}
            break
    layout = _layout(kept)
    if layout is None:
        return None
    return kept, layout, ignored


def _refuse_shapes(label: str) -> InvalidRequestError:
    return InvalidRequestError(f"This VAE's layer shapes do not match the {label} VAE this server uses.")


def _latent_channels(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], label: str) -> int:
    tensor = weights.get(_LATENT_KEY)
    if tensor is None or tensor.ndim != 4:
        raise InvalidRequestError("This VAE file is incomplete: it has no decoder input layer.")
    channels = int(tensor.shape[1])
    if channels == 16:
        raise InvalidRequestError(
            "This VAE is for SD3 or Flux (16 latent channels); SD 1.5 and SDXL models use 4-channel VAEs."
        )
    if channels != int(config.get("latent_channels", 4)):
        raise InvalidRequestError(
            f"This VAE has {channels} latent channels; the {label} VAE this server uses has "
            f"{config.get('latent_channels', 4)}."
        )
    return channels


def _to_diffusers(
    weights: dict[str, torch.Tensor], layout: str, config: Mapping[str, Any], label: str
) -> dict[str, torch.Tensor]:
    if layout == "ldm":
        converted: dict[str, torch.Tensor] = convert_ldm_vae_checkpoint(weights, dict(config))
        if len(converted) != len(weights):
            raise _refuse_shapes(label)
        return converted
    renamed = {}
    for key, tensor in weights.items():
        for old, new in _OLD_ATTENTION.items():
            key = key.replace(old, new)
        renamed[key] = tensor
    return renamed


def _meta_vae(config: Mapping[str, Any]) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL.from_config(dict(config))


def _check_shapes(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], label: str) -> None:
    expected = {k: tuple(v.shape) for k, v in _meta_vae(config).state_dict().items()}
    for key, tensor in weights.items():
        if expected.get(key) != tuple(tensor.shape) or not tensor.is_floating_point():
            log.info("VAE weight %s has shape %s, expected %s", key, tuple(tensor.shape), expected.get(key))
            raise _refuse_shapes(label)
    missing = expected.keys() - weights.keys()
    if missing:
        log.info("VAE file lacks %d weights, e.g. %s", len(missing), sorted(missing)[0])
        raise InvalidRequestError(
            f"This VAE file is incomplete: it lacks {len(missing)} of the VAE's weights."
        )


def _normalize(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], label: str
) -> tuple[dict[str, torch.Tensor], str, int] | None:
    """diffusers-named, shape-checked weights, the file's layout and the ignored count; None if no VAE."""
    stripped = _strip(tensors)
    if stripped is None:
        return None
    weights, layout, ignored = stripped
    _latent_channels(weights, config, label)
    converted = _to_diffusers(weights, layout, config, label)
    _check_shapes(converted, config, label)
    return converted, layout, ignored


def inspect_vae(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    family: Family,
    config: Mapping[str, Any] | None = None,
    label: str | None = None,
) -> AssetInfo | None:
    """Recognise a VAE and check every tensor's shape against the target pipeline's VAE.

    Args:
        tensors: The file's tensors.
        metadata: The safetensors ``__metadata__`` (unused: VAE files carry nothing we rely on).
        family: The family of the model it is meant for, reported as the VAE's family.
        config: The target VAE's config (``pipe.vae.config``, or a model target's ``vae``); default, the
            family's reference config.
        label: How refusals name the model (``the shapes model``); default, the family's label.

    Returns:
        The info (details: ``latent_channels``, ``tensors``, ``ignored`` training leftovers, ``dtype``), or
        None when this is not a VAE (no encoder/decoder blocks, or a whole checkpoint).

    Raises:
        InvalidRequestError: A VAE that does not fit: 16 latent channels (SD3/Flux), other shapes, missing
            or extra weights.
    """
    config = config if config is not None else default_vae_config(family)
    label = label or family_info(family).label
    normalized = _normalize(tensors, config, label)
    if normalized is None:
        return None
    weights, layout, ignored = normalized
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    details = {
        "latent_channels": int(weights[_LATENT_KEY].shape[1]),
        "tensors": len(weights),
        "ignored": ignored,
        "dtype": "/".join(dtypes),
    }
    return AssetInfo(kind=AssetKind.VAE, format=layout, family=family, details=details)


def load_vae(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Build an ``AutoencoderKL`` with ``config`` (the target pipeline's) from a VAE file's tensors.

    Args:
        state_dict: The file's tensors, in either layout (ldm names are converted).
        config: The target VAE's config, e.g. ``pipe.vae.config``.
        dtype: The weights' dtype (the file's own is often float16).

    Returns:
        The VAE on the CPU in eval mode; :func:`swap_vae` moves it to the pipeline's device and dtype.

    Raises:
        InvalidRequestError: Not a VAE, or one that does not fit ``config``.
    """
    normalized = _normalize(state_dict, config, "model's")
    if normalized is None:
        raise InvalidRequestError("This file is not a VAE; upload a VAE's .safetensors file.")
    weights, _, _ = normalized
    vae = _meta_vae(config)
    vae.load_state_dict({k: v.detach().to(dtype).contiguous() for k, v in weights.items()}, assign=True)
    return vae.eval().requires_grad_(False)


class VaeSwap:
    """A VAE put into pipelines for one job; :meth:`restore` (idempotent, or the ``with`` exit) undoes it."""

    def __init__(self, pipes: Iterable[Any], vae: AutoencoderKL) -> None:
        self._saved: list[tuple[Any, Any]] = [(pipe, pipe.vae) for pipe in pipes]
        if self._saved:
            original = self._saved[0][1]
            vae.to(device=original.device, dtype=original.dtype)
        for pipe, _ in self._saved:
            pipe.vae = vae

    def restore(self) -> None:
        for pipe, original in self._saved:
            pipe.vae = original
        self._saved = []

    def __enter__(self) -> VaeSwap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def swap_vae(pipes: Iterable[Any], vae: AutoencoderKL) -> VaeSwap:
    """Set ``vae`` on every pipeline given (a base and its ``from_pipe`` children) until ``restore()``.

    The VAE is moved to the device and dtype of the first pipeline's own VAE.
    """
    return VaeSwap(pipes, vae)
