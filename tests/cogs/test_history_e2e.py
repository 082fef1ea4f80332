"""History commands through Discord, end to end: ``/history``, ``/show``, ``/pnginfo`` and ``/prompt explain``
(``cogs/history.py``) with the real dreamcord bot against the local Discord double and the shapes model."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin
from sqlalchemy import select

from pipelines.engine import Engine
from storage.tables import Job
from tests.cogs.conftest import wait_job_message
from tests.cogs.replies import answer, sentence, shown, slash
from tests.discord_double import DiscordDouble, Guild, User


def _png(info: dict[str, str] | None = None) -> bytes:
    meta = PngImagePlugin.PngInfo()
    for key, value in (info or {}).items():
        meta.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


async def test_history_show_and_pnginfo_after_a_job(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, bob: User
) -> None:
    made = await slash(double, alice, guild, "imagine", prompt="a blue square", steps=4, seed=7)
    result = await wait_job_message(double, made)
    assert result.attachments, result.content
    async with engine.db.sessions() as session:
        (job,) = list(await session.scalars(select(Job)))
    assert (job.user_id, job.guild_id, job.status.value) == (alice.id, guild.id, "done")

    history = await slash(double, alice, guild, "history")
    assert await answer(history) == (
        f"`{job.id}` done · {job.kind} · 'a blue square'\npage 1 of 1 · `/show job:<id>` to see one"
    )
    for user, options, expected in (
        (bob, {}, "You have no jobs yet; try `/imagine`."),
        (alice, {"status": "failed"}, "You have no failed jobs."),
        (alice, {"page": 2}, "There is no page 2; these jobs fill 1 page."),
    ):
        record = await slash(double, user, guild, "history", **options)
        assert await answer(record) == expected

    # /show: the owner anywhere; others only in the server the job was made in
    again = await slash(double, alice, guild, "show", job=job.id)
    reposted = await answer(again, ephemeral=False)
    message = shown(again)[0]
    assert reposted == "" and message.embeds[0]["description"] == "a blue square"
    assert message.embeds[0]["footer"]["text"] == f"job {job.id}"
    assert message.file_bytes(0) == result.file_bytes(0)
    custom_ids = [c["custom_id"] for c in message.interactive()]
    assert custom_ids and all(c.startswith("dc:") for c in custom_ids), custom_ids
    assert {c for c in custom_ids if str(job.id) in c} == set(custom_ids)
    same_guild = await slash(double, bob, guild, "show", job=job.id)
    assert await answer(same_guild, ephemeral=False) == ""
    elsewhere = double.add_guild("Elsewhere")
    double.add_member(elsewhere, bob)
    double.add_member(elsewhere, alice)
    refused = await slash(double, bob, elsewhere, "show", job=job.id)
    assert await sentence(refused) == f"There is no job {job.id} that you can see here."
    own = await slash(double, alice, elsewhere, "show", job=job.id)
    assert await answer(own, ephemeral=False) == ""
    missing = await slash(double, alice, guild, "show", job=job.id + 41)
    assert await sentence(missing) == f"There is no job {job.id + 41} that you can see here."

    # /pnginfo of the bot's own PNG reads back the parameters it wrote
    with Image.open(io.BytesIO(result.file_bytes(0))) as png:
        parameters = png.info["parameters"]
    assert parameters.startswith("a blue square\n") and "Steps: 4" in parameters and "Seed: 7" in parameters
    info = await double.slash(alice, guild, None, "pnginfo", attachments={"image": result.attachments[0]})
    text = await answer(info)
    assert text.startswith("Made with ") and text.endswith(f"\n```\n{parameters}\n```"), text
    double.assert_clean()


async def test_pnginfo_of_plain_and_broken_files(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User, fixtures_dir: Path
) -> None:
    cases = [
        (double.add_attachment("plain.png", _png()), "This image carries no generation parameters."),
        (
            double.add_attachment("other.png", _png({"Comment": "just a picture"})),
            "This image carries no generation parameters.",
        ),
        (
            double.add_attachment("notes.txt", b"hello", "text/plain"),
            "The image must be an image (PNG, JPEG or WebP), not text/plain.",
        ),
    ]
    for attachment, expected in cases:
        record = await double.slash(alice, guild, None, "pnginfo", attachments={"image": attachment})
        assert await sentence(record) == expected
    empty = (fixtures_dir / "pnginfo" / "bad_images__empty_file.png").read_bytes()
    assert empty == b""
    attachment = double.add_attachment("empty.png", empty)
    record = await double.slash(alice, guild, None, "pnginfo", attachments={"image": attachment})
    assert await sentence(record) == "That file is not an image I can read; attach a PNG, JPEG or WebP."
    a1111 = fixtures_dir / "pnginfo" / "parsers__AUTOMATIC1111__automatic1111_cropped.png"
    with Image.open(a1111) as png:
        parameters = png.info["parameters"]
    attachment = double.add_attachment("a.png", a1111.read_bytes())
    record = await double.slash(alice, guild, None, "pnginfo", attachments={"image": attachment})
    text = await answer(record)
    assert text.startswith("Made with ") and parameters[:200] in text
    double.assert_clean()


async def test_prompt_explain(double: DiscordDouble, bot: Any, guild: Guild, alice: User) -> None:
    record = await slash(
        double, alice, guild, "prompt", "explain", text="a (red:1.3) circle [cat:dog:0.5] <lora:x:0.7>"
    )
    # the webui: prompt editing first ([cat:dog:0.5] of 20 steps switches after step 10), then attention;
    # the LoRA tag is taken out of the text; "a red circle cat" is 4 CLIP tokens, one chunk
    assert await answer(record) == (
        "**Until step 10**: a (red:1.3) circle cat\n"
        "**Until step 20**: a (red:1.3) circle dog\n"
        "lora `x` at 0.7\n"
        "4 tokens in 1 chunk(s) of 75"
    )
    record = await slash(double, alice, guild, "prompt", "explain", text="((a)) [b] BREAK c", steps=4)
    assert await answer(record) == "**Weights**: (a:1.21) (b:0.909) BREAK c\n3 tokens in 2 chunk(s) of 75"
    # the webui only reads a number after the colon as a weight: "(a:x)" is the text "a:x" at 1.1
    record = await slash(double, alice, guild, "prompt", "explain", text="(a:x)")
    assert await answer(record) == "**Weights**: (a:x:1.1)\n3 tokens in 1 chunk(s) of 75"
    double.assert_clean()


async def test_pnginfo_offers_remix_with_the_images_settings(
    double: DiscordDouble, bot: Any, guild: Guild, alice: User
) -> None:
    parameters = (
        "a blue square\nNegative prompt: blurry\n"
        "Steps: 5, Sampler: Euler a, CFG scale: 6, Seed: 99, Size: 64x64"
    )
    attachment = double.add_attachment("theirs.png", _png({"parameters": parameters}))
    record = await double.slash(alice, guild, None, "pnginfo", attachments={"image": attachment})
    reply = await record.final_message()
    click = await double.click(alice, reply, reply.custom_id("Remix with these"))
    modal = await click.response()
    assert modal.callback_type == 9
    fields = {
        c["label"]: c.get("value", "")
        for row in modal.payload["data"]["components"]
        for c in row["components"]
    }
    assert (
        fields["Prompt"] == "a blue square"
        and fields["Negative prompt"] == "blurry"
        and fields["Steps"] == "5"
    )
    values = {
        c["custom_id"]: c.get("value", "")
        for row in modal.payload["data"]["components"]
        for c in row["components"]
    }
    remix = await double.submit_modal(alice, modal.payload["data"]["custom_id"], values)
    result = await wait_job_message(double, remix)
    with Image.open(io.BytesIO(result.file_bytes(0))) as png:
        text = png.info["parameters"]
    assert "a blue square" in text and "Sampler: Euler a" in text and "CFG scale: 6" in text
    double.assert_clean()
