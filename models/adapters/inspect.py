"""Recognise an untrusted adapter file: read it safely, ask each kind, check size and family, hash it.

This is what ``dreamcord check-asset``, ``dreamcord assets add`` and the bot's uploads call. The file's
format is sniffed from its bytes (never its extension), it is read only through
:mod:`models.adapters.safe_files` (nothing in it can run), and then offered to each kind in turn —
embedding, hypernetwork, LoRA, VAE — unless the caller names the kind. Each kind checks the file against
the served models' shapes (:mod:`models.adapters.targets`): the canonical SD 1.5 / SDXL ones first, then
those of models with shapes of their own, such as the built-in ``shapes`` model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from models.adapters.base import KIND_LABELS, AssetInfo, wrong_family
from models.adapters.embeddings import inspect_embedding
from models.adapters.hypernetwork import inspect_hypernetwork
from models.adapters.lora import inspect_lora, lora_short_hash
from models.adapters.safe_files import (
    load_pickle_object,
    load_state_dict,
    read_safetensors_header,
    sniff_format,
)
from models.adapters.targets import ModelTarget, canonical_target, model_details
from models.adapters.vae import inspect_vae
from models.families import Family
from models.registry import file_sha256
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

__all__ = [
    "ADAPTER_KINDS",
    "DEFAULT_MAX_MB",
    "CheckedAsset",
    "FileContents",
    "asset_caps",
    "check_asset",
    "read_adapter_file",
]

log = logging.getLogger(__name__)

#: The kinds users may upload, in the order an unnamed file is tried.
ADAPTER_KINDS = (AssetKind.EMBEDDING, AssetKind.HYPERNETWORK, AssetKind.LORA, AssetKind.VAE)
#: Largest file per kind, in MB, unless the settings say otherwise (``asset_max_mb``).
DEFAULT_MAX_MB: dict[AssetKind, int] = {
    AssetKind.LORA: 1024,
    AssetKind.EMBEDDING: 16,
    AssetKind.HYPERNETWORK: 512,
    AssetKind.VAE: 1024,
}


def asset_caps(overrides: Mapping[str, int] | None = None) -> dict[AssetKind, int]:
    """Size caps in bytes per kind: the defaults with the settings' ``asset_max_mb`` on top."""
    caps = dict(DEFAULT_MAX_MB)
    for key, megabytes in (overrides or {}).items():
        try:
            kind = AssetKind(key)
        except ValueError:
            raise ValueError(f"asset_max_mb: unknown asset kind {key!r}") from None
        if kind not in caps or megabytes <= 0:
            raise ValueError(f"asset_max_mb: {key} must be a positive number of MB for an adapter kind")
        caps[kind] = megabytes
    return {kind: mb * 2**20 for kind, mb in caps.items()}


@dataclass
class FileContents:
    """An adapter file, read safely: a flat state dict when it is one, else the pickled object."""

    format: str  # "safetensors" or "pickle"
    tensors: dict[str, torch.Tensor] | None
    obj: Any
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckedAsset:
    """A recognised file: what it is, its sha256, the webui's short hash for its kind, and its size."""

    info: AssetInfo
    sha256: str
    short_hash: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            **self.info.to_json(),
            "sha256": self.sha256,
            "short_hash": self.short_hash,
            "size": self.size,
            "summary": self.info.describe(),
        }


def read_adapter_file(path: Path, *, max_bytes: int) -> FileContents:
    """Read a file without running anything in it (see :mod:`models.adapters.safe_files`).

    Raises:
        InvalidRequestError: Too large, unknown format, code in a pickle, a forged header, NaN/Inf values.
    """
    fmt = sniff_format(path)
    if fmt == "safetensors":
        header = read_safetensors_header(path)
        tensors = load_state_dict(path, max_bytes=max_bytes)
        return FileContents("safetensors", tensors, tensors, dict(header.metadata))
    if fmt in ("pickle", "pickle-zip"):
        obj = load_pickle_object(path, max_bytes=max_bytes)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        flat = isinstance(obj, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        )
        return FileContents("pickle", dict(obj) if flat else None, obj)
    if path.stat().st_size == 0:
        raise InvalidRequestError("This file is empty; upload the adapter file itself.")
    raise InvalidRequestError(
        "This is not a weights file we can read; upload a .safetensors (or webui .pt) adapter file."
    )


def _ask(kind: AssetKind, contents: FileContents, targets: Sequence[ModelTarget]) -> AssetInfo | None:
    """One kind's verdict: None when the file is not of that kind."""
    if kind == AssetKind.EMBEDDING:
        return inspect_embedding(contents.obj, contents.metadata, targets=targets)
    if kind == AssetKind.HYPERNETWORK:
        return inspect_hypernetwork(contents.obj, targets=targets) if contents.format == "pickle" else None
    if contents.tensors is None:
        return None
    if kind == AssetKind.LORA:
        return inspect_lora(contents.tensors, contents.metadata, targets=targets)
    return _ask_vae(contents.tensors, contents.metadata, targets)


def _ask_vae(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], targets: Sequence[ModelTarget]
) -> AssetInfo | None:
    """A VAE file says nothing of its family: check it against each target's VAE, canonical ones first;
    when none fits, the default model's refusal."""
    refusals: dict[str, InvalidRequestError] = {}
    for target in sorted(targets, key=lambda t: not t.canonical):
        label = None if target.canonical else f"{target.name} model's"
        try:
            info = inspect_vae(tensors, metadata, family=target.family, config=target.vae, label=label)
        except InvalidRequestError as exc:
            refusals.setdefault(target.key, exc)
            continue
        if info is None:
            return None
        return replace(info, details={**info.details, **model_details(target)})
    raise refusals[targets[0].key]


def _short_hash(kind: AssetKind, path: Path, sha256: str) -> str:
    """The hash the webui prints for this kind: LoRAs hash the data after the header, the rest the file."""
    if kind == AssetKind.LORA:
        return lora_short_hash(path)
    return sha256[:12] if kind == AssetKind.EMBEDDING else sha256[:10]


def _recognise(
    contents: FileContents, kinds: Sequence[AssetKind], targets: Sequence[ModelTarget]
) -> AssetInfo | None:
    for kind in kinds:
        info = _ask(kind, contents, targets)
        if info is not None:
            return info
    return None


def check_asset(
    path: Path,
    *,
    kind: AssetKind | None = None,
    targets: Sequence[ModelTarget] | None = None,
    families: Sequence[Family] | None = None,
    caps: Mapping[AssetKind, int] | None = None,
) -> CheckedAsset:
    """Recognise an adapter file and check it fits one of ``targets`` (the first is the server's default).

    A file is checked against the canonical SD 1.5 / SDXL shapes first, then against each custom target
    (a served model with shapes of its own, such as ``shapes``); a file that fits only a custom target is
    reported with ``details["model"]`` naming that model.

    Args:
        path: The file (untrusted).
        kind: Only consider this kind; None tries every adapter kind.
        targets: The served models' targets (:func:`~models.adapters.targets.served_targets`).
        families: Instead of ``targets``: the served families, each as its canonical target (default, SD 1.5).
        caps: Largest file per kind in bytes (:func:`asset_caps`).

    Raises:
        InvalidRequestError: One sentence: unreadable, too large, not an adapter (of ``kind``), broken, or
            for another family or model (:class:`~storage.errors.IncompatibleAssetError`).
    """
    if targets is None:
        targets = [canonical_target(f) for f in (families or (Family.sd15,))]
    elif families is not None:
        raise TypeError("pass either targets or families")
    if not targets:
        raise ValueError("check_asset needs at least one model target")
    caps = dict(caps or asset_caps())
    kinds = (kind,) if kind is not None else ADAPTER_KINDS
    if kind is not None and kind not in ADAPTER_KINDS:
        raise InvalidRequestError(
            f"Checking {kind} files is not supported; use lora, embedding, hypernetwork or vae."
        )
    size = path.stat().st_size
    contents = read_adapter_file(path, max_bytes=max(caps[k] for k in kinds))
    info = _recognise(contents, kinds, targets)
    if info is None:
        if kind is not None:
            raise InvalidRequestError(
                f"This file is not a {KIND_LABELS[kind]} we recognise; check that you picked the right kind."
            )
        raise InvalidRequestError(
            "This file is not a LoRA, embedding, hypernetwork or VAE we recognise; "
            "upload the adapter file itself."
        )
    if size > caps[info.kind]:
        raise InvalidRequestError(
            f"This {KIND_LABELS[info.kind]} is larger than the {caps[info.kind] // 2**20} MB limit "
            "for its kind; upload a smaller file."
        )
    if all(info.family != t.family for t in targets):
        raise wrong_family(info.kind, info.family, targets[0].family)
    sha = file_sha256(path)
    log.info("recognised %s as %s", sha[:12], info.describe())
    return CheckedAsset(info=info, sha256=sha, short_hash=_short_hash(info.kind, path, sha), size=size)
