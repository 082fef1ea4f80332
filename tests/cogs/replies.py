"""What the end-to-end cog tests read back: the one answer an interaction ends with, one-sentence
refusals, row counts and the files a bot keeps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from pipelines.engine import Engine
from storage.tables import Asset, Job
from tests.cogs.conftest import settled_message
from tests.discord_double import DiscordDouble, Guild, InteractionRecord, StoredMessage, User

__all__ = ["answer", "count_rows", "shown", "sentence", "slash", "stored_files"]


async def count_rows(engine: Engine, table: type[Asset] | type[Job]) -> int:
    """How many rows the table holds."""
    async with engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


def shown(record: InteractionRecord) -> list[StoredMessage]:
    """Every message this interaction shows the user (answer and follow-ups), loading ones left out."""
    messages = ([record.original] if record.original is not None else []) + record.followups
    seen: dict[int, StoredMessage] = {}
    for message in messages:
        if not message.loading and not message.deleted:
            seen[message.id] = message
    return list(seen.values())


async def answer(record: InteractionRecord, *, ephemeral: bool = True, timeout: float = 30) -> str:
    """The one message the interaction ends with (checked: exactly one, with the expected visibility)."""
    await settled_message(record, lambda m: not m.loading and bool(m.content or m.embeds), timeout)
    await record.settled(quiet=0.3, timeout=timeout)
    messages = shown(record)
    assert len(messages) == 1, [m.content for m in messages]
    assert messages[0].ephemeral is ephemeral, messages[0].content
    assert not record.errors, [(a.kind, a.status, a.code) for a in record.errors]
    return messages[0].content


async def sentence(record: InteractionRecord, timeout: float = 30) -> str:
    """One private sentence for the user: a single line, no traceback, no path, no internal failure."""
    text = await answer(record, timeout=timeout)
    assert "\n" not in text and text.endswith("."), text
    assert "Something broke" not in text and "Traceback" not in text
    assert not re.search(r"/(tmp|home|work|root|usr|var)\b|dreamcord-upload|\\", text), text  # no paths
    return text


async def slash(
    double: DiscordDouble, user: User, guild: Guild, command: str, sub: str | None = None, **options: Any
) -> InteractionRecord:
    """``user`` runs ``/command sub`` with ``options`` in the guild's text channel."""
    return await double.slash(user, guild, None, command, subcommand=sub, options=options)


def stored_files(data_dir: Path) -> set[Path]:
    """Every file the bot keeps besides its database: the content store and its temp folder."""
    return {p for p in data_dir.rglob("*") if p.is_file() and not p.name.startswith("dreamcord.db")}
