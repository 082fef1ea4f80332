"""Users and guilds: rows created on first use, JSON settings, and deleting a user's data.

Same transaction convention as :mod:`storage.jobs`: functions flush, the caller commits
(``async with db.sessions.begin() as session: ...``).

Settings are plain JSON objects; the functions store and return deep copies, so mutating a
returned dict changes nothing until it is passed back to ``set_*_settings``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage.tables import Asset, Guild, Image, Job, User

__all__ = [
    "delete_user_data",
    "ensure_guild",
    "ensure_user",
    "get_guild_settings",
    "get_user_settings",
    "set_guild_settings",
    "set_user_settings",
    "update_guild_settings",
    "update_user_settings",
]

log = logging.getLogger(__name__)

_Row = TypeVar("_Row", User, Guild)
_MAX_SNOWFLAKE = 2**63 - 1
_CHUNK = 500  # bound parameters per IN (...), well under SQLite's limit


def _check_snowflake(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SNOWFLAKE:
        raise ValueError(f"not a Discord id: {value!r}")


async def _ensure(session: AsyncSession, table: type[_Row], row_id: int) -> _Row:
    """Get the row, inserting it first if missing; safe when two sessions race to create it."""
    _check_snowflake(row_id)
    row = await session.get(table, row_id)
    if row is not None:
        return row
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        await session.execute(insert(table).values(id=row_id).on_conflict_do_nothing(index_elements=["id"]))
        row = await session.get(table, row_id)
        assert row is not None  # inserted now or by a concurrent session
        return row
    row = table(id=row_id)
    session.add(row)
    await session.flush()
    return row


async def ensure_user(session: AsyncSession, user_id: int) -> User:
    """The user's row, created (with empty settings) on first use."""
    return await _ensure(session, User, user_id)


async def ensure_guild(session: AsyncSession, guild_id: int) -> Guild:
    """The guild's row, created (with empty settings) on first use."""
    return await _ensure(session, Guild, guild_id)


def _json_copy(settings: Mapping[str, Any]) -> dict[str, Any]:
    try:
        copied = json.loads(json.dumps(dict(settings)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"settings must be JSON-serializable: {exc}") from exc
    assert isinstance(copied, dict)
    return copied


async def _get_settings(session: AsyncSession, table: type[_Row], row_id: int) -> dict[str, Any]:
    row = await session.get(table, row_id)
    return _json_copy(row.settings) if row is not None else {}


async def _set_settings(
    session: AsyncSession, table: type[_Row], row_id: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    new = _json_copy(settings)
    row = await _ensure(session, table, row_id)
    row.settings = new  # a new object, so the ORM sees the change
    await session.flush()
    return _json_copy(new)


async def _update_settings(
    session: AsyncSession, table: type[_Row], row_id: int, changes: Mapping[str, Any]
) -> dict[str, Any]:
    merged = await _get_settings(session, table, row_id)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return await _set_settings(session, table, row_id, merged)


async def get_user_settings(session: AsyncSession, user_id: int) -> dict[str, Any]:
    """The user's settings ({} for an unknown user; nothing is created)."""
    return await _get_settings(session, User, user_id)


async def set_user_settings(
    session: AsyncSession, user_id: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Replace the user's settings (creating the user if needed); returns what was stored."""
    return await _set_settings(session, User, user_id, settings)


async def update_user_settings(
    session: AsyncSession, user_id: int, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge ``changes`` into the user's settings (a None value removes the key); returns the result."""
    return await _update_settings(session, User, user_id, changes)


async def get_guild_settings(session: AsyncSession, guild_id: int) -> dict[str, Any]:
    """The guild's settings ({} for an unknown guild; nothing is created)."""
    return await _get_settings(session, Guild, guild_id)


async def set_guild_settings(
    session: AsyncSession, guild_id: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Replace the guild's settings (creating the guild if needed); returns what was stored."""
    return await _set_settings(session, Guild, guild_id, settings)


async def update_guild_settings(
    session: AsyncSession, guild_id: int, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge ``changes`` into the guild's settings (a None value removes the key); returns the result."""
    return await _update_settings(session, Guild, guild_id, changes)


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    items = sorted(values)
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


async def _referenced(session: AsyncSession, hashes: set[str]) -> set[str]:
    """Which of ``hashes`` some asset or image row still points at."""
    found: set[str] = set()
    for chunk in _chunks(hashes):
        found.update(await session.scalars(select(Asset.sha256).where(Asset.sha256.in_(chunk))))
        found.update(await session.scalars(select(Image.sha256).where(Image.sha256.in_(chunk))))
    return found


async def delete_user_data(session: AsyncSession, user_id: int) -> list[str]:
    """Delete everything stored about a user: assets, jobs, their images, settings, the user row.

    Returns:
        The sha256s (sorted) that no asset or image row references any more, so the caller may
        delete those files from the file store after committing.
    """
    job_ids = select(Job.id).where(Job.user_id == user_id)
    candidates = set(await session.scalars(select(Asset.sha256).where(Asset.owner_id == user_id)))
    candidates.update(await session.scalars(select(Image.sha256).where(Image.job_id.in_(job_ids))))

    await session.execute(delete(Image).where(Image.job_id.in_(job_ids)))
    await session.execute(delete(Job).where(Job.user_id == user_id))
    await session.execute(delete(Asset).where(Asset.owner_id == user_id))
    await session.execute(delete(User).where(User.id == user_id))
    await session.flush()

    orphans = sorted(candidates - await _referenced(session, candidates))
    log.info("deleted the data of user %d; %d file(s) unreferenced", user_id, len(orphans))
    return orphans
