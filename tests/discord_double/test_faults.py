"""Faults injected in the double: Discord's error shapes, and how the real discord.py client reacts."""

from __future__ import annotations

import io
import time

import aiohttp
import discord
import pytest

from tests.discord_double import DiscordDouble, Guild, User, is_multipart
from tests.discord_double.tiny_bot import TinyBot

FOLLOWUP = r"/webhooks/\d+/[^/]+$"


@pytest.fixture
def world(double: DiscordDouble) -> tuple[Guild, User]:
    guild = double.add_guild("Fault Guild")
    return guild, double.add_user("alice", guild)


@pytest.mark.parametrize(
    ("status", "path", "code"),
    [
        (404, "/api/v10/webhooks/1/tok/messages/2", 10015),
        (404, "/api/v10/interactions/1/tok/callback", 10062),
        (404, "/api/v10/channels/1/messages/2", 10008),
        (401, "/api/v10/webhooks/1/tok/messages/2", 50027),
        (500, "/api/v10/webhooks/1/tok", 0),
    ],
)
async def test_fault_answers_with_discords_error_shape(
    double: DiscordDouble, status: int, path: str, code: int
) -> None:
    fault = double.inject_fault("*", "^" + path + "$", status)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bot {double.token}"}) as session:
        async with session.patch(double.url + path, json={"content": "x"}) as response:
            assert response.status == status
            body = await response.json()
    assert body["code"] == code
    assert fault.hits == 1 and fault.hit_paths == [path] and fault.spent  # times=1: used up


async def test_429_carries_what_discord_py_needs_to_retry(double: DiscordDouble) -> None:
    fault = double.inject_fault("POST", "/channels/", 429, retry_after=0.25, times=2)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bot {double.token}"}) as session:
        for _ in range(2):
            async with session.post(double.url + "/api/v10/channels/1/messages", json={}) as response:
                assert response.status == 429
                assert response.headers["Via"] and response.headers["Content-Type"] == "application/json"
                assert (await response.json())["retry_after"] == 0.25
    assert fault.hits == 2 and fault.spent


async def test_discord_py_sleeps_on_429_and_delivers_once(
    double: DiscordDouble, world: tuple[Guild, User]
) -> None:
    guild, alice = world
    fault = double.inject_fault("POST", FOLLOWUP, 429, retry_after=0.3)
    async with double.run_bot(TinyBot()):
        started = time.monotonic()
        record = await double.slash(alice, guild, None, "echo", options={"text": "hi"})
        message = await record.final_message(timeout=10)
    assert fault.hits == 1
    assert time.monotonic() - started >= 0.3  # it waited retry_after
    assert message.content == "hi" and len(message.attachments) == 1
    assert [a.kind for a in record.actions] == ["callback", "followup"]  # the refused try never landed
    double.assert_clean()


async def test_discord_py_retries_a_500_on_channel_messages(
    double: DiscordDouble, world: tuple[Guild, User]
) -> None:
    guild, _ = world
    fault = double.inject_fault("POST", r"/channels/\d+/messages$", 500)
    async with double.run_bot(TinyBot()) as bot:
        channel = bot.get_channel(guild.text_channel.id)
        assert isinstance(channel, discord.TextChannel)
        await channel.send("after a 500")
    assert fault.hits == 1
    assert [m.content for m in double.channel_messages(guild.text_channel.id)] == ["after a 500"]
    double.assert_clean()


async def test_when_narrows_a_fault_to_uploads(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, _ = world
    fault = double.inject_fault("POST", r"/channels/\d+/messages$", 404, when=is_multipart)
    async with double.run_bot(TinyBot()) as bot:
        channel = bot.get_channel(guild.text_channel.id)
        assert isinstance(channel, discord.TextChannel)
        await channel.send("plain text passes")
        with pytest.raises(discord.NotFound):
            await channel.send("with a file", file=discord.File(io.BytesIO(b"x"), filename="x.txt"))
    assert fault.hits == 1
    assert [m.content for m in double.channel_messages(guild.text_channel.id)] == ["plain text passes"]
    double.assert_clean()
