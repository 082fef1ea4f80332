"""Adding and removing users' adapter files: check, store content-addressed, record — or store nothing.

The one path for every front end (``dreamcord assets``, the bot's ``/lora upload``): the name is checked,
the file recognised (:func:`models.adapters.inspect.check_asset`, off the event loop), then its bytes go
into the file store under their sha256 and the row is written. A refusal at any step leaves no row and no
new file behind.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from models.adapters.inspect import CheckedAsset, check_asset
from pipelines.engine import Engine
from storage.assets import NewAsset, add_asset, check_asset_name, check_name_free, remove_asset
from storage.db import retry_locked
from storage.tables import Asset, AssetKind, Visibility

__all__ = ["AddedAsset", "add_asset_file", "name_from_filename", "remove_asset_file"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddedAsset:
    """A stored asset and what its file was recognised as."""

    id: int
    name: str
    kind: AssetKind
    visibility: Visibility
    checked: CheckedAsset

    def summary(self) -> str:
        """For users: ``pixel-art: LoRA, kohya format, SD 1.5, rank 16``."""
        return f"{self.name}: {self.checked.info.describe()}"


def name_from_filename(filename: str) -> str:
    """A usable asset name from an uploaded file's name (``EasyNegative.safetensors`` → ``EasyNegative``)."""
    stem = Path(filename).name
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    cleaned = re.sub(r"[^\w.\-]+", "-", stem).strip("-._")
    return cleaned[:64].rstrip("-._") or "asset"


async def _name_free(engine: Engine, owner_id: int, kind: AssetKind, name: str) -> None:
    async with engine.db.sessions() as session:
        await check_name_free(session, owner_id=owner_id, kind=kind, name=name)


async def add_asset_file(
    engine: Engine,
    path: Path,
    *,
    name: str,
    owner_id: int,
    guild_id: int | None = None,
    kind: AssetKind | None = None,
    visibility: Visibility = Visibility.PRIVATE,
) -> AddedAsset:
    """Check ``path`` and record it as the owner's asset called ``name``.

    Raises:
        InvalidRequestError: A bad name, a name the owner already uses, or a file that is refused
            (unreadable, too large, not an adapter, for another family, fitting none of the served models).
    """
    name = check_asset_name(name)
    if kind is not None:  # a name in use: refused before the file is even read
        await _name_free(engine, owner_id, kind, name)
    checked = await asyncio.to_thread(
        check_asset, path, kind=kind, targets=engine.served_targets(), caps=engine.asset_caps
    )
    kind = checked.info.kind
    await _name_free(engine, owner_id, kind, name)  # before storing (add_asset checks again, atomically)
    was_stored = engine.files.exists(checked.sha256)
    stored = await asyncio.to_thread(engine.files.put_file, path)
    if stored.sha256 != checked.sha256:  # the file changed between the check and the copy
        if not was_stored:
            engine.files.delete(stored.sha256)
        raise RuntimeError("the asset file changed while it was being stored")

    async def write() -> AddedAsset:
        async with engine.db.sessions.begin() as session:
            row: Asset = await add_asset(
                session,
                NewAsset(
                    owner_id=owner_id,
                    guild_id=guild_id,
                    kind=kind,
                    name=name,
                    family=str(checked.info.family),
                    format=checked.info.format,
                    sha256=checked.sha256,
                    short_hash=checked.short_hash,
                    size=checked.size,
                    visibility=visibility,
                    trigger=name if kind == AssetKind.EMBEDDING else None,
                    details=checked.info.details,
                ),
            )
            return AddedAsset(row.id, row.name, kind, row.visibility, checked)

    try:
        added = await retry_locked(write, give_up_after_s=engine.queue.limits.busy_wait_s, what="an upload")
    except BaseException:
        if not was_stored:
            engine.files.delete(checked.sha256)
        raise
    log.info("added %s", added.summary())
    return added


async def remove_asset_file(engine: Engine, *, owner_id: int, kind: AssetKind, name: str) -> None:
    """Delete the owner's asset, and its file when nothing else uses those bytes."""
    async with engine.db.sessions.begin() as session:
        orphan = await remove_asset(session, owner_id=owner_id, kind=kind, name=name)
    if orphan is not None:
        engine.files.delete(orphan)
