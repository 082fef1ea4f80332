"""LoRA files: recognise every common layout from names and shapes, check the family, hash like the webui.

``inspect_lora`` needs only names and shapes (a validated safetensors header, or a loaded state dict), so a
file is judged before a tensor is read. Applying LoRAs to a pipeline for one job is :class:`LoraSet`
(``models.adapters.lora_apply``), re-exported here.

``inspect_lora`` returns ``None`` for files that are not LoRAs at all (no tensor name of any LoRA layout), so
the dispatcher can ask the other kinds; for LoRAs it cannot accept it raises one sentence.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.adapters.base import AssetInfo, wrong_family
from models.adapters.lora_apply import ActiveLora, LoraSet, pipeline_family, prepare_lora
from models.adapters.lora_formats import (
    LayerDims,
    ParsedLora,
    ShapeError,
    layer_dims,
    parse_lora_keys,
    resolve_layers,
)
from models.adapters.lora_layers import LayerTarget, layer_table, layer_table_for
from models.adapters.safe_files import SafetensorsHeader, sniff_format
from models.adapters.targets import ModelTarget, model_details
from models.families import Family
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

__all__ = [
    "ActiveLora",
    "LoraSet",
    "inspect_lora",
    "lora_hash",
    "lora_short_hash",
    "peft_config_metadata",
    "pipeline_family",
    "prepare_lora",
]

log = logging.getLogger(__name__)

FOREIGN_MESSAGE = "This LoRA file also holds weights that are not part of a LoRA; upload the LoRA on its own."
BROKEN_MESSAGE = (
    "This LoRA file is damaged: some layers are missing weights or have mismatched shapes; "
    "upload a complete copy."
)
NO_FIT_MESSAGE = (
    "This LoRA fits none of this server's models; it was made for a model with other layer sizes."
)
SD2_MESSAGE = (
    "This LoRA is for SD 2.x, which this server does not run; upload a LoRA made for SD 1.5 or SDXL."
)

_METADATA_DETAILS = {
    "ss_base_model_version": "base_model_version",
    "ss_sd_model_name": "trained_on",
    "ss_output_name": "output_name",
    "ss_network_module": "network_module",
    "modelspec.title": "title",
}

LayerId = tuple[str | None, str]


def _shape_of(value: Any) -> tuple[int, ...]:
    shape = value.shape if hasattr(value, "shape") else value
    return tuple(int(d) for d in shape)


def _base_version(metadata: Mapping[str, str]) -> str:
    return (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()


def _metadata_says_sd2(metadata: Mapping[str, str]) -> bool:
    version = _base_version(metadata)
    return metadata.get("ss_v2") == "True" or version.startswith(("sd_v2", "stable-diffusion-v2"))


def _looks_sd2(dims: Mapping[LayerId, LayerDims]) -> bool:
    """SD 2.x's cross-attention and text encoder are 1024 wide; no SD 1.5 or SDXL layer is."""
    return any(d.flat_in == 1024 or d.out == 1024 for d in dims.values())


def _family_hint(parsed: ParsedLora, metadata: Mapping[str, str]) -> Family:
    """The family names and metadata suggest where shapes fit both (a CLIP-L-only LoRA); SD 1.5 by default."""
    layers = parsed.layers.values()
    if any(layer.component == "text_encoder_2" or layer.name.startswith("lora_te1_") for layer in layers):
        return Family.sdxl
    if _base_version(metadata).startswith(("sdxl", "stable-diffusion-xl")):
        return Family.sdxl
    return Family.sd15


def _decide_family(
    parsed: ParsedLora,
    dims: Mapping[LayerId, LayerDims],
    metadata: Mapping[str, str],
    targets: Sequence[ModelTarget],
) -> tuple[Family, dict[LayerId, LayerTarget], ModelTarget | None]:
    """The family the layers fit (canonical shapes first, then each custom target), and the custom target."""
    if _metadata_says_sd2(metadata):
        raise InvalidRequestError(SD2_MESSAGE)
    fits = {
        family: resolved
        for family in Family
        if (resolved := resolve_layers(parsed, dims, layer_table(family))) is not None
    }
    if len(fits) == 1:
        family, resolved = next(iter(fits.items()))
        return family, resolved, None
    if fits:
        family = _family_hint(parsed, metadata)
        return family, fits[family], None
    for target in targets:
        if not target.canonical:
            custom = resolve_layers(parsed, dims, layer_table_for(target))
            if custom is not None:
                return target.family, custom, target
    raise InvalidRequestError(SD2_MESSAGE if _looks_sd2(dims) else NO_FIT_MESSAGE)


def _format_label(parsed: ParsedLora) -> str:
    algos = {layer.algo for layer in parsed.layers.values()}
    if "lokr" in algos:
        return "lycoris-lokr"
    if "loha" in algos:
        return "lycoris-loha"
    return parsed.format


def _alpha(parsed: ParsedLora, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> float | None:
    values = []
    for layer in parsed.layers.values():
        value = tensors.get(layer.keys.get("alpha", ""))
        if value is not None and hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            values.append(float(value.item()))
    if values:
        return Counter(values).most_common(1)[0][0]
    try:
        return float(metadata["ss_network_alpha"])
    except (KeyError, ValueError):
        return None


def _details(
    parsed: ParsedLora,
    dims: Mapping[LayerId, LayerDims],
    resolved: Mapping[LayerId, LayerTarget],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str],
) -> dict[str, Any]:
    details: dict[str, Any] = {
        "layers": len(parsed.layers),
        "parts": sorted({target.component for target in resolved.values()}),
    }
    ranks = [d.rank for d in dims.values() if d.rank is not None]
    if ranks:
        details["rank"] = Counter(ranks).most_common(1)[0][0]
        details["max_rank"] = max(ranks)
    alpha = _alpha(parsed, tensors, metadata)
    if alpha is not None:
        details["alpha"] = alpha
    unsupported = next((u for layer in parsed.layers.values() if (u := layer.unsupported)), None)
    details["applicable"] = unsupported is None
    if unsupported is not None:
        details["unsupported"] = unsupported
    if parsed.tokens:
        details["tokens"] = list(parsed.tokens)
    details.update({dst: metadata[src] for src, dst in _METADATA_DETAILS.items() if metadata.get(src)})
    return details


def inspect_lora(
    tensors: Mapping[str, Any] | SafetensorsHeader,
    metadata: Mapping[str, str] | None = None,
    *,
    expected: Family | str | None = None,
    targets: Sequence[ModelTarget] = (),
) -> AssetInfo | None:
    """Recognise a LoRA from tensor names and shapes.

    Args:
        tensors: Name to shape (a tuple), to ``TensorInfo`` (a safetensors header's entries) or to a
            tensor (a loaded state dict; alpha values are then read too); or a whole ``SafetensorsHeader``.
        metadata: The file's ``__metadata__`` strings (defaults to the header's).
        expected: The server's family; a file for another family is refused.
        targets: Model targets tried after the canonical SD 1.5 and SDXL shapes: a file that fits only a
            custom one (see :mod:`models.adapters.targets`) is reported as made for that model.

    Returns:
        What the file is (kind LoRA, format, family, details: ``layers``, ``parts``, ``rank``, ``max_rank``,
        ``alpha``, ``applicable`` and training metadata where present, and ``model``/``model_key`` for a
        custom target's file); ``None`` if no tensor name belongs to any LoRA layout.

    Raises:
        InvalidRequestError: A LoRA that is broken, for SD 2.x, fits no layer of SD 1.5, SDXL or a custom
            target, holds foreign weights, or (with ``expected``) is for the other family.
    """
    if isinstance(tensors, SafetensorsHeader):
        metadata = tensors.metadata if metadata is None else metadata
        tensors = tensors.tensors
    metadata = metadata or {}
    shapes = {name: _shape_of(value) for name, value in tensors.items()}
    parsed = parse_lora_keys(list(shapes))
    if parsed is None:
        return None
    if parsed.foreign:
        log.info("LoRA with %d foreign tensors, e.g. %s", len(parsed.foreign), parsed.foreign[0])
        raise InvalidRequestError(FOREIGN_MESSAGE)
    try:
        dims = {layer_id: layer_dims(shapes, layer) for layer_id, layer in parsed.layers.items()}
    except ShapeError as exc:
        log.info("broken LoRA layer: %s", exc)
        raise InvalidRequestError(BROKEN_MESSAGE) from None
    family, resolved, custom = _decide_family(parsed, dims, metadata, targets)
    info = AssetInfo(
        kind=AssetKind.LORA,
        format=_format_label(parsed),
        family=family,
        details={**_details(parsed, dims, resolved, tensors, metadata), **model_details(custom)},
    )
    if expected is not None and family != Family(expected):
        raise wrong_family(AssetKind.LORA, family, Family(expected))
    return info


def lora_hash(path: Path) -> str:
    """The webui's LoRA hash: sha256 after a safetensors header ("addnet hash"), else of the whole file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if sniff_format(path) == "safetensors":
            header_len = int.from_bytes(fh.read(8), "little")
            fh.seek(8 + header_len)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lora_short_hash(path: Path) -> str:
    """The 12 hex digits the webui writes as "Lora hashes" in PNG info."""
    return lora_hash(path)[:12]


def peft_config_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """Metadata carrying a PEFT ``adapter_config.json``'s alpha, to merge into a PEFT file's metadata."""
    kept = {k: config[k] for k in ("lora_alpha", "r") if isinstance(config.get(k), int | float)}
    return {"lora_adapter_metadata": json.dumps(kept)} if kept else {}
