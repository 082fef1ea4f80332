"""The layers a LoRA may target in each family, with their real widths, under every name LoRA tools use.

The tables are read off a model target's configs (SD 1.5's and SDXL's own in ``models/configs`` for the
canonical ones, a served model's for a custom one, see :mod:`models.adapters.targets`) by building the UNet
and text encoders on the meta device, which allocates nothing. Each Linear/Conv2d layer is listed once, as a
:class:`LayerTarget`, and can be found by its diffusers path or by a kohya name: diffusers-style
(``lora_unet_down_blocks_0_...``, what kohya writes for SD 1.x) or SGM/LDM-style
(``lora_unet_input_blocks_4_1_...``, what kohya writes for SDXL); text encoders as
``lora_te_``/``lora_te1_``/``lora_te2_`` + ``text_model_...``.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from models.adapters.targets import ModelTarget, canonical_target
from models.families import Family

__all__ = [
    "TEXT_COMPONENTS",
    "LayerTable",
    "LayerTarget",
    "layer_table",
    "layer_table_for",
    "sgm_unet_name",
]

log = logging.getLogger(__name__)

#: Text encoder components, in kohya's order (``lora_te``/``lora_te1`` first, ``lora_te2`` second).
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")

_KOHYA_TEXT_PREFIX = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_SDXL_KOHYA_TEXT_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_RESNET_SGM = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


@dataclass(frozen=True)
class LayerTarget:
    """One Linear or Conv2d layer of a family's model.

    Attributes:
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        module: Its path inside the component, diffusers spelling; text encoder paths without ``text_model.``.
        in_features: Input width (channels for a convolution).
        out_features: Output width.
        kernel: The convolution kernel, ``None`` for a Linear layer.
    """

    component: str
    module: str
    in_features: int
    out_features: int
    kernel: tuple[int, int] | None = None

    @property
    def flat_in(self) -> int:
        """Input width times the kernel area: the second dimension of the flattened weight."""
        return self.in_features * (math.prod(self.kernel) if self.kernel else 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *(self.kernel or ()))


@dataclass(frozen=True)
class LayerTable:
    """Every LoRA-targetable layer of one family.

    Attributes:
        family: The family.
        modules: ``(component, module)`` to the layer.
        aliases: Every kohya name (``lora_unet_...``, ``lora_te_...``) to the layer.
        attention_blocks: The UNet's transformer blocks in the order old diffusers registered them (down
            blocks, up blocks, then the middle block), as cloneofsimo files number their layers.
        text_layers: Number of encoder layers of each text encoder.
    """

    family: Family
    modules: dict[tuple[str, str], LayerTarget]
    aliases: dict[str, LayerTarget]
    attention_blocks: tuple[str, ...]
    text_layers: dict[str, int]


def _targets(component: str, model: torch.nn.Module) -> Iterator[LayerTarget]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield LayerTarget(
                component, name.removeprefix("text_model."), module.in_features, module.out_features
            )
        elif isinstance(module, torch.nn.Conv2d):
            kernel = (int(module.kernel_size[0]), int(module.kernel_size[1]))
            yield LayerTarget(component, name, module.in_channels, module.out_channels, kernel)


def _meta_models(target: ModelTarget) -> dict[str, Any]:
    """The target's UNet and text encoders on the meta device (shapes only, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(dict(target.unet)),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(dict(target.text_encoder))),
        }
        if target.text_encoder_2 is not None:
            config_2 = CLIPTextConfig.from_dict(dict(target.text_encoder_2))
            models["text_encoder_2"] = CLIPTextModelWithProjection(config_2)
    return models


def sgm_unet_name(module: str, layers_per_block: int, up_blocks_with_attention: frozenset[int]) -> str | None:
    """A diffusers UNet path in the original (SGM/LDM) spelling, or ``None`` where it has none.

    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``;
    ``up_blocks.0.resnets.2.conv1`` -> ``output_blocks.2.0.in_layers.2``.
    """
    if module in _TOP_LEVEL_SGM:
        return _TOP_LEVEL_SGM[module]
    parts = module.split(".")
    step = layers_per_block + 1
    if parts[0] == "mid_block" and len(parts) > 3:
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get((parts[1], parts[2]))
        head, rest = (f"middle_block.{index}", parts[3:]) if index is not None else (None, [])
        kind = parts[1]
    elif parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4:
        block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        head = _block_head(parts[0], block, kind, layer, step, block in up_blocks_with_attention)
    else:
        return None
    if head is None:
        return None
    if kind == "resnets":
        inner = _RESNET_SGM.get(".".join(rest))
        return f"{head}.{inner}" if inner else None
    if kind in ("downsamplers", "upsamplers"):
        return head if rest == ["conv"] else None
    return f"{head}.{'.'.join(rest)}"


def _block_head(
    side: str, block: int, kind: str, layer: int, step: int, up_has_attention: bool
) -> str | None:
    inner = {"resnets": 0, "attentions": 1}.get(kind)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * step}.0.op"
        return f"input_blocks.{1 + block * step + layer}.{inner}" if inner is not None else None
    if kind == "upsamplers":
        return f"output_blocks.{block * step + step - 1}.{2 if up_has_attention else 1}.conv"
    return f"output_blocks.{block * step + layer}.{inner}" if inner is not None else None


def _kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _unet_aliases(unet: Any, targets: list[LayerTarget]) -> dict[str, LayerTarget]:
    config = unet.config
    up_with_attention = frozenset(i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind)
    aliases: dict[str, LayerTarget] = {}
    for target in targets:
        aliases[_kohya("lora_unet", target.module)] = target
        sgm = sgm_unet_name(target.module, int(config.layers_per_block), up_with_attention)
        if sgm is not None:
            aliases[_kohya("lora_unet", sgm)] = target
    return aliases


def _text_alias_path(module: str) -> str:
    return module if module.startswith("text_projection") else f"text_model.{module}"


_CUSTOM_TABLES: dict[tuple[str, int], LayerTable] = {}
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks|mid_block)\..*\.transformer_blocks\.\d+$")


def _attention_blocks(unet: torch.nn.Module) -> tuple[str, ...]:
    blocks = [name for name, _ in unet.named_modules() if _BLOCK_RE.match(name)]
    order = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    return tuple(sorted(blocks, key=lambda name: order[name.split(".")[0]]))


@functools.cache
def layer_table(family: Family) -> LayerTable:
    """The layer table of a family's canonical shapes (built once per process, well under a second)."""
    return _build_table(canonical_target(Family(family)))


def layer_table_for(target: ModelTarget) -> LayerTable:
    """The layer table of a model target: the family's own for a canonical one, else built from the
    target's component configs (once per set of shapes and input channels)."""
    if target.canonical:
        return layer_table(target.family)
    cache_key = (target.key, int(target.unet.get("in_channels", 4)))  # the key leaves in_channels out
    table = _CUSTOM_TABLES.get(cache_key)
    if table is None:
        table = _CUSTOM_TABLES[cache_key] = _build_table(target)
    return table


def _build_table(target: ModelTarget) -> LayerTable:
    family = target.family
    models = _meta_models(target)
    text_prefix = _SDXL_KOHYA_TEXT_PREFIX if family == Family.sdxl else _KOHYA_TEXT_PREFIX
    modules: dict[tuple[str, str], LayerTarget] = {}
    aliases: dict[str, LayerTarget] = {}
    text_layers: dict[str, int] = {}
    for component, model in models.items():
        targets = list(_targets(component, model))
        modules.update({(t.component, t.module): t for t in targets})
        if component == "unet":
            aliases.update(_unet_aliases(model, targets))
        else:
            text_layers[component] = int(model.config.num_hidden_layers)
            prefix = text_prefix[component]
            aliases.update({_kohya(prefix, _text_alias_path(t.module)): t for t in targets})
    log.debug("LoRA layer table for %s: %d layers, %d names", target.name, len(modules), len(aliases))
    return LayerTable(family, modules, aliases, _attention_blocks(models["unet"]), text_layers)
