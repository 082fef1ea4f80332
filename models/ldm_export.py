"""Convert a diffusers Stable Diffusion pipeline to the original LDM / A1111 single-file layout.

The inverse of what :meth:`diffusers.StableDiffusionPipeline.from_single_file` reads: UNet weights under
``model.diffusion_model.``, VAE under ``first_stage_model.``, and the text encoder(s) under
``cond_stage_model.transformer.text_model.`` (SD 1.x) or ``conditioner.embedders.0.transformer.text_model.``
and ``conditioner.embedders.1.model.`` (SDXL, the second one in OpenCLIP's layout). The block indices are
worked out from the state dict itself, so any block count or layers-per-block works, the tiny test models
as well as real SD 1.5 and SDXL.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SD1_TEXT_PREFIX",
    "SDXL_CLIP_G_PREFIX",
    "SDXL_CLIP_L_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "clip_to_ldm",
    "export_to_ldm",
    "open_clip_to_ldm",
    "save_config_dir",
    "save_single_file",
    "unet_to_ldm",
    "vae_to_ldm",
]

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

StateDict = Mapping[str, torch.Tensor]

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _indices(state_dict: StateDict, prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys that start with ``prefix + str(i) + '.'``."""
    found = set()
    for key in state_dict:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _has(state_dict: StateDict, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def _rename_part(rest: str, parts: Mapping[str, str]) -> str:
    """Rename the leading dotted component(s) of ``rest`` using ``parts`` (longest match first)."""
    for old in sorted(parts, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return parts[old] + rest[len(old) :]
    return rest


def _apply_module_map(
    state_dict: StateDict, modules: Mapping[str, tuple[str, Mapping[str, str]]], what: str
) -> dict[str, torch.Tensor]:
    """Move every tensor of each diffusers module prefix to its LDM prefix, renaming leaf parts."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                target, renames = modules[module]
                out[f"{target}.{_rename_part('.'.join(parts[cut:]), renames)}"] = tensor
                break
        else:
            raise ValueError(f"no LDM name for {what} weight {key!r}")
    return out


def unet_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to the LDM ``openaimodel`` layout (no prefix).

    Raises:
        ValueError: a weight has no LDM counterpart (an architecture this converter does not know).
    """
    modules: dict[str, tuple[str, Mapping[str, str]]] = {k: (v, {}) for k, v in _UNET_FIXED.items()}
    index = 1
    down = _indices(state_dict, "down_blocks.")
    for block in down:
        for layer in _indices(state_dict, f"down_blocks.{block}.resnets."):
            modules[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", _UNET_RESNET_PARTS)
            modules[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if _has(state_dict, f"down_blocks.{block}.downsamplers.0."):
            modules[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    middle = 0
    for layer in _indices(state_dict, "mid_block.resnets."):
        modules[f"mid_block.resnets.{layer}"] = (f"middle_block.{middle}", _UNET_RESNET_PARTS)
        middle += 1
        if _has(state_dict, f"mid_block.attentions.{layer}."):
            modules[f"mid_block.attentions.{layer}"] = (f"middle_block.{middle}", {})
            middle += 1
    index = 0
    for block in _indices(state_dict, "up_blocks."):
        layers = _indices(state_dict, f"up_blocks.{block}.resnets.")
        for layer in layers:
            modules[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", _UNET_RESNET_PARTS)
            modules[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
            index += 1
        if _has(state_dict, f"up_blocks.{block}.upsamplers.0."):
            slot = 2 if _has(state_dict, f"up_blocks.{block}.attentions.") else 1
            modules[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", {})
    return _apply_module_map(state_dict, modules, "UNet")


def vae_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the LDM ``autoencoder`` layout (no prefix).

    The mid-block attention projections are linear layers in diffusers and 1×1 convolutions in LDM, so
    their 2-D weights gain two trailing unit dimensions.

    Raises:
        ValueError: a weight has no LDM counterpart.
    """
    modules: dict[str, tuple[str, Mapping[str, str]]] = {
        name: (name, {}) for name in ("quant_conv", "post_quant_conv")
    }
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            modules[f"{part}.{name}"] = (f"{part}.{name}", {})
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        mid = f"{part}.mid_block"
        for layer in _indices(state_dict, f"{mid}.resnets."):
            modules[f"{mid}.resnets.{layer}"] = (f"{part}.mid.block_{layer + 1}", _VAE_RESNET_PARTS)
        for layer in _indices(state_dict, f"{mid}.attentions."):
            modules[f"{mid}.attentions.{layer}"] = (f"{part}.mid.attn_{layer + 1}", _VAE_ATTENTION_PARTS)
    for block in _indices(state_dict, "encoder.down_blocks."):
        for layer in _indices(state_dict, f"encoder.down_blocks.{block}.resnets."):
            modules[f"encoder.down_blocks.{block}.resnets.{layer}"] = (
                f"encoder.down.{block}.block.{layer}",
                _VAE_RESNET_PARTS,
            )
        downsampler = f"encoder.down_blocks.{block}.downsamplers.0.conv"
        modules[downsampler] = (f"encoder.down.{block}.downsample.conv", {})
    up_blocks = _indices(state_dict, "decoder.up_blocks.")
    for block in up_blocks:
        level = len(up_blocks) - 1 - block  # LDM numbers decoder levels from the highest resolution
        for layer in _indices(state_dict, f"decoder.up_blocks.{block}.resnets."):
            modules[f"decoder.up_blocks.{block}.resnets.{layer}"] = (
                f"decoder.up.{level}.block.{layer}",
                _VAE_RESNET_PARTS,
            )
        modules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    out = _apply_module_map(state_dict, modules, "VAE")
    for key, tensor in out.items():
        if ".mid.attn_" in key and key.endswith(".weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def _strip_text_model(key: str) -> str:
    return key.removeprefix("text_model.")


def clip_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Rename a transformers ``CLIPTextModel`` state dict to the keys under ``...transformer.text_model.``.

    Both the flat (transformers ≥ 5.6) and the ``text_model.``-wrapped layouts are accepted.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("text_projection."):
            raise ValueError("a CLIP text model with a projection belongs in the OpenCLIP slot")
        out[_strip_text_model(key)] = tensor
    return out


def open_clip_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPTextModelWithProjection`` state dict to OpenCLIP's layout (no prefix).

    Query, key and value projections are fused into ``attn.in_proj_weight``/``in_proj_bias`` and the
    projection is stored transposed, as ``text_projection`` (width × projection).

    Raises:
        ValueError: a weight has no OpenCLIP counterpart.
    """
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for full_key, tensor in state_dict.items():
        if full_key == "text_projection.weight":
            out["text_projection"] = tensor.T
            continue
        key = _strip_text_model(full_key)
        if key in fixed:
            out[fixed[key]] = tensor
            continue
        parts = key.split(".")
        if key.startswith("encoder.layers.") and len(parts) >= 5 and parts[2].isdigit():
            layer, rest = int(parts[2]), ".".join(parts[3:])
            if rest.startswith("self_attn.") and parts[4] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((layer, parts[-1]), {})[parts[4][0]] = tensor
                continue
            renamed = _rename_part(rest, _OPEN_CLIP_LAYER_PARTS)
            if renamed != rest:
                out[f"transformer.resblocks.{layer}.{renamed}"] = tensor
                continue
        raise ValueError(f"no OpenCLIP name for text encoder weight {full_key!r}")
    for (layer, kind), parts_qkv in sorted(qkv.items()):
        if set(parts_qkv) != {"q", "k", "v"}:
            raise ValueError(f"text encoder layer {layer} lacks one of its q/k/v {kind}s")
        fused = torch.cat([parts_qkv["q"], parts_qkv["k"], parts_qkv["v"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return out


def _prefixed(prefix: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def export_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """Build the single-file (LDM / A1111) state dict of a diffusers SD 1.x or SDXL pipeline.

    Args:
        pipe: A pipeline with ``unet``, ``vae`` and ``text_encoder`` (plus ``text_encoder_2`` for SDXL).

    Returns:
        The tensors under their original names; views of the pipeline's weights, not copies.

    Raises:
        ValueError: the pipeline has an architecture this converter does not know.
    """
    state: dict[str, torch.Tensor] = {}
    state.update(_prefixed(UNET_PREFIX, unet_to_ldm(pipe.unet.state_dict())))
    state.update(_prefixed(VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict())))
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    if text_encoder_2 is None:
        state.update(_prefixed(SD1_TEXT_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict())))
    else:
        if pipe.text_encoder is None:
            raise ValueError("SDXL pipelines without their first text encoder are not supported")
        state.update(_prefixed(SDXL_CLIP_L_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict())))
        state.update(_prefixed(SDXL_CLIP_G_PREFIX, open_clip_to_ldm(text_encoder_2.state_dict())))
    return state


def save_single_file(
    pipe: Any,
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``pipe`` as one A1111-style ``.safetensors`` checkpoint.

    Args:
        pipe: An SD 1.x or SDXL diffusers pipeline.
        path: Where to write; parent folders are created.
        dtype: Cast floating-point weights to this dtype (e.g. ``torch.float16``); ``None`` keeps them.
        metadata: Extra string metadata for the safetensors header (``format: pt`` is always set).

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    tensors = {}
    for key, tensor in export_to_ldm(pipe).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={**(metadata or {}), "format": "pt"})
    log.info("wrote single-file checkpoint %s (%d tensors)", path.name, len(tensors))
    return path


def save_config_dir(pipe: Any, directory: Path) -> Path:
    """Write a diffusers config folder for ``pipe`` without any weights.

    The folder (``model_index.json`` and one sub-folder per component, tokenizers included) is what
    :func:`models.single_file.load_single_file` accepts as ``config_dir``, or as a ``<stem>.config``
    folder beside a checkpoint.

    Returns:
        ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_config(str(directory))
    for name, component in pipe.components.items():
        if component is None:
            continue
        target = directory / name
        if hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(str(target))
        elif hasattr(component, "config") and hasattr(component.config, "save_pretrained"):
            component.config.save_pretrained(str(target))  # transformers models
        elif hasattr(component, "save_pretrained"):  # tokenizers, feature extractors
            component.save_pretrained(str(target))
        else:
            raise ValueError(f"cannot write a config for pipeline component {name!r}")
    return directory
