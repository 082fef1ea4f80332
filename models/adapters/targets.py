"""The models adapters are checked against: a family's canonical shapes, or a served model's own.

Real SD 1.5 and SDXL checkpoints all share their family's layer shapes (``models/configs/<family>``), so an
adapter that fits the family fits them all: those are the *canonical* targets. A model with other shapes —
the built-in ``shapes`` model is SD 1.5's architecture scaled down (UNet widths 48/96, 64-wide
cross-attention and text encoder) — gets a *custom* target named after it, built from its own component
configs, and adapters made for it are recognised, checked and applied against those.

Two targets are the same when everything that decides a layer's shape or an adapter's widths is: the UNet's
block types and widths, layers per block, attention dims, cross-attention width and extra embeddings; each
text encoder's hidden size, MLP width, layer count and heads; the VAE's blocks, widths and latent channels.
The UNet's ``in_channels`` is left out on purpose: an inpainting UNet (9 input channels) takes the same
adapters as its base model, so ``shapes-inpaint`` shares the ``shapes`` target and a real SD 1.5 inpainting
model is canonical SD 1.5 (an adapter for ``conv_in`` alone is refused when it is applied). The tiny random
``tiny-*`` plumbing models count as their canonical family.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models.families import Family, family_info
from models.registry import ModelEntry, ModelRegistry, SourceKind
from models.single_file import CONFIGS_DIR
from storage.tables import AssetKind

__all__ = [
    "TEXT_ENCODERS",
    "ModelTarget",
    "adapter_fits",
    "canonical_target",
    "fits_model",
    "model_details",
    "model_of",
    "model_target",
    "pipeline_target",
    "served_targets",
    "target_for_attention_widths",
    "target_for_entry",
    "target_for_folder",
    "target_for_text_widths",
]

log = logging.getLogger(__name__)

#: Text encoder components, in order (``text_encoder_2`` only in SDXL-family models).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

_UNET_KEYS = (
    "down_block_types", "up_block_types", "mid_block_type", "block_out_channels", "layers_per_block",
    "cross_attention_dim", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
    "only_cross_attention", "use_linear_projection", "out_channels", "conv_in_kernel", "conv_out_kernel",
    "time_embedding_type", "time_embedding_dim", "time_cond_proj_dim", "resnet_time_scale_shift",
    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "class_embed_type", "num_class_embeds", "class_embeddings_concat", "encoder_hid_dim",
    "encoder_hid_dim_type", "dual_cross_attention", "mid_block_only_cross_attention",
)  # fmt: skip
_PER_BLOCK = (
    "layers_per_block", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
    "transformer_layers_per_block", "only_cross_attention",
)  # fmt: skip
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_VAE_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "latent_channels", "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv",
)  # fmt: skip

Config = Mapping[str, Any]


@dataclass(frozen=True)
class ModelTarget:
    """A set of model shapes adapters are checked against and applied to.

    Attributes:
        name: The model's name for a custom target (the first served model with these shapes); the
            family's label (``SD 1.5``) for a canonical one.
        family: The model family.
        canonical: True when the shapes are the family's own (those of every real checkpoint).
        unet: The UNet's config (what ``UNet2DConditionModel.from_config`` takes).
        text_encoder: The first text encoder's config (``CLIPTextConfig`` fields).
        text_encoder_2: The second text encoder's config (SDXL family), else None.
        vae: The VAE's config, or None when unknown (then the family's reference VAE is assumed).
        key: A digest of the shapes that matter; equal keys take the same adapters. Computed.
    """

    name: str
    family: Family
    canonical: bool
    unet: Config = field(compare=False, repr=False)
    text_encoder: Config = field(compare=False, repr=False)
    text_encoder_2: Config | None = field(default=None, compare=False, repr=False)
    vae: Config | None = field(default=None, compare=False, repr=False)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _digest(self.signature()))

    def signature(self) -> dict[str, Any]:
        """What decides which adapters fit (see the module docstring), normalised and JSON-ready."""
        signature: dict[str, Any] = {"family": str(self.family), "unet": _unet_signature(self.unet)}
        for component, config in self.text_configs.items():
            signature[component] = {k: _text_value(config, k) for k in _TEXT_KEYS}
        if self.vae is not None:
            signature["vae"] = self.vae_signature()
        normalised: dict[str, Any] = json.loads(json.dumps(signature))
        return normalised

    def vae_signature(self) -> dict[str, Any] | None:
        """What decides the VAE's shapes (None when the VAE's config is unknown)."""
        return None if self.vae is None else _pick(_vae_defaults(), self.vae, _VAE_KEYS)

    @property
    def label(self) -> str:
        """How sentences for users name it: ``SD 1.5``, or ``the shapes model``."""
        return family_info(self.family).label if self.canonical else f"the {self.name} model"

    @property
    def text_configs(self) -> dict[str, Config]:
        """Component name to config, for each text encoder."""
        configs = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            configs["text_encoder_2"] = self.text_encoder_2
        return configs

    @property
    def text_widths(self) -> tuple[int, ...]:
        """Each text encoder's token width, in order: what an embedding's vectors must match."""
        return tuple(int(_text_value(config, "hidden_size")) for config in self.text_configs.values())

    @property
    def attention_widths(self) -> frozenset[int]:
        """The context widths of the UNet's attention layers: cross-attention's and each attention block's."""
        unet = self.unet
        channels = [int(c) for c in unet["block_out_channels"]]
        widths = {int(w) for w in _per_block(unet.get("cross_attention_dim"), len(channels))}
        widths.update(
            c for c, kind in zip(channels, unet["down_block_types"], strict=False) if "Attn" in kind
        )
        widths.update(
            c for c, kind in zip(reversed(channels), unet["up_block_types"], strict=False) if "Attn" in kind
        )
        if "Attn" in str(unet.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
            widths.add(channels[-1])
        return frozenset(widths)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _per_block(value: Any, blocks: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * blocks


@functools.cache
def _unet_defaults() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    return _init_defaults(UNet2DConditionModel)


@functools.cache
def _vae_defaults() -> dict[str, Any]:
    from diffusers import AutoencoderKL

    return _init_defaults(AutoencoderKL)


@functools.cache
def _text_defaults() -> dict[str, Any]:
    from transformers import CLIPTextConfig

    return {key: getattr(CLIPTextConfig(), key) for key in _TEXT_KEYS}


def _text_value(config: Config, key: str) -> Any:
    return config.get(key, _text_defaults()[key])


def _init_defaults(cls: type) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _pick(defaults: Config, config: Config, keys: Iterable[str]) -> dict[str, Any]:
    return {key: config.get(key, defaults.get(key)) for key in keys}


def _unet_signature(config: Config) -> dict[str, Any]:
    picked = _pick(_unet_defaults(), config, _UNET_KEYS)
    if picked["num_attention_heads"] is None:  # diffusers' own fallback (its historic naming mix-up)
        picked["num_attention_heads"] = picked["attention_head_dim"]
    blocks = len(picked["down_block_types"])
    for key in _PER_BLOCK:
        picked[key] = _per_block(picked[key], blocks)
    return picked


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _folder_configs(folder: Path) -> dict[str, dict[str, Any] | None]:
    """The component configs of a diffusers folder: ``unet``, ``text_encoder[_2]`` and ``vae`` (or None)."""
    configs: dict[str, dict[str, Any] | None] = {}
    for component in ("unet", *TEXT_ENCODERS, "vae"):
        path = folder / component / "config.json"
        configs[component] = _read_json(path) if path.is_file() else None
    return configs


def _make(name: str, family: Family, configs: Mapping[str, Config | None]) -> ModelTarget:
    unet, text_encoder = configs.get("unet"), configs.get("text_encoder")
    text_encoder_2, vae = configs.get("text_encoder_2"), configs.get("vae")
    if unet is None or text_encoder is None:
        raise ValueError("a model target needs the UNet's and the text encoder's configs")
    return ModelTarget(
        name=name,
        family=family,
        canonical=False,
        unet=dict(unet),
        text_encoder=dict(text_encoder),
        text_encoder_2=dict(text_encoder_2) if text_encoder_2 is not None else None,
        vae=dict(vae) if vae is not None else None,
    )


@functools.cache
def canonical_target(family: Family) -> ModelTarget:
    """The family's own shapes (``models/configs/<family>``): those of every real checkpoint of it."""
    family = Family(family)
    configs = _folder_configs(CONFIGS_DIR / str(family))
    return replace(_make(family_info(family).label, family, configs), canonical=True)


def _canonical_if_same(target: ModelTarget) -> ModelTarget:
    """``target``, or the canonical target when its shapes are the family's (a missing VAE config counts
    as the family's)."""
    canonical = canonical_target(target.family)
    compared = target if target.vae is not None else replace(target, vae=canonical.vae)
    return canonical if compared.key == canonical.key else target


@functools.lru_cache(maxsize=64)
def _folder_target(name: str, family: Family, folder: str, stamps: tuple[int, ...]) -> ModelTarget:
    del stamps  # part of the cache key only: a changed config file is read again
    return _canonical_if_same(_make(name, family, _folder_configs(Path(folder))))


def target_for_folder(name: str, family: Family, folder: Path) -> ModelTarget:
    """The target of a diffusers folder: canonical when its shapes are the family's, else its own.

    Args:
        name: The model's name (a custom target is called so).
        family: Its family.
        folder: The diffusers folder (``unet/config.json``, ``text_encoder/config.json``, ...).

    Raises:
        ValueError: The folder lacks the UNet's or the text encoder's config.
    """
    resolved = folder.resolve()
    stamps = tuple(
        path.stat().st_mtime_ns if path.is_file() else -1
        for path in (resolved / c / "config.json" for c in ("unet", *TEXT_ENCODERS, "vae"))
    )
    return _folder_target(name, Family(family), str(resolved), stamps)


def pipeline_target(pipe: Any, name: str = "this model") -> ModelTarget:
    """The target of a loaded pipeline, from its own components' configs (canonical when they are)."""
    family = Family.sdxl if getattr(pipe, "text_encoder_2", None) is not None else Family.sd15
    configs: dict[str, Config | None] = {"unet": dict(pipe.unet.config)}
    for component in TEXT_ENCODERS:
        encoder = getattr(pipe, component, None)
        configs[component] = encoder.config.to_dict() if encoder is not None else None
    vae = getattr(pipe, "vae", None)
    configs["vae"] = dict(vae.config) if vae is not None else None
    return _canonical_if_same(_make(name, family, configs))


def target_for_entry(entry: ModelEntry) -> ModelTarget:
    """A registry entry's target: a diffusers folder's own; single files, hub ids and the tiny plumbing
    models count as their family (hub ids not yet fetched as SD 1.5)."""
    family = entry.family or Family.sd15
    folder = entry.path
    if entry.built_on_demand or entry.kind not in (SourceKind.folder, SourceKind.builtin):
        return canonical_target(family)
    try:
        return target_for_folder(entry.name, family, folder)
    except (OSError, ValueError) as exc:
        log.warning(
            "model %s: no readable component configs (%s); adapters checked as %s", entry.name, exc, family
        )
        return canonical_target(family)


def served_targets(registry: ModelRegistry) -> list[ModelTarget]:
    """What uploads are checked against: the default model's target first, then the canonical target of
    every served family, then the custom targets of other served models (one per set of shapes).

    The tiny random-weight plumbing models add only their family; hub models
    not yet fetched count as SD 1.5.
    """
    default = registry.require(None)
    others = [
        e
        for e in registry.list()
        if e.name != default.name and e.family is not None and not e.built_on_demand
    ]
    found = [target_for_entry(default)]
    families = [
        default.family or Family.sd15,
        *sorted({e.family for e in others if e.family} - {default.family}),
    ]
    found.extend(canonical_target(f) for f in families)
    found.extend(target_for_entry(e) for e in others)
    targets: list[ModelTarget] = []
    for target in found:
        if all(target.key != t.key for t in targets):
            targets.append(target)
    return targets


def model_target(registry: ModelRegistry, model: str | None) -> ModelTarget:
    """The target a job on ``model`` applies adapters to, named as :func:`served_targets` names its
    shapes (``shapes-inpaint`` is the ``shapes`` target)."""
    own = target_for_entry(registry.require(model))
    if own.canonical:
        return own
    return next((t for t in served_targets(registry) if t.key == own.key), own)


def target_for_text_widths(targets: Iterable[ModelTarget], widths: Sequence[int]) -> ModelTarget | None:
    """The first custom target whose text encoders are as wide as ``widths`` (one per encoder, in order)."""
    return next((t for t in targets if not t.canonical and t.text_widths == tuple(widths)), None)


def target_for_attention_widths(
    targets: Iterable[ModelTarget], widths: Iterable[int], family: Family = Family.sd15
) -> ModelTarget | None:
    """The first custom ``family`` target with an attention layer for each context width in ``widths``."""
    wanted = set(widths)
    return next(
        (t for t in targets if not t.canonical and t.family == family and wanted <= t.attention_widths), None
    )


def model_details(target: ModelTarget | None) -> dict[str, Any]:
    """What an adapter made for a custom target records about it (``model``, ``model_key``); {} else."""
    if target is None or target.canonical:
        return {}
    return {"model": target.name, "model_key": target.key}


def model_of(details: Mapping[str, Any] | None) -> str | None:
    """The custom model an adapter was made for (its ``details["model"]``), or None for a family's."""
    model = (details or {}).get("model")
    return model if isinstance(model, str) and model else None


def _detail_widths(details: Mapping[str, Any]) -> tuple[int, ...] | None:
    """An embedding's ``width`` (or SDXL ``widths``, CLIP-L first) or a hypernetwork's ``widths``."""
    value = details.get("width", details.get("widths"))
    if isinstance(value, int):
        return (value,)
    if isinstance(value, Mapping):
        value = [value.get("clip_l"), value.get("clip_g")]
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def adapter_fits(kind: AssetKind, details: Mapping[str, Any] | None, target: ModelTarget) -> bool:
    """Whether a stored adapter of ``target``'s family fits it, as far as its details tell.

    One made for a custom model fits only that model's shapes (:func:`fits_model`). One made for the
    family fits every canonical model; on a custom model an embedding's widths must be its text encoders',
    a hypernetwork's its attention contexts', and a VAE needs the model's VAE to be the family's. A LoRA's
    layers are only known from its file: they are checked when it is applied.
    """
    details = details or {}
    if model_of(details) is not None:
        return fits_model(details, target)
    if target.canonical:
        return True
    widths = _detail_widths(details)
    if kind == AssetKind.EMBEDDING:
        return widths is None or widths == target.text_widths
    if kind == AssetKind.HYPERNETWORK:
        return widths is None or set(widths) <= target.attention_widths
    if kind == AssetKind.VAE and target.vae is not None:
        canonical = canonical_target(target.family)
        return target.vae_signature() == canonical.vae_signature()
    return True


def fits_model(details: Mapping[str, Any] | None, target: ModelTarget) -> bool:
    """Whether an adapter made for a custom model (see :func:`model_details`) fits ``target``'s shapes.

    Adapters made for a family fit every model of it here; the family itself is checked elsewhere.
    """
    model = model_of(details)
    if model is None:
        return True
    if target.canonical:
        return False
    key = (details or {}).get("model_key")
    return key == target.key if isinstance(key, str) and key else model.casefold() == target.name.casefold()
