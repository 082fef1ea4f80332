"""Who may see and touch what, through the real bot on the Discord double (issue 8, "Security").

One world per module (the double, a real engine on the tiny models, the bot): alice owns a PRIVATE LoRA
and a PRIVATE embedding (uploaded in "Dream Guild") and has made one job with both. Each case below is
one thing bob (or someone else who is not allowed) tries; tests that change the world put it back.

Every refusal is one private sentence, the same for "exists but is not yours" and "does not exist" (no
existence oracle), and stores nothing.

Decisions: a job posted in a server may be shown again there by anyone (``/show``; it is public there
already, prompt included), under the showing channel's NSFW rule; never in another server. An embedding is
a word: someone else's private one is plain text for you, as a missing one is. The double hides admin
commands from members without Manage Server, so those cases switch that off ("a modified client", or a
server whose owner granted the commands to everyone): the bot must refuse them itself.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import discord
import pytest
import pytest_asyncio
import torch
from discord.ext import commands
from PIL import Image
from safetensors.torch import save as save_safetensors
from sqlalchemy import select

from pipelines.engine import Engine
from pipelines.settings import Settings
from storage.tables import Asset, Job, JobStatus
from storage.users import get_guild_settings
from tests.cogs.conftest import PURPLE_LORA, serving, settled_message, upload_lora, wait_job_message
from tests.cogs.replies import answer, count_rows, sentence, shown, slash
from tests.discord_double import DiscordDouble, Guild, InteractionRecord, StoredMessage, User
from tests.discord_double import dispatch as double_dispatch

pytestmark = pytest.mark.asyncio(loop_scope="module")

LORA, EMBEDDING, MISSING = "purple", "shapey", "nosuch"
NOT_ADMIN = "Only members with Manage Server can do that."
NOT_YOURS_TO_DELETE = "Only the person who made this image or a server admin can delete it."


@dataclass
class World:
    double: DiscordDouble
    engine: Engine
    bot: commands.Bot
    guild: Guild  # where alice uploaded and made her job
    elsewhere: Guild  # alice and bob are members here too; carol administers it
    alice: User
    bob: User
    admin: User  # Manage Server in guild
    carol: User  # Manage Server in elsewhere only; a plain member of guild
    job_id: int  # alice's job with her private LoRA and embedding
    job_message: StoredMessage
    data_dir: Path


def _embedding_bytes() -> bytes:
    """A webui embedding for the shapes model (2 vectors of its text encoder's width, 64)."""
    generator = torch.Generator().manual_seed(3)
    return save_safetensors({"emb_params": torch.randn(2, 64, generator=generator) * 0.3})


async def _setup_alice(double: DiscordDouble, guild: Guild, alice: User) -> tuple[int, StoredMessage]:
    lora = await upload_lora(double, alice, guild, PURPLE_LORA.read_bytes(), f"{LORA}.safetensors")
    assert (await answer(lora)).startswith(f"Added {LORA}: LoRA")
    attachment = double.add_attachment(f"{EMBEDDING}.safetensors", _embedding_bytes())
    embedding = await double.slash(
        alice, guild, None, "embedding", subcommand="upload", attachments={"file": attachment}
    )
    assert (await answer(embedding)).startswith(f"Added {EMBEDDING}: embedding")
    made = await slash(
        double, alice, guild, "imagine", prompt=f"a red circle {EMBEDDING} <lora:{LORA}:1>", steps=2, seed=1
    )
    message = await wait_job_message(double, made)
    assert message.attachments, message.content
    job_id = int(message.embeds[0]["footer"]["text"].split()[1])
    return job_id, message


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("security") / "data"
    settings = Settings(data_dir=data_dir, builtin_models_dir=tiny_models, preview_every=0)

    def people(double: DiscordDouble) -> tuple[Guild, Guild, User, User, User, User]:
        guild = double.add_guild("Dream Guild", nsfw_channel=True)
        elsewhere = double.add_guild("Elsewhere")
        alice, bob = double.add_user("alice", guild), double.add_user("bob", guild)
        admin = double.add_user("admin", guild, permissions=["manage_guild"])
        carol = double.add_user("carol", elsewhere, permissions=["manage_guild"])
        double.add_member(guild, carol)
        double.add_member(elsewhere, alice)
        double.add_member(elsewhere, bob)
        return guild, elsewhere, alice, bob, admin, carol

    async with serving(settings, people) as (double, engine, started, made):
        guild, elsewhere, alice, bob, admin, carol = made
        job_id, message = await _setup_alice(double, guild, alice)
        yield World(
            double, engine, started, guild, elsewhere, alice, bob, admin, carol, job_id, message, data_dir
        )


async def _jobs(world: World) -> int:
    return await count_rows(world.engine, Job)


def _same_answer(private: str, missing: str) -> None:
    """The refusal for alice's private asset and for a name nobody has read the same (no oracle)."""
    assert private.replace(LORA, "<name>").replace(EMBEDDING, "<name>") == missing.replace(
        MISSING, "<name>"
    ), (private, missing)


# ---- private assets: every way bob could reach them ------------------------------------------------------

Probe = Callable[[World, User, Guild, str], Awaitable[InteractionRecord]]


async def _prompt_tag(w: World, user: User, guild: Guild, name: str) -> InteractionRecord:
    return await slash(w.double, user, guild, "imagine", prompt=f"a red circle <lora:{name}:1>", steps=2)


async def _negative_tag(w: World, user: User, guild: Guild, name: str) -> InteractionRecord:
    return await slash(
        w.double, user, guild, "imagine", prompt="a red circle", negative=f"<lora:{name}:1>", steps=2
    )


async def _lora_picker(w: World, user: User, guild: Guild, name: str) -> InteractionRecord:
    return await slash(w.double, user, guild, "imagine", prompt="a red circle", lora=name, steps=2)


async def _lora_info(w: World, user: User, guild: Guild, name: str) -> InteractionRecord:
    return await slash(w.double, user, guild, "lora", "info", name=name)


async def _embedding_info(w: World, user: User, guild: Guild, name: str) -> InteractionRecord:
    return await slash(w.double, user, guild, "embedding", "info", name=name.replace(LORA, EMBEDDING))


async def _lora_share(w: World, user: User, guild: Guild, name: str) -> InteractionRecord:
    return await slash(w.double, user, guild, "lora", "share", name=name)


async def _lora_delete(w: World, user: User, guild: Guild, name: str) -> InteractionRecord:
    return await slash(w.double, user, guild, "lora", "delete", name=name)


#: (id, probe, the sentence bob gets for alice's private asset, with <name> for its name)
REFUSED_PROBES: list[tuple[str, Probe, str]] = [
    ("prompt-lora-tag", _prompt_tag, "There is no LoRA called <name> that you can use here; "
     "check the name with /lora list or upload it."),
    ("negative-lora-tag", _negative_tag, "There is no LoRA called <name> that you can use here; "
     "check the name with /lora list or upload it."),
    ("lora-picker", _lora_picker, "There is no LoRA called <name> that you can use here; "
     "check the name with /lora list or upload it."),
    ("lora-info", _lora_info, "There is no LoRA called <name> that you can use here."),
    ("embedding-info", _embedding_info, "There is no embedding called <name> that you can use here."),
    ("lora-share-not-owner", _lora_share, "You have no LoRA called <name>; see the list of your LoRAs."),
    ("lora-delete-not-owner", _lora_delete, "You have no LoRA called <name>; see the list of your LoRAs."),
]  # fmt: skip


@pytest.mark.parametrize(
    ("probe", "expected"), [p[1:] for p in REFUSED_PROBES], ids=[p[0] for p in REFUSED_PROBES]
)
async def test_private_asset_is_refused_like_a_missing_one(world: World, probe: Probe, expected: str) -> None:
    jobs, assets = await _jobs(world), await count_rows(world.engine, Asset)
    private = await sentence(await probe(world, world.bob, world.guild, LORA))
    missing = await sentence(await probe(world, world.bob, world.guild, MISSING))
    assert private.replace(LORA, "<name>").replace(EMBEDDING, "<name>") == expected
    _same_answer(private, missing)
    assert await _jobs(world) == jobs and await count_rows(world.engine, Asset) == assets
    async with world.engine.db.sessions() as session:  # alice's files are untouched
        rows = list(await session.scalars(select(Asset).where(Asset.owner_id == world.alice.id)))
    assert sorted((r.name, r.visibility.value) for r in rows) == [(LORA, "private"), (EMBEDDING, "private")]


#: (id, command, subcommand, focused option)
AUTOCOMPLETES = [
    ("autocomplete-imagine-lora", "imagine", None, "lora"),
    ("autocomplete-imagine-embedding", "imagine", None, "embedding"),
    ("autocomplete-lora-info", "lora", "info", "name"),
    ("autocomplete-lora-share", "lora", "share", "name"),
    ("autocomplete-embedding-info", "embedding", "info", "name"),
]


@pytest.mark.parametrize(
    ("command", "sub", "focused"), [a[1:] for a in AUTOCOMPLETES], ids=[a[0] for a in AUTOCOMPLETES]
)
async def test_autocomplete_never_offers_a_private_asset(
    world: World, command: str, sub: str | None, focused: str
) -> None:
    async def choices(user: User, typed: str) -> list[str]:
        options = {"prompt": "x"} if command == "imagine" else {}
        record = await world.double.autocomplete(
            user, world.guild, None, command, focused, subcommand=sub, options={**options, focused: typed}
        )
        await record.response()
        assert record.choices is not None
        return [c["value"] for c in record.choices]

    name = EMBEDDING if "embedding" in focused + command else LORA
    assert await choices(world.alice, "") == [name]  # the owner sees it: the picker does work
    assert await choices(world.bob, "") == []
    assert await choices(world.bob, name[:3]) == []


@pytest.mark.parametrize("kind", ["lora", "embedding"], ids=["lora-list", "embedding-list"])
async def test_lists_show_only_what_the_user_may_use(world: World, kind: str) -> None:
    theirs = await answer(await slash(world.double, world.bob, world.guild, kind, "list"))
    label = "LoRA" if kind == "lora" else "embedding"
    assert theirs == f"There are no {label}s you can use here yet; `/{kind} upload` one."
    mine = await answer(await slash(world.double, world.alice, world.guild, kind, "list"))
    assert mine.startswith(f"`{LORA if kind == 'lora' else EMBEDDING}` — ") and mine.endswith("· private")


async def test_sharing_is_for_one_server(world: World) -> None:
    """Shared with Dream Guild: bob may use it there (info, picker), still not in another server."""
    shared = await slash(world.double, world.alice, world.guild, "lora", "share", name=LORA)
    assert await sentence(shared) == f"`{LORA}` is now shared with this server."
    try:
        info = await sentence(await _lora_info(world, world.bob, world.guild, LORA))
        assert info.startswith(f"`{LORA}`: a LoRA") and info.endswith(f"`<lora:{LORA}:0.8>`."), info
        picker = await world.double.autocomplete(
            world.bob, world.guild, None, "imagine", "lora", options={"prompt": "x", "lora": ""}
        )
        assert [c["value"] for c in (await picker.response()).payload["data"]["choices"]] == [LORA]
        for probe in (_lora_info, _prompt_tag, _lora_picker):
            elsewhere = await sentence(await probe(world, world.bob, world.elsewhere, LORA))
            missing = await sentence(await probe(world, world.bob, world.elsewhere, MISSING))
            _same_answer(elsewhere, missing)
        listed = await answer(await slash(world.double, world.bob, world.elsewhere, "lora", "list"))
        assert LORA not in listed
    finally:
        private = await slash(
            world.double, world.alice, world.guild, "lora", "share", name=LORA, **{"with": "private"}
        )
        assert await sentence(private) == f"`{LORA}` is now private."
    assert await sentence(await _lora_info(world, world.bob, world.guild, LORA)) == (
        f"There is no LoRA called {LORA} that you can use here."
    )


async def test_sharing_goes_to_the_server_where_it_is_asked(world: World) -> None:
    """Uploaded in Dream Guild, shared from Elsewhere: usable in Elsewhere (as answered), not in Dream."""
    shared = await slash(world.double, world.alice, world.elsewhere, "lora", "share", name=LORA)
    assert await sentence(shared) == f"`{LORA}` is now shared with this server."
    try:
        there = await sentence(await _lora_info(world, world.bob, world.elsewhere, LORA))
        assert there.startswith(f"`{LORA}`: a LoRA"), there
        here = await sentence(await _lora_info(world, world.bob, world.guild, LORA))
        assert here == f"There is no LoRA called {LORA} that you can use here."
    finally:
        private = await slash(
            world.double, world.alice, world.guild, "lora", "share", name=LORA, **{"with": "private"}
        )
        assert await sentence(private) == f"`{LORA}` is now private."


async def _adapters_of(world: World, job_id: int) -> list[str]:
    async with world.engine.db.sessions() as session:
        job = await session.get(Job, job_id)
    assert job is not None
    return [a["name"] for a in job.spec.get("adapters") or []]


@pytest.mark.parametrize(
    "options",
    [{"prompt": f"a red circle {EMBEDDING}"}, {"prompt": "a red circle", "embedding": EMBEDDING}],
    ids=["prompt-embedding-word", "embedding-picker"],
)
async def test_a_private_embedding_is_plain_text_for_others(world: World, options: dict[str, Any]) -> None:
    """An embedding is triggered by a word; for bob alice's is just the word (as a missing one would be)."""
    assert sorted(await _adapters_of(world, world.job_id)) == sorted([LORA, EMBEDDING])  # alice's job used it
    with Image.open(io.BytesIO(world.job_message.file_bytes(0))) as png:
        assert f'TI hashes: "{EMBEDDING}: ' in png.info["parameters"]
    record = await slash(world.double, world.bob, world.guild, "imagine", steps=2, seed=3, **options)
    message = await wait_job_message(world.double, record)
    assert message.attachments, message.content
    job_id = int(message.embeds[0]["footer"]["text"].split()[1])
    assert await _adapters_of(world, job_id) == []
    with Image.open(io.BytesIO(message.file_bytes(0))) as png:
        assert "TI hashes" not in png.info["parameters"] and EMBEDDING in png.info["parameters"]


# ---- alice's job: /show and its buttons ------------------------------------------------------------------


async def test_show_in_the_same_server_reposts_it(world: World) -> None:
    """Decision: a job posted in a server may be shown again there (it is already public there)."""
    record = await slash(world.double, world.bob, world.guild, "show", job=world.job_id)
    assert await answer(record, ephemeral=False) == ""
    (message,) = shown(record)
    assert message.file_bytes(0) == world.job_message.file_bytes(0)


@pytest.mark.parametrize(
    ("who", "where"),
    [("bob", "elsewhere"), ("carol", "elsewhere")],
    ids=["show-other-guild", "show-other-guild-admin"],
)
async def test_show_in_another_server_is_refused_like_a_missing_job(
    world: World, who: str, where: str
) -> None:
    user, guild = getattr(world, who), getattr(world, where)
    refused = await sentence(await slash(world.double, user, guild, "show", job=world.job_id))
    missing = await sentence(await slash(world.double, user, guild, "show", job=world.job_id + 10**6))
    assert refused == f"There is no job {world.job_id} that you can see here."
    assert missing == refused.replace(str(world.job_id), str(world.job_id + 10**6))


async def test_show_keeps_the_servers_nsfw_rule(world: World) -> None:
    """A job made in an age-restricted channel, shown in an ordinary one: spoilered, or refused under
    "block" (it must not get around the rule its own channel was chosen for)."""
    nsfw = world.guild.nsfw_channel
    assert nsfw is not None
    made = await world.double.slash(
        world.alice, world.guild, nsfw, "imagine", options={"prompt": "a nude red circle", "steps": 2}
    )
    original = await wait_job_message(world.double, made)
    assert not original.attachments[0]["filename"].startswith("SPOILER_")  # fine where it was made
    job_id = int(original.embeds[0]["footer"]["text"].split()[1])
    again = await slash(world.double, world.bob, world.guild, "show", job=job_id)
    await answer(again, ephemeral=False)
    assert all(a["filename"].startswith("SPOILER_") for a in shown(again)[0].attachments)
    block = await world.double.slash(world.admin, world.guild, None, "settings", subcommand="set",
                                     options={"nsfw": "block"})  # fmt: skip
    assert await sentence(block) == "Saved."
    try:
        blocked = await sentence(await slash(world.double, world.bob, world.guild, "show", job=job_id))
        assert blocked == "That job is for age-restricted channels only on this server; use one of those."
        there = await world.double.slash(world.bob, world.guild, nsfw, "show", options={"job": job_id})
        assert await answer(there, ephemeral=False) == ""  # where it belongs it is shown as made
        assert not any(a["filename"].startswith("SPOILER_") for a in shown(there)[0].attachments)
    finally:
        reset = await world.double.slash(world.admin, world.guild, None, "settings", subcommand="set",
                                         options={"nsfw": "spoiler"})  # fmt: skip
        assert await sentence(reset) == "Saved."


async def _click(world: World, user: User, label: str) -> InteractionRecord:
    return await world.double.click(user, world.job_message, world.job_message.custom_id(label))


async def _remix_unchanged(world: World, user: User) -> InteractionRecord:
    click = await _click(world, user, "Remix")
    modal = await click.response()
    assert modal.callback_type == 9
    values = {
        c["custom_id"]: c.get("value", "")
        for row in modal.payload["data"]["components"]
        for c in row["components"]
    }
    return await world.double.submit_modal(user, modal.payload["data"]["custom_id"], values)


FOLLOWUPS: list[tuple[str, Callable[[World, User], Awaitable[InteractionRecord]]]] = [
    ("reroll-private-lora", lambda w, u: _click(w, u, "Reroll")),
    ("variation-private-lora", lambda w, u: _click(w, u, "V+1")),
    ("remix-private-lora", _remix_unchanged),
]


@pytest.mark.parametrize("act", [f[1] for f in FOLLOWUPS], ids=[f[0] for f in FOLLOWUPS])
async def test_new_jobs_from_alices_result_cannot_use_her_private_lora(
    world: World, act: Callable[[World, User], Awaitable[InteractionRecord]]
) -> None:
    jobs = await _jobs(world)
    text = await sentence(await act(world, world.bob))
    assert text == (
        f"There is no LoRA called {LORA} that you can use here; check the name with /lora list or upload it."
    )
    assert await _jobs(world) == jobs


async def test_upscale_of_a_job_with_adapters_works_for_its_owner(world: World) -> None:
    """U1 makes an upscale job from the result image; the prompt's LoRA tag and embedding word must not
    stop it (an upscale applies no adapters), and bob's U1 works too: no private asset is used."""
    for user in (world.alice, world.bob):
        record = await _click(world, user, "U1")
        message = await wait_job_message(world.double, record)
        assert message.attachments, (user.name, message.content)
        job_id = int(message.embeds[0]["footer"]["text"].split()[1])
        assert await _adapters_of(world, job_id) == []


# ---- Delete, Cancel, /cancel ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "allowed"),
    [("bob", False), ("carol", False), ("admin", True), ("alice", True)],
    ids=[
        "delete-button-other",
        "delete-button-admin-elsewhere",
        "delete-button-admin",
        "delete-button-owner",
    ],
)
async def test_delete_button(world: World, who: str, allowed: bool) -> None:
    repost = await slash(world.double, world.alice, world.guild, "show", job=world.job_id)
    await answer(repost, ephemeral=False)
    (message,) = shown(repost)
    click = await world.double.click(getattr(world, who), message, message.custom_id("Delete"))
    if allowed:
        await click.settled()
        assert message.deleted and not click.errors
    else:
        assert await sentence(click) == NOT_YOURS_TO_DELETE
        assert not message.deleted
    assert not world.job_message.deleted


async def _queued_job(world: World) -> tuple[int, StoredMessage]:
    record = await slash(world.double, world.alice, world.guild, "imagine", prompt="a red circle", steps=2)
    message = await settled_message(
        record, lambda m: "next in line" in m.content or "in the queue" in m.content
    )
    return int(message.content.split()[1]), message


async def _status(world: World, job_id: int) -> JobStatus:
    async with world.engine.db.sessions() as session:
        job = await session.get(Job, job_id)
    assert job is not None
    return job.status


#: (id, who, where, how, allowed)
CANCEL_CASES = [
    ("cancel-button-other", "bob", "guild", "button", False),
    ("cancel-command-other", "bob", "guild", "command", False),
    ("cancel-command-admin-elsewhere", "carol", "elsewhere", "command", False),
    ("cancel-button-admin-elsewhere", "carol", "guild", "button", False),
    ("cancel-command-admin", "admin", "guild", "command", True),
    ("cancel-button-admin", "admin", "guild", "button", True),
    ("cancel-button-owner", "alice", "guild", "button", True),
]


@pytest.mark.parametrize(
    ("who", "where", "how", "allowed"), [c[1:] for c in CANCEL_CASES], ids=[c[0] for c in CANCEL_CASES]
)
async def test_cancel(world: World, who: str, where: str, how: str, allowed: bool) -> None:
    world.engine.queue.pause()
    try:
        job_id, message = await _queued_job(world)
        user, guild = getattr(world, who), getattr(world, where)
        if how == "button":
            record = await world.double.click(user, message, message.custom_id("Cancel"))
        else:
            record = await slash(world.double, user, guild, "cancel", job=job_id)
        text = await sentence(record)
        if allowed:
            assert text == f"Job {job_id} cancelled."
            assert await _status(world, job_id) == JobStatus.CANCELLED
            return
        assert text == f"There is no job {job_id} that you can cancel."
        missing = await sentence(await slash(world.double, user, guild, "cancel", job=job_id + 10**6))
        assert missing == text.replace(str(job_id), str(job_id + 10**6))  # the same as for no job at all
        assert await _status(world, job_id) == JobStatus.QUEUED and world.engine.status(job_id) is not None
        assert not message.deleted
        assert await sentence(await slash(world.double, world.alice, world.guild, "cancel", job=job_id)) == (
            f"Job {job_id} cancelled."
        )
    finally:
        world.engine.queue.resume()


# ---- admin commands sent by someone who is not an admin -------------------------------------------------


#: (id, who, where, command, subcommand, options)
ADMIN_CASES: list[tuple[str, str, str, str, str, dict[str, Any]]] = [
    ("settings-set", "bob", "guild", "settings", "set", {"banned_words": "circle", "max_steps": 1}),
    ("settings-set-channel", "bob", "guild", "settings", "set", {"nsfw": "block", "channel": "general"}),
    ("settings-set-admin-elsewhere", "carol", "guild", "settings", "set", {"uploads": "admins"}),
    ("settings-show", "bob", "guild", "settings", "show", {}),
    ("admin-pause", "bob", "guild", "admin", "pause", {}),
    ("admin-resume", "bob", "guild", "admin", "resume", {}),
    ("admin-stats", "bob", "guild", "admin", "stats", {}),
    ("admin-sync", "bob", "guild", "admin", "sync", {}),
    ("admin-models", "carol", "guild", "admin", "models", {}),
]


@pytest.mark.parametrize(
    ("who", "where", "command", "sub", "options"),
    [c[1:] for c in ADMIN_CASES],
    ids=[c[0] for c in ADMIN_CASES],
)
async def test_admin_commands_are_checked_on_the_server(
    world: World, monkeypatch: pytest.MonkeyPatch, who: str, where: str, command: str, sub: str,
    options: dict[str, Any],
) -> None:  # fmt: skip
    synced = next(c for c in world.double.commands() if c["name"] == command)
    assert int(synced["default_member_permissions"]) == discord.Permissions(manage_guild=True).value
    guild: Guild = getattr(world, where)
    if "channel" in options:
        options = {**options, "channel": guild.channel(options["channel"])}
    # A modified client (or a server that granted the command to everyone) sends it anyway:
    monkeypatch.setattr(double_dispatch, "check_visible", lambda *args: None)
    if sub == "resume":
        world.engine.queue.pause()
    try:
        async with world.engine.db.sessions() as session:
            before = await get_guild_settings(session, guild.id)
        paused, syncs = world.engine.queue.paused, len(world.double.syncs)
        record = await world.double.slash(
            getattr(world, who), guild, None, command, subcommand=sub, options=options
        )
        assert await sentence(record) == NOT_ADMIN
        async with world.engine.db.sessions() as session:
            assert await get_guild_settings(session, guild.id) == before
        assert world.engine.queue.paused == paused and len(world.double.syncs) == syncs
    finally:
        world.engine.queue.resume()


# ---- quotas ----------------------------------------------------------------------------------------------


async def test_jobs_per_user_quota(world: World) -> None:
    """``queue_per_user``: the third waiting job of one user is refused with a sentence, nothing stored."""
    limits = world.engine.queue.limits
    world.engine.queue.limits = replace(limits, per_user=2)
    world.engine.queue.pause()
    queued: list[int] = []
    try:
        for _ in range(2):
            queued.append((await _queued_job(world))[0])
        jobs = await _jobs(world)
        record = await slash(
            world.double, world.alice, world.guild, "imagine", prompt="a red circle", steps=2
        )
        assert await sentence(record) == (
            "You already have 2 jobs waiting or running; wait for one to finish or cancel one."
        )
        assert await _jobs(world) == jobs
        others = await slash(world.double, world.bob, world.guild, "imagine", prompt="a red circle", steps=2)
        message = await settled_message(others, lambda m: m.content.startswith("Job "))
        queued.append(int(message.content.split()[1]))  # the quota is per user: bob's job is taken
    finally:
        world.engine.queue.limits = limits
        for job_id in queued:
            await world.engine.cancel(job_id, None)
        world.engine.queue.resume()


async def test_storage_quota(world: World) -> None:
    """``user_storage_mb``: an upload that would pass the quota is refused before it is downloaded, and an
    import once the quota is used up; nothing is stored."""
    settings = world.engine.settings
    world.engine.settings = settings.model_copy(update={"user_storage_mb": 1})
    dave = world.double.add_user("dave", world.guild)
    try:
        data = PURPLE_LORA.read_bytes()  # 233 KB
        first = await upload_lora(world.double, dave, world.guild, data, "first.safetensors")
        assert (await answer(first)).startswith("Added first: LoRA")
        assets, files = await count_rows(world.engine, Asset), set(world.engine.files.iter_hashes())
        big = world.double.add_attachment("big.safetensors", data + b" " * (700 * 1024))
        record = await world.double.slash(
            dave, world.guild, None, "lora", subcommand="upload", attachments={"file": big}
        )
        text = await sentence(record)
        assert "of your 1 MB" in text and "/lora delete" in text, text
        assert ("GET", big["url"].removeprefix(world.double.url)) not in world.double.requests
        world.engine.settings = settings.model_copy(update={"user_storage_mb": 0})
        imported = await slash(
            world.double, dave, world.guild, "lora", "import", url="https://huggingface.co/x"
        )
        text = await sentence(imported)
        assert "of your 0 MB" in text, text
        assert await count_rows(world.engine, Asset) == assets
        assert set(world.engine.files.iter_hashes()) == files
    finally:
        world.engine.settings = settings
        deleted = await slash(world.double, dave, world.guild, "lora", "delete", name="first")
        assert await sentence(deleted) == "Deleted your LoRA `first`."


# ---- file names never reach the filesystem ---------------------------------------------------------------


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize(
    "filename",
    [
        "../../evil.safetensors",
        "..\\..\\evil.safetensors",
        "/tmp/evil.safetensors",
        "evil\u202etxt.safetensors",
    ],
    ids=["upload-name-dotdot", "upload-name-backslash", "upload-name-absolute", "upload-name-rtl"],
)
async def test_upload_file_names_never_reach_the_filesystem(
    world: World, scratch: Path, filename: str
) -> None:
    data = PURPLE_LORA.read_bytes().replace(b'"purple', b'"Purple', 1)  # other bytes than alice's copy
    assert data != PURPLE_LORA.read_bytes()
    root = world.data_dir.parent
    before = _tree(root)
    erin = world.double.add_user("erin", world.guild)
    attachment = world.double.add_attachment("upload.safetensors", data)
    attachment["filename"] = filename  # what the bot is told the file is called
    record = await world.double.slash(
        erin, world.guild, None, "lora", subcommand="upload", attachments={"file": attachment}
    )
    text = await answer(record)
    assert text.startswith("Added evil"), text
    new = _tree(root) - before
    files_dir = world.engine.settings.files_dir.resolve()
    sha = hashlib.sha256(data).hexdigest()
    for path in new:
        resolved = path.resolve()
        if path.is_file():
            assert resolved.is_relative_to(files_dir) or resolved.name.startswith("dreamcord.db"), path
    stored = [p for p in new if p.is_file()]
    assert [p.name for p in stored if p.resolve().is_relative_to(files_dir)] == [sha]
    for entry in _tree(files_dir):
        if entry.is_file() and ".tmp" not in entry.parts:
            assert re.fullmatch(r"[0-9a-f]{64}", entry.name), entry
    assert list(scratch.iterdir()) == []  # the upload's scratch folder is gone
    for folder in {
        Path.cwd(),
        Path.cwd().parent,
        root,
        root.parent,
        scratch.parent,
    }:
        assert not any("evil" in p.name for p in folder.iterdir()), folder
    deleted = await slash(world.double, erin, world.guild, "lora", "delete", name=text.split()[1].rstrip(":"))
    assert (await sentence(deleted)).startswith("Deleted your LoRA")
