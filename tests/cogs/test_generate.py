"""The /imagine cog: its command payload and its replies, with a fake interaction (the real Discord
round trip arrives with the local Discord double)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import pytest
from PIL import Image
from sqlalchemy import func, select

from bot import build_bot
from cogs.generate import Generate
from pipelines.engine import Engine
from pipelines.settings import Settings
from storage.tables import Job


@dataclass
class FakeResponse:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def send_message(self, content: str | None = None, **kwargs: Any) -> None:
        self.calls.append(("send_message", {"content": content, **kwargs}))

    async def defer(self, **kwargs: Any) -> None:
        self.calls.append(("defer", kwargs))


@dataclass
class FakeFollowup:
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, content: str | None = None, **kwargs: Any) -> None:
        self.calls.append({"content": content, **kwargs})


@dataclass
class FakeUser:
    id: int = 111


@dataclass
class FakeInteraction:
    user: FakeUser = field(default_factory=FakeUser)
    guild_id: int | None = 222
    channel_id: int | None = 333
    response: FakeResponse = field(default_factory=FakeResponse)
    followup: FakeFollowup = field(default_factory=FakeFollowup)


@pytest.fixture
async def cog(tmp_path: Path, tiny_models: Path) -> Generate:
    async with Engine(Settings(data_dir=tmp_path / "data", builtin_models_dir=tiny_models)) as engine:
        yield Generate(build_bot(engine), engine)


async def _jobs(cog: Generate) -> int:
    async with cog.engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Job)) or 0)


def test_imagine_payload_fits_discords_rules(tmp_path: Path) -> None:
    command = Generate.imagine
    payload = command.to_dict(
        discord.app_commands.CommandTree(discord.Client(intents=discord.Intents.none()))
    )
    assert payload["name"] == "imagine" and 1 <= len(payload["description"]) <= 100
    assert len(payload["options"]) <= 25
    for option in payload["options"]:
        assert option["name"].islower() and len(option["name"]) <= 32
        assert 1 <= len(option["description"]) <= 100
        assert len(option.get("choices", [])) <= 25
    assert payload["options"][0]["name"] == "prompt" and payload["options"][0]["required"]


async def test_bad_input_gets_one_ephemeral_sentence_and_stores_nothing(cog: Generate) -> None:
    interaction = FakeInteraction()
    await Generate.imagine.callback(cog, interaction, prompt="a red circle", width=65, height=64)
    [(kind, sent)] = interaction.response.calls
    assert kind == "send_message" and sent["ephemeral"] is True
    assert "multiple of 8" in sent["content"]
    assert await _jobs(cog) == 0


async def test_imagine_defers_then_posts_the_image(cog: Generate) -> None:
    interaction = FakeInteraction()
    await Generate.imagine.callback(
        cog, interaction, prompt="a red circle on a blue background", steps=4, seed=9
    )
    assert [kind for kind, _ in interaction.response.calls] == ["defer"]
    [posted] = interaction.followup.calls
    [file] = posted["files"]
    with Image.open(io.BytesIO(file.fp.read())) as png:
        assert png.size == (64, 64) and "Seed: 9" in png.info["parameters"]
    fields = {f.name: f.value for f in posted["embed"].fields}
    assert fields["Seed"] == "9" and fields["Model"] == "shapes"
    assert await _jobs(cog) == 1
