"""Server rules, bot administration and /forget-me through the Discord double."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image
from sqlalchemy import func, select

from pipelines.engine import Engine
from storage.tables import Job
from tests.cogs.conftest import PURPLE_LORA, settled_message, upload_lora, wait_job_message
from tests.discord_double import DiscordDouble, Guild, User


def _said(text: str) -> Any:
    return lambda m: m.ephemeral and text in (m.content or "")


async def _jobs(engine: Engine, user: int | None = None) -> int:
    query = select(func.count()).select_from(Job)
    if user is not None:
        query = query.where(Job.user_id == user)
    async with engine.db.sessions() as session:
        return int(await session.scalar(query) or 0)


async def test_server_rules_apply_to_every_job(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, admin: User
) -> None:
    record = await double.slash(
        admin,
        guild,
        None,
        "settings",
        subcommand="set",
        options={"banned_words": "square, /bl(u|o)e/", "forced_negative": "blurry"},
    )
    await settled_message(record, _said("Saved."))
    banned = await double.slash(alice, guild, None, "imagine", options={"prompt": "a red SQUARE"})
    await settled_message(banned, _said("does not allow"))
    regex = await double.slash(alice, guild, None, "imagine", options={"prompt": "a bloe circle"})
    await settled_message(regex, _said("does not allow"))
    assert await _jobs(engine) == 0
    allowed = await double.slash(
        alice, guild, None, "imagine", options={"prompt": "a squared red circle", "steps": 4}
    )
    message = await wait_job_message(double, allowed)
    with Image.open(io.BytesIO(message.file_bytes(0))) as png:
        assert "Negative prompt: blurry" in png.info["parameters"]
    shown = await double.slash(admin, guild, None, "settings", subcommand="show")
    await settled_message(shown, _said("Forced negative prompt: blurry"))
    double.assert_clean()


async def test_admin_pause_resume_stats_and_sync(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, admin: User
) -> None:
    paused = await double.slash(admin, guild, None, "admin", subcommand="pause")
    await settled_message(paused, _said("paused"))
    job = await double.slash(alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4})
    await settled_message(job, lambda m: "next in line" in (m.content or ""))
    stats = await double.slash(admin, guild, None, "admin", subcommand="stats")
    await settled_message(stats, _said("1 waiting, 0 running (paused)"))
    resumed = await double.slash(admin, guild, None, "admin", subcommand="resume")
    await settled_message(resumed, _said("running"))
    assert (await wait_job_message(double, job)).attachments
    synced = await double.slash(admin, guild, None, "admin", subcommand="sync")
    await settled_message(synced, _said("Synced"))
    double.assert_clean()


async def test_forget_me_deletes_the_users_jobs_and_files(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, bob: User
) -> None:
    mine = await double.slash(
        alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4, "seed": 1}
    )
    theirs = await double.slash(
        bob, guild, None, "imagine", options={"prompt": "a blue square", "steps": 4, "seed": 2}
    )
    await wait_job_message(double, mine)
    await wait_job_message(double, theirs)
    files_before = set(engine.files.iter_hashes())
    ask = await double.slash(alice, guild, None, "forget-me")
    prompt = await settled_message(ask, _said("Sure?"))
    confirm = await double.click(alice, prompt, prompt.custom_id("Delete everything"))
    await confirm.settled()
    assert await _jobs(engine, alice.id) == 0 and await _jobs(engine, bob.id) == 1
    files_after = set(engine.files.iter_hashes())
    assert files_after < files_before  # alice's images are gone, bob's stay
    double.assert_clean()


async def test_nsfw_prompts_are_spoilered_or_blocked_outside_age_restricted_channels(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, admin: User
) -> None:
    options = {"prompt": "a nude red circle", "steps": 4}
    spoilered = await wait_job_message(
        double, await double.slash(alice, guild, None, "imagine", options=options)
    )
    assert spoilered.attachments[0]["filename"].startswith("SPOILER_")
    nsfw_channel = guild.nsfw_channel
    plain = await wait_job_message(
        double, await double.slash(alice, guild, nsfw_channel, "imagine", options=options)
    )
    assert not plain.attachments[0]["filename"].startswith("SPOILER_")
    record = await double.slash(admin, guild, None, "settings", subcommand="set", options={"nsfw": "block"})
    await settled_message(record, _said("Saved."))
    blocked = await double.slash(alice, guild, None, "imagine", options=options)
    await settled_message(blocked, _said("age-restricted channels only"))
    allowed = await wait_job_message(
        double, await double.slash(alice, guild, nsfw_channel, "imagine", options=options)
    )
    assert allowed.attachments
    assert await _jobs(engine) == 3
    double.assert_clean()


async def test_channel_rules_override_the_servers(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, admin: User
) -> None:
    strict = double.add_channel(guild, "strict")
    record = await double.slash(
        admin,
        guild,
        None,
        "settings",
        subcommand="set",
        options={"banned_words": "square", "channel": strict},
    )
    await settled_message(record, _said("Saved for #strict."))
    refused = await double.slash(alice, guild, strict, "imagine", options={"prompt": "a red square"})
    await settled_message(refused, _said("does not allow"))
    elsewhere = await double.slash(
        alice, guild, None, "imagine", options={"prompt": "a red square", "steps": 4}
    )
    assert (await wait_job_message(double, elsewhere)).attachments
    double.assert_clean()


async def test_preferences_are_each_users_own_defaults(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User, bob: User
) -> None:
    record = await double.slash(
        alice,
        guild,
        None,
        "preferences",
        subcommand="set",
        options={"negative": "ugly", "steps": 5, "sampler": "Euler a"},
    )
    await settled_message(record, _said("Saved your defaults."))
    mine = await wait_job_message(
        double, await double.slash(alice, guild, None, "imagine", options={"prompt": "a red circle"})
    )
    theirs = await wait_job_message(
        double,
        await double.slash(bob, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4}),
    )
    with Image.open(io.BytesIO(mine.file_bytes(0))) as png:
        text = png.info["parameters"]
        assert "Negative prompt: ugly" in text and "Steps: 5" in text and "Sampler: Euler a" in text
    with Image.open(io.BytesIO(theirs.file_bytes(0))) as png:
        assert "ugly" not in png.info["parameters"]
    explicit = await double.slash(
        alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 3}
    )
    with Image.open(io.BytesIO((await wait_job_message(double, explicit)).file_bytes(0))) as png:
        assert "Steps: 3" in png.info["parameters"]  # what is typed wins over the defaults
    double.assert_clean()


async def test_a_server_can_keep_uploads_to_its_admins(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User, admin: User
) -> None:
    record = await double.slash(
        admin, guild, None, "settings", subcommand="set", options={"uploads": "admins"}
    )
    await settled_message(record, _said("Saved."))
    lora = PURPLE_LORA.read_bytes()
    refused = await upload_lora(double, alice, guild, lora, "p.safetensors")
    await settled_message(refused, _said("only members with Manage Server can add files"))
    allowed = await upload_lora(double, admin, guild, lora, "p.safetensors")
    await settled_message(allowed, _said("Added"))
    double.assert_clean()


async def test_admin_models_refresh_finds_a_new_checkpoint(
    double: DiscordDouble,
    bot: Any,
    engine: Engine,
    guild: Guild,
    admin: User,
    tmp_path: Any,
    tiny_models: Any,
) -> None:
    root = tmp_path / "webui"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    engine.registry.models_root = root  # as if the settings named an A1111 folder
    engine.registry.refresh()
    mine = root / "models" / "Stable-diffusion" / "mine"
    mine.mkdir()
    index = (tiny_models / "sd15" / "model_index.json").read_text()
    (mine / "model_index.json").write_text(index)  # a diffusers folder appears (loading is not tried here)
    record = await double.slash(admin, guild, None, "admin", subcommand="models")
    reply = await record.final_message()
    assert "new: mine" in reply.content, reply.content
    double.assert_clean()


async def test_server_limits_and_the_users_storage_quota(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, admin: User
) -> None:
    record = await double.slash(
        admin, guild, None, "settings", subcommand="set", options={"max_steps": 10, "max_count": 2}
    )
    await settled_message(record, _said("Saved."))
    steps = await double.slash(alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 11})
    await settled_message(steps, _said("at most 10 steps"))
    count = await double.slash(
        alice, guild, None, "imagine", options={"prompt": "a red circle", "count": 3, "steps": 4}
    )
    await settled_message(count, _said("at most 2 image(s)"))
    assert await _jobs(engine) == 0
    lora = PURPLE_LORA.read_bytes()
    engine.settings = engine.settings.model_copy(update={"user_storage_mb": 1})
    first = await upload_lora(double, alice, guild, lora, "a.safetensors")
    await settled_message(first, _said("Added"))
    over = await upload_lora(double, alice, guild, lora + b" " * (1 << 20), "b.safetensors")
    await settled_message(over, _said("of your 1 MB"))
    double.assert_clean()
