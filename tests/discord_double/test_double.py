"""Prove the Discord double with the real discord.py client and a throwaway commands.Bot (tiny_bot.py)."""

from __future__ import annotations

import asyncio
import hashlib
from io import BytesIO
from typing import Any

import aiohttp
import discord
import pytest
from discord.ext import commands

from tests.discord_double import DiscordDouble, Guild, User
from tests.discord_double.limits import limits
from tests.discord_double.rules import check_command, check_components, check_message
from tests.discord_double.tiny_bot import TinyBot, png_bytes


@pytest.fixture
def world(double: DiscordDouble) -> tuple[Guild, User]:
    guild = double.add_guild("Dream Guild", nsfw_channel=True)
    return guild, double.add_user("alice", guild, permissions=["manage_guild"])


async def test_login_sync_and_guild(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, _ = world
    async with double.run_bot(TinyBot()) as bot:
        assert bot.user is not None and bot.user.id == double.bot_user.id
        assert bot.application_id == double.application_id
        seen = bot.get_guild(guild.id)
        assert seen is not None and {c.name for c in seen.text_channels} == {"general", "nsfw"}
        assert seen.get_channel(guild.nsfw_channel.id).is_nsfw()  # type: ignore[union-attr]
    assert ("PUT", f"/api/v10/applications/{double.application_id}/commands") in double.requests
    commands_by_name = {c["name"]: c for c in double.commands()}
    assert set(commands_by_name) == {"echo", "style", "ask", "pick", "slow", "bad", "steps", "cfg", "digest"}
    echo_options = {o["name"]: o for o in commands_by_name["echo"]["options"]}
    assert echo_options["image"]["type"] == 11 and not echo_options["image"]["required"]
    assert [c["value"] for c in commands_by_name["style"]["options"][0]["choices"]] == ["anime", "photo"]
    assert [o["type"] for o in commands_by_name["cfg"]["options"]] == [1]
    double.assert_clean()


async def test_guild_sync_fetch_and_dispatch(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, alice = world
    async with double.run_bot(TinyBot()) as bot:
        where = discord.Object(guild.id)
        assert await bot.tree.fetch_commands(guild=where) == []
        bot.tree.copy_global_to(guild=where)
        synced = await bot.tree.sync(guild=where)
        fetched = await bot.tree.fetch_commands()
        assert {c.name for c in synced} == {c.name for c in fetched} == {c["name"] for c in double.commands()}
        assert {c.id for c in synced}.isdisjoint({c.id for c in fetched})
        record = await double.slash(alice, guild, None, "style", options={"name": "anime"})
        assert record.data["guild_id"] == str(guild.id)
        assert (await record.final_message()).content == "style anime"
    double.assert_clean()


async def test_wrong_token_fails_login(double: DiscordDouble) -> None:
    bot = TinyBot()
    with pytest.raises(discord.LoginFailure):
        await bot.login("not-the-token")
    await bot.close()
    assert double.take_violations("wrong bot token") == ["GET /api/v10/users/@me: missing or wrong bot token"]
    double.assert_clean()


async def test_auto_sharded_bot_uses_gateway_bot(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    intents = discord.Intents.default()
    bot = commands.AutoShardedBot(
        command_prefix=commands.when_mentioned, intents=intents, guild_ready_timeout=0.05
    )
    async with double.run_bot(bot):
        assert bot.shard_count == 1 and [g.id for g in bot.guilds] == [world[0].id]
    assert ("GET", "/api/v10/gateway/bot") in double.requests
    double.assert_clean()


async def test_subcommand_with_member_option_and_deferred_update(
    double: DiscordDouble, world: tuple[Guild, User]
) -> None:
    guild, alice = world
    bob = double.add_user("bob", guild)
    async with double.run_bot(TinyBot()):
        record = await double.slash(
            alice, guild, None, "cfg", subcommand="set", options={"key": "k", "who": bob}
        )
        assert (await record.final_message()).content == f"k for bob ({bob.id})"
        assert (
            record.data["options"][0]["name"] == "set" and str(bob.id) in record.data["resolved"]["members"]
        )
        with pytest.raises(ValueError, match="needs a subcommand"):
            await double.slash(alice, guild, None, "cfg", options={"key": "k"})

        echoed = await (await double.slash(alice, guild, None, "echo", options={"text": "x"})).final_message()
        attachments_before = [dict(a) for a in echoed.attachments]
        click = await double.click(bob, echoed, "echo:later")
        edited = await click.final_message()
        assert [(a.kind, a.callback_type) for a in click.actions] == [("callback", 6), ("edit", None)]
        assert (
            edited.id == echoed.id and edited.content == "later" and edited.attachments == attachments_before
        )
    double.assert_clean()


async def test_echo_defer_followup_file_and_button(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, alice = world
    async with double.run_bot(TinyBot()):
        record = await double.slash(alice, guild, None, "echo", options={"text": "hello"})
        message = await record.final_message()
        assert [(a.kind, a.callback_type, a.status) for a in record.actions] == [
            ("callback", 5, 200),
            ("followup", None, 200),
        ]
        assert message.id == record.original_id and not message.loading
        assert message.content == "hello" and message.data["type"] == 20
        assert message.attachments[0]["filename"] == "echo.png"
        assert (message.attachments[0]["width"], message.attachments[0]["height"]) == (8, 6)
        async with aiohttp.ClientSession() as session, session.get(message.attachments[0]["url"]) as resp:
            assert resp.status == 200 and await resp.read() == png_bytes()
        assert message.custom_id("Again") == "echo:again"

        click = await double.click(alice, message, "echo:again")
        response = await click.response()
        assert (response.callback_type, response.status) == (7, 200)
        updated = await click.final_message()
        assert updated.id == message.id and updated.content == "clicked" and updated.components == []
        assert [m.id for m in double.channel_messages(guild.text_channel.id)] == [message.id]
        with pytest.raises(LookupError):
            await double.click(alice, updated, "echo:again")
    double.assert_clean()


async def test_choices_modal_and_autocomplete(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, alice = world
    async with double.run_bot(TinyBot()):
        styled = await double.slash(alice, guild, None, "style", options={"name": "photo"})
        assert (await styled.final_message()).content == "style photo"
        with pytest.raises(ValueError, match="choices"):
            await double.slash(alice, guild, None, "style", options={"name": "oil"})

        asked = await double.slash(alice, guild, None, "ask")
        assert (await asked.response()).callback_type == 9
        assert asked.modal is not None and asked.modal["title"] == "Ask the oracle"
        submitted = await double.submit_modal(alice, "ask-modal", {"question": "why?"})
        answer = await submitted.final_message()
        assert answer.content == "asked: why?" and answer.ephemeral
        assert answer.id not in [m.id for m in double.channel_messages(guild.text_channel.id)]

        typed = await double.autocomplete(alice, guild, None, "pick", "model", options={"model": "model-1"})
        await typed.response()
        assert typed.choices is not None
        assert [c["value"] for c in typed.choices] == ["model-1"] + [f"model-{i}" for i in range(10, 20)]
    double.assert_clean()


async def test_edits_followups_and_deletes_are_recorded_in_order(
    double: DiscordDouble, world: tuple[Guild, User]
) -> None:
    guild, alice = world
    async with double.run_bot(TinyBot()):
        record = await double.slash(alice, guild, None, "steps")
        await record.wait_for(lambda a: a.kind == "delete")
    kinds = [(a.kind, a.status) for a in record.actions]
    assert kinds == [("callback", 200), ("edit", 200), ("followup", 200), ("edit", 200), ("delete", 204)]
    assert record.original is not None and record.original.deleted and record.original.content == "two"
    (extra,) = record.followups
    assert extra.content == "four" and extra.ephemeral
    assert record.followups[0] is extra and record.actions[2].payload["content"] == "three after two"
    assert (
        "GET",
        f"/api/v10/webhooks/{double.application_id}/{record.token}/messages/@original",
    ) in double.requests
    assert double.channel_messages(guild.text_channel.id) == []
    assert double.channel_messages(guild.text_channel.id, include_ephemeral=True) == [extra]
    double.assert_clean()


async def test_upload_over_the_guild_limit_gets_413(double: DiscordDouble) -> None:
    small = double.add_guild("Small", attachment_size_limit=len(png_bytes()) - 1)
    alice = double.add_user("alice", small)
    async with double.run_bot(TinyBot()):
        record = await double.slash(alice, small, None, "echo", options={"text": "big"})
        refused = await record.wait_for(lambda a: a.kind == "followup")
        assert (refused.status, refused.code) == (413, 40005)
        assert record.original is not None and record.original.loading
    assert len(double.take_violations("upload limit")) == 1
    double.assert_clean()


async def test_channel_messages_through_the_client(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, _ = world
    picture = png_bytes()
    async with double.run_bot(TinyBot()) as bot:
        channel = bot.get_channel(guild.text_channel.id)
        assert isinstance(channel, discord.TextChannel)
        assert (await bot.fetch_channel(channel.id)).name == "general"
        async with channel.typing():
            sent = await channel.send("hi", file=discord.File(BytesIO(picture), filename="a.png"))
        (stored,) = double.channel_messages(channel.id)
        assert (stored.id, stored.content, stored.file_bytes()) == (sent.id, "hi", picture)
        await sent.edit(content="edited")
        fetched = await channel.fetch_message(sent.id)
        assert fetched.content == "edited" and await fetched.attachments[0].read() == picture
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("z" * 2001)
        assert too_long.value.code == 50035
        await sent.delete()
        assert double.channel_messages(channel.id) == []
        with pytest.raises(discord.NotFound):
            await channel.guild.fetch_roles()
    assert double.typing == [channel.id]
    assert len(double.take_violations("2001")) == 1
    assert len(double.take_violations("route not served")) == 1
    double.assert_clean()


async def test_late_response_gets_10062(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, alice = world
    async with double.run_bot(TinyBot()) as bot:
        record = await double.slash(alice, guild, None, "slow")
        response = await record.response(timeout=6)
        assert (response.status, response.code) == (404, 10062) and response.at > 3.0
        await asyncio.sleep(0.05)
        assert bot.errors == [10062]
    assert len(double.take_violations("10062")) == 1
    double.assert_clean()


async def test_second_initial_response_gets_40060(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    """Two copies of a bot on one token (a classic deployment bug) both answer: one wins, one gets 40060."""
    guild, alice = world
    async with double.run_bot(TinyBot()), double.run_bot(TinyBot()):
        record = await double.slash(alice, guild, None, "style", options={"name": "anime"})
        await record.wait_for(lambda a: a.code == 40060)
        await record.settled()
    assert sorted((a.status, a.code) for a in record.callbacks) == [(200, None), (400, 40060)]
    assert len(double.channel_messages(guild.text_channel.id)) == 1
    assert len(double.take_violations("40060")) == 1
    double.assert_clean()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("long", "content is 2001 characters"),
        ("row", "has 6 buttons"),
        ("custom", "custom_id is 101 characters"),
    ],
)
async def test_rule_violations_are_recorded(
    double: DiscordDouble, world: tuple[Guild, User], kind: str, expected: str
) -> None:
    guild, alice = world
    async with double.run_bot(TinyBot()) as bot:
        record = await double.slash(alice, guild, None, "bad", options={"kind": kind})
        response = await record.response()
        assert (response.status, response.code) == (400, 50035)
        await asyncio.sleep(0.05)
        assert bot.errors == [50035]
    assert any(expected in v for v in double.violations), double.violations
    assert double.channel_messages(guild.text_channel.id) == []


async def test_gateway_drop_resume_replays_interaction(
    double: DiscordDouble, world: tuple[Guild, User]
) -> None:
    guild, alice = world
    async with double.run_bot(TinyBot()) as bot:
        assert await double.drop_connection() == 1
        record = await double.slash(alice, guild, None, "style", options={"name": "anime"})
        await double.wait_resumed()
        await asyncio.wait_for(bot.resumed.wait(), 5)
        assert (await record.final_message()).content == "style anime"
        assert double.gateway.identifies == 1 and double.gateway.resumes == 1
    double.assert_clean()


async def test_attachment_read_of_user_upload_and_own_image(
    double: DiscordDouble, world: tuple[Guild, User]
) -> None:
    guild, alice = world
    upload = png_bytes(16, 12)
    attachment = double.add_attachment("cat.png", upload)
    async with double.run_bot(TinyBot()) as bot:
        record = await double.slash(alice, guild, None, "digest", attachments={"image": attachment})
        assert (await record.final_message()).content == f"cat.png 16x12 {len(upload)}"
        echoed = await (await double.slash(alice, guild, None, "echo", options={"text": "x"})).final_message()
        again = await double.slash(alice, guild, None, "digest", attachments={"image": echoed.attachments[0]})
        assert (await again.final_message()).content == f"echo.png 8x6 {len(png_bytes())}"
    assert bot.read_digests == [hashlib.sha256(upload).hexdigest(), hashlib.sha256(png_bytes()).hexdigest()]
    double.assert_clean()


async def test_world_rules_guard_the_test_side(double: DiscordDouble, world: tuple[Guild, User]) -> None:
    guild, alice = world
    outsider = double.add_user("bob")
    async with double.run_bot(TinyBot()):
        with pytest.raises(LookupError):
            await double.slash(alice, guild, None, "nope")
        with pytest.raises(ValueError, match="required"):
            await double.slash(alice, guild, None, "echo")
        with pytest.raises(PermissionError):
            await double.slash(outsider, guild, None, "ask")
    double.assert_clean()


def test_rules_on_payloads_directly() -> None:
    lim = limits()
    assert (lim.content, lim.embed_title, lim.custom_id, lim.row_items, lim.modal_title) == (
        2000,
        256,
        100,
        5,
        45,
    )
    good: dict[str, Any] = {
        "name": "gen",
        "description": "Generate",
        "options": [
            {"type": 3, "name": "prompt", "description": "p", "required": True},
            {"type": 4, "name": "steps", "description": "s", "required": False},
        ],
    }
    assert check_command(good) == []
    assert any("lower-case" in p for p in check_command(good | {"name": "Gen"}))
    swapped = good | {"options": list(reversed(good["options"]))}
    assert any("after an optional" in p for p in check_command(swapped))
    nested = {
        "type": 1,
        "name": "sub",
        "description": "d",
        "options": [{"type": 1, "name": "x", "description": "d"}],
    }
    assert any("nested" in p for p in check_command(good | {"options": [nested]}))
    embed = {
        "title": "t" * 256,
        "description": "d" * 4096,
        "fields": [{"name": "n", "value": "v" * 1024}] * 2,
    }
    assert any("6000" in p for p in check_message({"embeds": [embed]}))
    link = {"type": 2, "style": 5, "label": "go", "custom_id": "c"}
    assert any("link button" in p for p in check_components([{"type": 1, "components": [link]}]))
    assert any(
        "EPHEMERAL" in p or "flags" in p
        for p in check_message({"content": "x", "flags": 64}, interaction=False)
    )
