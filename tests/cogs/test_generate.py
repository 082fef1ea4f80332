"""Generation through Discord, end to end: the real dreamcord bot (real discord.py client) against the
local Discord double, a real engine and the shapes model."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image
from sqlalchemy import func, select

from pipelines.engine import Engine
from pipelines.settings import Settings
from storage.tables import Job
from tests.cogs.conftest import PURPLE_LORA, settled_message, upload_lora, wait_job_message
from tests.discord_double import DiscordDouble, Guild, User
from tests.discord_double.rules import check_command


def _png(
    size: tuple[int, int] = (64, 64), colour: str = "white", mask_box: tuple[int, int, int, int] | None = None
) -> bytes:
    image = Image.new("L" if mask_box else "RGB", size, 0 if mask_box else colour)
    if mask_box:
        image.paste(255, mask_box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _jobs(engine: Engine) -> int:
    async with engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Job)) or 0)


async def test_every_command_payload_passes_discords_rules(double: DiscordDouble, bot: Any) -> None:
    synced = double.commands()
    names = {command["name"] for command in synced}
    assert {
        "imagine",
        "img2img",
        "inpaint",
        "erase",
        "controlnet",
        "upscale",
        "queue",
        "cancel",
        "lora",
    } <= names
    for command in synced:
        assert check_command(command) == [], command["name"]
    double.assert_clean()


async def test_imagine_progress_result_buttons_then_upscale(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User
) -> None:
    record = await double.slash(
        alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 12, "seed": 5}
    )
    first = await record.response()
    assert first.callback_type == 5 and first.at < 3.0  # deferred within Discord's 3 seconds
    message = await wait_job_message(double, record)
    texts = [str(a.payload.get("content")) for a in record.actions if a.payload]
    assert any("next in line" in t or "in the queue" in t for t in texts), texts  # the position first
    assert any("step" in t for t in texts), texts  # then progress edits
    assert message.attachments and message.attachments[0]["filename"].endswith(".png")
    with Image.open(io.BytesIO(message.file_bytes(0))) as png:
        assert png.size == (64, 64) and "Seed: 5" in png.info["parameters"]
    custom_ids = [c["custom_id"] for row in message.components for c in row["components"]]
    assert "dc:up:1:0" in custom_ids and "dc:reroll:1" in custom_ids
    upscale = await double.click(alice, message, message.custom_id("U1"))
    result = await wait_job_message(double, upscale)
    with Image.open(io.BytesIO(result.file_bytes(0))) as png:
        assert png.size == (128, 128)  # the default upscale is 2×
    assert await _jobs(engine) == 2
    double.assert_clean()


async def test_bad_input_gets_one_ephemeral_sentence_and_stores_nothing(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User
) -> None:
    record = await double.slash(
        alice, guild, None, "imagine", options={"prompt": "a red circle", "width": 65}
    )
    reply = await settled_message(record, lambda m: m.ephemeral and "multiple of 8" in (m.content or ""))
    assert reply.content.count(".") <= 2  # one sentence (with its hint)
    assert await _jobs(engine) == 0
    unknown = await double.slash(alice, guild, None, "imagine", options={"prompt": "x <lora:nothing:1>"})
    reply = await settled_message(unknown, lambda m: m.ephemeral and bool(m.content))
    assert "There is no LoRA called nothing" in reply.content
    assert await _jobs(engine) == 0
    double.assert_clean()


async def test_inpaint_with_two_attachments(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User
) -> None:
    image = double.add_attachment("photo.png", _png(colour="blue"), "image/png")
    mask = double.add_attachment("mask.png", _png(mask_box=(16, 16, 48, 48)), "image/png")
    record = await double.slash(
        alice,
        guild,
        None,
        "inpaint",
        options={"prompt": "a red circle", "seed": 3},
        attachments={"image": image, "mask": mask},
    )
    message = await wait_job_message(double, record)
    assert message.attachments, message.content
    with Image.open(io.BytesIO(message.file_bytes(0))) as png:
        assert png.size == (64, 64) and "Mask blur" in png.info["parameters"]
    double.assert_clean()


async def test_remix_modal_makes_a_new_job_with_the_edits(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User
) -> None:
    record = await double.slash(alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4})
    message = await wait_job_message(double, record)
    click = await double.click(alice, message, message.custom_id("Remix"))
    modal = await click.response()
    assert modal.callback_type == 9
    remix = await double.submit_modal(
        alice,
        modal.payload["data"]["custom_id"],
        _modal_values(modal.payload, prompt="a blue square", seed="42"),
    )
    result = await wait_job_message(double, remix)
    with Image.open(io.BytesIO(result.file_bytes(0))) as png:
        assert "a blue square" in png.info["parameters"] and "Seed: 42" in png.info["parameters"]
    double.assert_clean()


def _modal_values(payload: dict[str, Any], **changes: str) -> dict[str, str]:
    values = {}
    for row in payload["data"]["components"]:
        for component in row["components"]:
            label = component["label"].lower()
            key = next((name for name in changes if label.startswith(name)), None)
            values[component["custom_id"]] = changes[key] if key else component.get("value", "")
    return values


async def test_buttons_work_after_a_restart(
    double: DiscordDouble, running_bot: Any, engine: Engine, guild: Guild, alice: User
) -> None:
    async with running_bot(engine):
        record = await double.slash(
            alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4}
        )
        message = await wait_job_message(double, record)
    async with running_bot(engine):  # a new bot process would know nothing but the custom_id
        reroll = await double.click(alice, message, message.custom_id("Reroll"))
        again = await wait_job_message(double, reroll)
        assert again.attachments
    double.assert_clean()


async def test_others_cannot_delete_and_the_owner_can(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User, bob: User
) -> None:
    record = await double.slash(alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4})
    message = await wait_job_message(double, record)
    refused = await double.click(bob, message, message.custom_id("Delete"))
    reply = await settled_message(refused, lambda m: m.ephemeral and bool(m.content))
    assert "Only the person who made this image" in reply.content
    assert not message.deleted
    deleted = await double.click(alice, message, message.custom_id("Delete"))
    await deleted.settled()
    assert message.deleted
    double.assert_clean()


async def test_cancel_button_stops_a_queued_job(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User
) -> None:
    engine.queue.pause()
    record = await double.slash(alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4})
    queued = await settled_message(
        record, lambda m: "queue" in (m.content or "") or "next in line" in (m.content or "")
    )
    click = await double.click(alice, queued, queued.custom_id("Cancel"))
    reply = await settled_message(click, lambda m: m.ephemeral and "cancelled" in (m.content or ""))
    assert reply.content == "Job 1 cancelled."
    final = await wait_job_message(double, record)
    assert "was cancelled" in final.content
    engine.queue.resume()
    double.assert_clean()


async def test_controlnet_result_shows_the_preprocessed_map(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User
) -> None:
    sketch = Image.new("RGB", (64, 64), "white")
    for x in range(16, 48):
        sketch.putpixel((x, 32), (0, 0, 0))
    buffer = io.BytesIO()
    sketch.save(buffer, format="PNG")
    control = double.add_attachment("sketch.png", buffer.getvalue(), "image/png")
    record = await double.slash(
        alice,
        guild,
        None,
        "controlnet",
        options={"prompt": "a red circle", "seed": 2},
        attachments={"control": control},
    )
    message = await wait_job_message(double, record)
    names = [a["filename"] for a in message.attachments]
    assert names[0].endswith("-1.png") and any("scribble" in n or "control" in n for n in names[1:]), names
    double.assert_clean()


async def test_lora_and_vae_pickers_offer_only_what_the_user_may_use(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User, bob: User
) -> None:
    upload = await upload_lora(double, alice, guild, PURPLE_LORA.read_bytes(), "purple.safetensors")
    await settled_message(upload, lambda m: "Added" in (m.content or ""))
    mine = await double.autocomplete(
        alice, guild, None, "imagine", "lora", options={"prompt": "x", "lora": "pur"}
    )
    theirs = await double.autocomplete(
        bob, guild, None, "imagine", "lora", options={"prompt": "x", "lora": "pur"}
    )
    assert [c["value"] for c in (await mine.response()).payload["data"]["choices"]] == ["purple"]
    assert (await theirs.response()).payload["data"]["choices"] == []
    double.assert_clean()


async def test_sync_commands_registers_every_command_once(double: DiscordDouble, settings: Any) -> None:
    from bot import command_payloads, sync_commands

    token_settings = Settings(**{**settings.model_dump(), "discord_token": double.token})
    assert await sync_commands(token_settings) == len(await command_payloads(settings))
    assert {c["name"] for c in double.commands()} >= {"imagine", "lora", "admin", "forget-me"}
    double.assert_clean()


async def test_a_result_after_the_token_expired_goes_to_the_channel(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User, monkeypatch: Any
) -> None:
    import cogs.presenter

    monkeypatch.setattr(cogs.presenter, "TOKEN_LIFETIME_S", 0.0)  # as if the queue took 15 minutes
    await double.slash(alice, guild, None, "imagine", options={"prompt": "a red circle", "steps": 4})
    posted = await double.wait_for_message(guild.channels[0].id, lambda m: bool(m.attachments), timeout=60)
    assert f"<@{alice.id}>" in posted.content and posted.embeds
    double.assert_clean()


async def test_results_too_big_for_the_upload_limit_are_reencoded(
    double: DiscordDouble, running_bot: Any, engine: Engine, alice: User
) -> None:
    small = double.add_guild("Small uploads", attachment_size_limit=6_000)
    double.add_member(small, alice)
    async with running_bot(engine):
        record = await double.slash(
            alice,
            small,
            None,
            "imagine",
            options={"prompt": "a red circle", "steps": 4, "count": 2, "width": 128, "height": 128},
        )
        message = await wait_job_message(double, record)
    names = [a["filename"] for a in message.attachments]
    note = " ".join(f["value"] for f in message.embeds[0].get("fields", []) if f["name"] == "Note")
    assert names and not any(n.endswith("-1.png") for n in names), names
    assert "JPEG" in note or "WebP" in note, note
    double.assert_clean()
