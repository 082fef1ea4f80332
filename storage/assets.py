"""Asset rows: users' LoRAs, embeddings, hypernetworks and VAEs, and who may see and use them.

Same transaction convention as :mod:`storage.jobs`: functions flush, the caller commits. The bytes live in
the :class:`~storage.files.FileStore` under their sha256; a row only names them, so a user's file name never
reaches the filesystem.

Visibility: ``private`` — the owner only; ``guild`` — everyone in the asset's guild; ``public`` — everyone.
Names are unique per owner and kind; when several visible assets share a name, the user's own wins, then
the guild's, then a public one (oldest first).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, delete, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from storage.errors import InvalidRequestError, NotFoundError, echo
from storage.tables import Asset, AssetKind, Visibility
from storage.users import ensure_user

__all__ = [
    "NAME_MAX",
    "SERVER_OWNER_ID",
    "NewAsset",
    "add_asset",
    "check_asset_name",
    "check_name_free",
    "find_usable_asset",
    "list_all_assets",
    "list_usable_assets",
    "remove_asset",
    "rename_asset",
    "set_visibility",
    "owned_bytes",
    "usable_names",
]

log = logging.getLogger(__name__)

#: The owner of assets an admin adds from the command line (not a Discord user).
SERVER_OWNER_ID = 1
NAME_MAX = 64
# Letters and digits of any script, then letters, digits, "_", "-" and "."; no spaces, no separators.
_NAME = re.compile(r"^[^\W_][\w.\-]*$")


def check_asset_name(name: str) -> str:
    """Return the name normalised (NFC, trimmed) or refuse it with one sentence.

    A name is what users type in prompts (``<lora:name:0.8>``, an embedding's trigger word), so it must be
    one word: letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit, at most 64 characters.
    """
    cleaned = unicodedata.normalize("NFC", name.strip())
    if not cleaned:
        raise InvalidRequestError("Give the asset a name, such as pixel-art.")
    if len(cleaned) > NAME_MAX:
        raise InvalidRequestError(f"Asset names can be at most {NAME_MAX} characters; choose a shorter one.")
    if not _NAME.match(cleaned) or cleaned.endswith("."):
        raise InvalidRequestError(
            "Asset names may only use letters, digits, '_', '-' and '.', starting with a letter or digit."
        )
    return cleaned


@dataclass(frozen=True)
class NewAsset:
    """Everything needed to record a checked asset file."""

    owner_id: int
    guild_id: int | None
    kind: AssetKind
    name: str
    family: str
    format: str
    sha256: str
    short_hash: str
    size: int
    visibility: Visibility = Visibility.PRIVATE
    trigger: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _named(name: str) -> ColumnElement[bool]:
    """Case-insensitive name match, with both sides lowered by the database (no LIKE wildcards)."""
    return func.lower(Asset.name) == func.lower(name.strip())


def _visible_to(user_id: int | None, guild_id: int | None) -> ColumnElement[bool]:
    own = Asset.owner_id == user_id if user_id is not None else false()
    shared = (
        and_(Asset.visibility == Visibility.GUILD, Asset.guild_id == guild_id)
        if guild_id is not None
        else false()
    )
    return or_(own, shared, Asset.visibility == Visibility.PUBLIC)


def _preference(user_id: int | None, guild_id: int | None) -> ColumnElement[int]:
    return case(
        (Asset.owner_id == (user_id if user_id is not None else -1), 0),
        (and_(Asset.visibility == Visibility.GUILD, Asset.guild_id == (guild_id or -1)), 1),
        else_=2,
    )


async def check_name_free(session: AsyncSession, *, owner_id: int, kind: AssetKind, name: str) -> str:
    """Return the checked name (:func:`check_asset_name`), or refuse one the owner already uses for ``kind``.

    Uploads call this before anything is downloaded; :func:`add_asset` checks again when it writes.
    """
    cleaned = check_asset_name(name)
    clash = await session.scalar(
        select(Asset.id).where(Asset.owner_id == owner_id, Asset.kind == kind, _named(cleaned))
    )
    if clash is not None:
        raise InvalidRequestError(
            f"You already have {kind.with_article} called {cleaned}; "
            "pick another name or delete the old one first."
        )
    return cleaned


async def add_asset(session: AsyncSession, new: NewAsset) -> Asset:
    """Record an asset; refuse a name the owner already uses for that kind."""
    name = await check_name_free(session, owner_id=new.owner_id, kind=new.kind, name=new.name)
    await ensure_user(session, new.owner_id)
    row = Asset(
        owner_id=new.owner_id,
        guild_id=new.guild_id,
        kind=new.kind,
        name=name,
        trigger=new.trigger,
        family=new.family,
        format=new.format,
        sha256=new.sha256,
        short_hash=new.short_hash,
        size=new.size,
        visibility=new.visibility,
        details=dict(new.details),
    )
    session.add(row)
    await session.flush()
    log.info("asset %s %r added for owner %d (%s)", new.kind, name, new.owner_id, new.sha256[:12])
    return row


async def list_usable_assets(
    session: AsyncSession,
    *,
    user_id: int | None,
    guild_id: int | None,
    kind: AssetKind | None = None,
    family: str | None = None,
) -> list[Asset]:
    """The assets a user may use here: their own, their guild's shared ones and public ones."""
    query = select(Asset).where(_visible_to(user_id, guild_id))
    if kind is not None:
        query = query.where(Asset.kind == kind)
    if family is not None:
        query = query.where(Asset.family == family)
    query = query.order_by(Asset.kind, func.lower(Asset.name), _preference(user_id, guild_id), Asset.id)
    return list(await session.scalars(query))


async def list_all_assets(session: AsyncSession, *, kind: AssetKind | None = None) -> list[Asset]:
    """Every asset, for admins (by kind, then name, then owner)."""
    query = select(Asset).order_by(Asset.kind, func.lower(Asset.name), Asset.owner_id)
    if kind is not None:
        query = query.where(Asset.kind == kind)
    return list(await session.scalars(query))


async def find_usable_asset(
    session: AsyncSession, *, user_id: int | None, guild_id: int | None, kind: AssetKind, name: str
) -> Asset | None:
    """The asset called ``name`` (case-insensitively) that this user may use, or None."""
    query = (
        select(Asset)
        .where(_visible_to(user_id, guild_id), Asset.kind == kind, _named(name))
        .order_by(_preference(user_id, guild_id), Asset.id)
        .limit(1)
    )
    return await session.scalar(query)


async def _own(session: AsyncSession, owner_id: int, kind: AssetKind, name: str) -> Asset:
    row = await session.scalar(
        select(Asset).where(Asset.owner_id == owner_id, Asset.kind == kind, _named(name))
    )
    if row is None:
        raise NotFoundError(
            f"You have no {kind.label} called {echo(name.strip())}; see the list of your {kind.label}s."
        )
    return row


async def remove_asset(session: AsyncSession, *, owner_id: int, kind: AssetKind, name: str) -> str | None:
    """Delete the owner's asset; return its sha256 when no other row uses those bytes (delete the file)."""
    row = await _own(session, owner_id, kind, name)
    sha = row.sha256
    await session.execute(delete(Asset).where(Asset.id == row.id))
    await session.flush()
    still_used = await session.scalar(select(Asset.id).where(Asset.sha256 == sha).limit(1))
    return None if still_used is not None else sha


async def rename_asset(
    session: AsyncSession, *, owner_id: int, kind: AssetKind, name: str, new_name: str
) -> Asset:
    """Rename the owner's asset, keeping names unique per owner and kind."""
    row = await _own(session, owner_id, kind, name)
    cleaned = check_asset_name(new_name)
    if cleaned.lower() != row.name.lower():
        clash = await session.scalar(
            select(Asset.id).where(Asset.owner_id == owner_id, Asset.kind == kind, _named(cleaned))
        )
        if clash is not None:
            raise InvalidRequestError(
                f"You already have {kind.with_article} called {cleaned}; pick another name."
            )
    row.name = cleaned
    await session.flush()
    return row


async def set_visibility(
    session: AsyncSession,
    *,
    owner_id: int,
    kind: AssetKind,
    name: str,
    visibility: Visibility,
    guild_id: int | None = None,
) -> Asset:
    """Share or unshare the owner's asset (private, guild or public).

    Sharing with a guild shares with ``guild_id`` when given (the server where the owner asked, from
    Discord), else with the server the file was uploaded in.
    """
    row = await _own(session, owner_id, kind, name)
    if visibility == Visibility.GUILD:
        if guild_id is not None:
            row.guild_id = guild_id
        elif row.guild_id is None:
            raise InvalidRequestError(
                "This asset was not uploaded in a server, so it cannot be shared with one; "
                "share it from a channel of that server."
            )
    row.visibility = visibility
    await session.flush()
    return row


async def owned_bytes(session: AsyncSession, owner_id: int) -> int:
    """How many bytes of uploads a user owns (for their storage quota)."""
    return int(
        await session.scalar(select(func.coalesce(func.sum(Asset.size), 0)).where(Asset.owner_id == owner_id))
        or 0
    )


def usable_names(rows: Sequence[Asset]) -> list[str]:
    """Distinct names in preference order (for pickers)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row.name, None)
    return list(seen)
