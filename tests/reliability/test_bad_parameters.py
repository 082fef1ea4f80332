"""Every numeric option of the slash commands out of range, as a modified client would send it.

Discord's client enforces the ranges a command declares (the double does too: the first test); discord.py
checks nothing when a value arrives anyway, so the bot must: one private sentence, no job stored, no file
kept. Choice options sent with an unknown value are here too, and the Remix form's free-text numbers. One
bot serves the whole module, so every case also shows that it keeps serving after the ones before.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image
from sqlalchemy import select

from pipelines.engine import Engine
from pipelines.samplers import SAMPLERS
from pipelines.settings import Settings
from storage.tables import Guild as GuildRow
from storage.tables import Job, User
from tests.cogs.conftest import serving, settled_message, wait_job_message
from tests.cogs.replies import count_rows, shown, stored_files
from tests.discord_double import DiscordDouble, Guild, InteractionRecord
from tests.discord_double import dispatch as client_checks

pytestmark = pytest.mark.asyncio(loop_scope="module")

BIG = 2**53 - 1  # the largest integer Discord carries in an INTEGER option
STRENGTH = "Denoising strength must be a number between 0.01 and 1."
SEED = "Seed must be between -1 (random) and 4294967295, not {}."


def _png(mode: str = "RGB", colour: int | str = "white") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


PHOTO = {"image": ("photo.png", _png())}
MASK = {"mask": ("mask.png", _png("L", 255))}


@dataclass(frozen=True)
class Case:
    """One out-of-range value: the command, its options, and the sentence the user must get."""

    id: str
    command: str
    options: dict[str, Any]
    sentence: str
    sub: str | None = None
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    admin: bool = False


def imagine(case_id: str, options: dict[str, Any], expected: str) -> Case:
    return Case(case_id, "imagine", {"prompt": "a red circle", **options}, expected)


def with_photo(case_id: str, command: str, options: dict[str, Any], expected: str) -> Case:
    files = {**PHOTO, **(MASK if command == "inpaint" else {})}
    if command == "controlnet":
        files = {"control": PHOTO["image"]}
    prompt = {} if command == "upscale" else {"prompt": "a red circle"}
    return Case(case_id, command, {**prompt, **options}, expected, files=files)


SIDE = "{} must be between 64 and 2048, not {}."
STEPS = "Steps must be between 1 and 150, not {}."
CFG = "CFG scale must be a number between 0 and 30."
COUNT = "Batch size must be between 1 and 4, not {}."
HIRES = "Hires upscale must be a number between 1 and 4."
CONTROL_WEIGHT = "ControlNet unit 1: the weight must be a number between 0 and 2."
SCALE = "Upscale factor must be a number between 1 and 4."
EXPLAIN_STEPS = "The number of steps must be between 1 and 1,000."
SIZES = "square, portrait 2:3, landscape 3:2, portrait 9:16, landscape 16:9"

CASES = [
    imagine("imagine-width-4096", {"width": 4096, "height": 64}, SIDE.format("Width", 4096)),
    imagine("imagine-width-negative", {"width": -64, "height": 64}, SIDE.format("Width", -64)),
    imagine("imagine-height-huge", {"width": 64, "height": BIG}, SIDE.format("Height", BIG)),
    imagine("imagine-steps-0", {"steps": 0}, STEPS.format(0)),
    imagine("imagine-steps-10000", {"steps": 10_000}, STEPS.format(10000)),
    imagine("imagine-cfg-negative", {"cfg": -1.0}, CFG),
    imagine("imagine-cfg-1e308", {"cfg": 1e308}, CFG),
    imagine("imagine-seed-huge", {"seed": BIG}, SEED.format(BIG)),
    imagine("imagine-seed-negative", {"seed": -5}, SEED.format(-5)),
    imagine("imagine-count-0", {"count": 0}, COUNT.format(0)),
    imagine("imagine-count-100", {"count": 100}, COUNT.format(100)),
    imagine("imagine-hires-10", {"hires": 10.0}, HIRES),
    imagine("imagine-hires-negative", {"hires": -1.0}, HIRES),
    imagine("imagine-lora-weight-100", {"lora": "cat", "lora_weight": 100.0},
            "The weight of <lora:cat> must be between -5 and 5."),
    imagine("imagine-prompt-empty", {"prompt": ""}, "The prompt is empty; describe what you want to see."),
    imagine("imagine-size-unknown", {"size": "billboard"},
            f"There is no size called 'billboard'; use one of {SIZES}."),
    imagine("imagine-sampler-unknown", {"sampler": "Warp 9"},
            f"There is no sampler called 'Warp 9'; pick one of: {', '.join(SAMPLERS)}."),
    with_photo("img2img-strength-0", "img2img", {"strength": 0.0}, STRENGTH),
    with_photo("img2img-strength-5", "img2img", {"strength": 5.0}, STRENGTH),
    with_photo("img2img-steps-0", "img2img", {"steps": 0}, STEPS.format(0)),
    with_photo("img2img-seed-huge", "img2img", {"seed": BIG}, SEED.format(BIG)),
    with_photo("inpaint-strength-2", "inpaint", {"strength": 2.0}, STRENGTH),
    with_photo("inpaint-seed-negative", "inpaint", {"seed": -2}, SEED.format(-2)),
    with_photo("controlnet-weight-5", "controlnet", {"weight": 5.0}, CONTROL_WEIGHT),
    with_photo("controlnet-weight-negative", "controlnet", {"weight": -1.0}, CONTROL_WEIGHT),
    with_photo("controlnet-type-unknown", "controlnet", {"type": "xray"},
               "There is no control type called 'xray'; "
               "use one of scribble, canny, depth, pose, lineart, none."),
    with_photo("controlnet-seed-huge", "controlnet", {"seed": BIG}, SEED.format(BIG)),
    with_photo("upscale-scale-100", "upscale", {"scale": 100.0},
               "Upscaling 64×64 by 100 makes 6400×6400; keep the result under 16 megapixels."),
    with_photo("upscale-scale-half", "upscale", {"scale": 0.5}, SCALE),
    with_photo("upscale-scale-negative", "upscale", {"scale": -2.0}, SCALE),
    Case("explain-steps-0", "prompt", {"text": "a [cat|dog]", "steps": 0}, EXPLAIN_STEPS, sub="explain"),
    # before: one schedule entry per step, 2**53 of them, built on the event loop
    Case("explain-steps-huge", "prompt", {"text": "a [cat|dog]", "steps": BIG}, EXPLAIN_STEPS, sub="explain"),
    Case("cancel-job-negative", "cancel", {"job": -1}, "There is no job -1 that you can cancel."),
    Case("cancel-job-huge", "cancel", {"job": BIG}, f"There is no job {BIG} that you can cancel."),
    Case("show-job-huge", "show", {"job": BIG}, f"There is no job {BIG} that you can see here."),
    Case("history-page-huge", "history", {"page": BIG}, "You have no jobs yet; try `/imagine`."),
    # before: stored as they came, and then every /imagine of that user (or server) was refused
    Case("preferences-steps-0", "preferences", {"steps": 0},
         "The default steps must be between 1 and 150, not 0.", sub="set"),
    Case("preferences-cfg-1000", "preferences", {"cfg": 1000.0},
         "The default CFG scale must be a number between 0 and 30.", sub="set"),
    Case("preferences-size-unknown", "preferences", {"size": "billboard"},
         f"There is no size called 'billboard'; use one of {SIZES}.", sub="set"),
    Case("preferences-sampler-unknown", "preferences", {"sampler": "Warp 9"},
         f"There is no sampler called 'Warp 9'; pick one of: {', '.join(SAMPLERS)}.", sub="set"),
    Case("settings-max-steps-0", "settings", {"max_steps": 0},
         "The max_steps limit must be between 1 and 150, not 0.", sub="set", admin=True),
    Case("settings-max-size-huge", "settings", {"max_size": BIG},
         f"The max_size limit must be between 64 and 2048, not {BIG}.", sub="set", admin=True),
    Case("settings-max-count-0", "settings", {"max_count": 0},
         "The max_count limit must be between 1 and 4, not 0.", sub="set", admin=True),
]  # fmt: skip


@dataclass
class World:
    """One bot on the double for the whole module; ``sandbox`` takes the admin cases' settings."""

    double: DiscordDouble
    engine: Engine
    guild: Guild
    sandbox: Guild
    data_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("bad-parameters") / "data"
    settings = Settings(data_dir=data_dir, builtin_models_dir=tiny_models, preview_every=2)

    def places(double: DiscordDouble) -> tuple[Guild, Guild]:
        return double.add_guild("Dream Guild", nsfw_channel=True), double.add_guild("Sandbox")

    async with serving(settings, places) as (double, engine, _, (guild, sandbox)):
        yield World(double, engine, guild, sandbox, data_dir)


@pytest.fixture
def modified_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discord's client enforces declared ranges, lengths and choices; a modified one sends anything."""
    monkeypatch.setattr(client_checks, "_check_value", lambda definition, value: None)



async def saved_settings(engine: Engine) -> dict[tuple[str, int], dict[str, Any]]:
    """Every user's preferences and every server's rules that are not empty."""
    async with engine.db.sessions() as session:
        rows = [("user", row.id, row.settings) for row in await session.scalars(select(User))]
        rows += [("guild", row.id, row.settings) for row in await session.scalars(select(GuildRow))]
    return {(table, row_id): settings for table, row_id, settings in rows if settings}


async def one_sentence(record: InteractionRecord) -> str:
    """The one private message the interaction ends with: a single sentence, no path, no crash ref."""
    await settled_message(record, lambda m: not m.loading and bool(m.content), timeout=30)
    await record.settled(quiet=0.1, timeout=30)
    messages = shown(record)
    assert len(messages) == 1 and messages[0].ephemeral, [(m.content, m.ephemeral) for m in messages]
    assert not record.errors, [(a.kind, a.status, a.code) for a in record.errors]
    text = messages[0].content
    assert "\n" not in text and text.endswith(".") and "Something broke" not in text, text
    assert not re.search(r"/(tmp|home|work|root|usr|var)\b|\\", text), text
    return text


async def run_case(w: World, case: Case) -> InteractionRecord:
    """``case`` sent by a new member (preferences stay theirs), in the sandbox for admin cases."""
    guild = w.sandbox if case.admin else w.guild
    user = w.double.add_user(f"user-{case.id}", guild, permissions=["manage_guild"] if case.admin else ())
    attachments = {
        option: w.double.add_attachment(name, data, "image/png")
        for option, (name, data) in case.files.items()
    }
    return await w.double.slash(
        user, guild, None, case.command, subcommand=case.sub, options=case.options, attachments=attachments
    )


async def test_discords_client_keeps_to_the_declared_ranges(world: World) -> None:
    """The double refuses what Discord's client would; and every number option declares its range."""
    alice = world.double.add_user("alice", world.guild)
    with pytest.raises(ValueError, match="outside"):
        await world.double.slash(alice, world.guild, None, "imagine", options={"prompt": "x", "steps": 0})
    unbounded = []
    for command in world.double.commands():
        stack = [(command["name"], option) for option in command.get("options", [])]
        while stack:
            path, option = stack.pop()
            stack += [(f"{path} {option['name']}", o) for o in option.get("options", [])]
            if option["type"] in (4, 10) and None in (option.get("min_value"), option.get("max_value")):
                unbounded.append(f"{path} {option['name']}")
    assert sorted(unbounded) == ["cancel job", "show job"]  # job numbers: any is looked up, none trusted


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
async def test_an_out_of_range_value_gets_one_sentence_and_stores_nothing(
    world: World, modified_client: None, case: Case
) -> None:
    files, jobs = stored_files(world.data_dir), await count_rows(world.engine, Job)
    saved = await saved_settings(world.engine)
    assert await one_sentence(await run_case(world, case)) == case.sentence
    assert await count_rows(world.engine, Job) == jobs and stored_files(world.data_dir) == files
    assert await saved_settings(world.engine) == saved


async def test_after_them_all_at_once_a_job_runs_and_the_remix_forms_numbers_are_checked(
    world: World, modified_client: None
) -> None:
    saved = await saved_settings(world.engine)
    records = [await run_case(world, case) for case in CASES]  # all in flight together
    assert await asyncio.gather(*(one_sentence(r) for r in records)) == [case.sentence for case in CASES]
    assert await saved_settings(world.engine) == saved
    alice = world.double.add_user("remixer", world.guild)
    options = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}
    message = await wait_job_message(
        world.double, await world.double.slash(alice, world.guild, None, "imagine", options=options)
    )
    assert message.attachments, message.content
    jobs = await count_rows(world.engine, Job)
    remix_cases = [
        ({"steps": "ten"}, "Steps must be a number, not 'ten'."),
        ({"steps": "999"}, "Steps must be between 1 and 150, not 999."),
        ({"cfg": "nan"}, "CFG scale must be a number between 0 and 30."),
        ({"cfg": "-inf"}, "CFG scale must be a number between 0 and 30."),
        ({"seed": "99999999999"}, SEED.format(99999999999)),
    ]
    for changes, expected in remix_cases:
        click = await world.double.click(alice, message, message.custom_id("Remix"))
        form = (await click.response()).payload["data"]
        values = {}
        for row in form["components"]:
            for item in row["components"]:
                key = item["label"].split()[0].lower()
                values[item["custom_id"]] = changes.get(key, item.get("value") or "")
        submitted = await world.double.submit_modal(alice, form["custom_id"], values)
        assert await one_sentence(submitted) == expected, changes
    assert await count_rows(world.engine, Job) == jobs
