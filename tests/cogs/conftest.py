"""End-to-end fixtures: the real dreamcord bot (real discord.py client) against the local Discord double,
with a real engine on the tiny and shapes models."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import discord
import pytest
from discord.ext import commands

from bot import build_bot
from pipelines.engine import Engine
from pipelines.settings import Settings
from tests.discord_double import DiscordDouble, Guild, User
from tests.discord_double.fixtures import double
from tests.discord_double.models import StoredMessage
from tests.discord_double.records import InteractionRecord

__all__ = ["double", "scratch"]


#: A real kohya LoRA for the shapes model, trained here (models/shapes/loras/).
PURPLE_LORA = (
    Path(__file__).resolve().parents[2] / "models" / "shapes" / "loras" / "purple-circles.safetensors"
)


async def upload_lora(
    double: DiscordDouble, user: User, guild: Guild, data: bytes, filename: str = "p.safetensors"
) -> InteractionRecord:
    """``/lora upload`` of ``data`` as an attachment called ``filename``."""
    attachment = double.add_attachment(filename, data)
    return await double.slash(
        user, guild, None, "lora", subcommand="upload", attachments={"file": attachment}
    )


@pytest.fixture
def settings(tmp_path: Path, tiny_models: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", builtin_models_dir=tiny_models, preview_every=2)


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    async with Engine(settings, recover=True) as eng:
        yield eng


@pytest.fixture
async def guild(double: DiscordDouble) -> Guild:
    return double.add_guild("Dream Guild", nsfw_channel=True)


@pytest.fixture
async def alice(double: DiscordDouble, guild: Guild) -> User:
    return double.add_user("alice", guild)


@pytest.fixture
async def bob(double: DiscordDouble, guild: Guild) -> User:
    return double.add_user("bob", guild)


@pytest.fixture
async def admin(double: DiscordDouble, guild: Guild) -> User:
    return double.add_user("admin", guild, permissions=["manage_guild"])


RunBot = Callable[[Engine], Any]


@pytest.fixture
def running_bot(double: DiscordDouble, guild: Guild) -> Callable[[Engine], Any]:
    """``async with running_bot(engine) as bot``: the dreamcord bot logged in, commands synced."""

    @asynccontextmanager
    async def run(engine: Engine) -> AsyncIterator[commands.Bot]:
        bot = build_bot(engine, guild_ready_timeout=0.05)
        async with double.run_bot(bot) as started:
            await started.tree.sync()  # the admin's /admin sync; never done on start
            yield started

    return run


@pytest.fixture
async def bot(running_bot: Callable[[Engine], Any], engine: Engine) -> AsyncIterator[commands.Bot]:
    async with running_bot(engine) as started:
        yield started


T = TypeVar("T")


@asynccontextmanager
async def serving(
    settings: Settings, populate: Callable[[DiscordDouble], T]
) -> AsyncIterator[tuple[DiscordDouble, Engine, commands.Bot, T]]:
    """A double peopled by ``populate``, an engine on ``settings`` and the bot, commands synced; for fixtures
    that share one bot across a module. Yields what ``populate`` returned; the double must end clean."""
    async with DiscordDouble() as double:
        with double.install(discord):
            made = populate(double)
            async with Engine(settings, recover=True) as engine:
                async with double.run_bot(build_bot(engine, guild_ready_timeout=0.05)) as bot:
                    await bot.tree.sync()
                    yield double, engine, bot, made
                    double.assert_clean()


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's temp folder, empty, so a test can see an upload's scratch files are removed."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


async def settled_message(
    record: InteractionRecord, done: Callable[[StoredMessage], bool], timeout: float = 60
) -> StoredMessage:
    """Wait until the interaction's visible message satisfies ``done`` (results come by edits)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = record.original
        if message is not None and done(message):
            return message
        for candidate in [*reversed(record.followups), *(a.message for a in reversed(record.actions))]:
            if candidate is not None and done(candidate):
                return candidate
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"no settled message; actions: {[(a.kind, a.status) for a in record.actions]}; "
                f"messages: {[(m.content, m.ephemeral) for m in [record.original, *record.followups] if m]}"
            )
        await asyncio.sleep(0.05)


async def wait_job_message(
    double: DiscordDouble, record: InteractionRecord, timeout: float = 90
) -> StoredMessage:
    """The job's message once it shows a result (attachments and result buttons) or a final sentence."""
    final_words = ("failed", "cancelled")

    def finished(message: StoredMessage) -> bool:
        text = message.content or ""
        return bool(message.embeds and message.attachments) or any(word in text for word in final_words)

    return await settled_message(record, finished, timeout)


__all__ += ["PURPLE_LORA", "serving", "settled_message", "upload_lora", "wait_job_message"]
