"""Hostile and odd prompts: refused with one sentence and nothing stored, or accepted and run.

Every case goes through :meth:`Engine.submit` (the path of every front end); a handful also through
the real bot on the Discord double, one of them past the 4,000-character limit Discord's client enforces.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.settings import Settings
from storage.errors import BotError, InvalidRequestError, NotFoundError
from storage.tables import Job
from tests.cogs.conftest import wait_job_message
from tests.cogs.replies import count_rows, sentence, stored_files
from tests.discord_double import DiscordDouble, Guild, User
from tests.discord_double import dispatch as client_checks

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2, "seed": 1}
TOO_HEAVY = "keep weights between -100 and 100, like (word:1.3)."


@dataclass(frozen=True)
class Case:
    """A prompt (or negative prompt) and what must come of it: ``sentence`` None means it runs."""

    id: str
    kind: str
    prompt: str
    sentence: str | None = None
    negative: str = ""
    error: type[Exception] = InvalidRequestError


REFUSED = [
    Case("prompt-50k", "50,000 characters", "a " * 25_000,
         "The prompt is 50,000 characters long; keep it under 4,000."),
    Case("negative-50k", "a 50,000-character negative prompt", "a cat", negative="bad " * 12_500,
         sentence="The negative prompt is 50,000 characters long; keep it under 4,000."),
    Case("only-breaks", "nothing but 600 BREAKs (601 text-encoder windows)", "BREAK " * 600,
         "The prompt has 600 BREAKs; use at most 32."),
    Case("nested-1000-round", "1,000 nested round brackets: weight 1.1**1000",
         "(" * 1000 + "cat" + ")" * 1000,
         f"An attention weight in the prompt comes to 2.47e+41; {TOO_HEAVY}"),
    Case("nested-1000-unclosed", "1,000 '(' never closed: they weigh the rest", "(" * 1000 + "a red circle",
         f"An attention weight in the prompt comes to 2.47e+41; {TOO_HEAVY}"),
    Case("weight-1000", "(cat:1000)", "a (cat:1000)",
         f"An attention weight in the prompt comes to 1000; {TOO_HEAVY}"),
    Case("weight-400-digits", "a 400-digit weight (not finite)", "(cat:" + "9" * 400 + ")",
         "An attention weight in the prompt is too large; use one like (word:1.3)."),
    Case("weight-not-a-number", "(cat:1.2.3)", "a (cat:1.2.3)",
         "The attention weight '1.2.3' is not a number; write it like (word:1.3)."),
    Case("negative-weight-heavy", "a negative prompt of ((((…)))) 60 deep", "a cat",
         negative="(" * 60 + "ugly" + ")" * 60,
         sentence=f"An attention weight in the negative prompt comes to 304.5; {TOO_HEAVY}"),
    Case("lora-weight-inf", "<lora:cat:inf>", "a cat <lora:cat:inf>",
         "The weight 'inf' in '<lora:cat:inf>' is not a number; write one like 0.8."),
    Case("lora-weight-1e308", "<lora:cat:1e308>", "a cat <lora:cat:1e308>",
         "The weight of <lora:cat> must be between -5 and 5."),
    Case("long-tag-echo", "a bad weight in a 3,000-character tag (the answer quotes 40 of them)",
         "a <lora:" + "x" * 3000 + ":abc>",
         "The weight 'abc' in '<lora:" + "x" * 33 + "…' is not a number; write one like 0.8."),
    Case("rtl-in-weight", "an RTL override hidden in a weight (the answer shows it, not obeys it)",
         "a <lora:cat:\u202e0.8>",
         "The weight '\ufffd0.8' in '<lora:cat:\ufffd0.8>' is not a number; write one like 0.8."),
    Case("lora-no-name", "<lora::0.8>", "a cat <lora::0.8>",
         "The extra network tag '<lora::0.8>' has no name; write it as <lora:name:0.8>."),
    Case("lora-unknown", "a LoRA nobody uploaded", "a cat <lora:nothing:0.8>",
         "There is no LoRA called nothing that you can use here; "
         "check the name with /lora list or upload it.",
         error=NotFoundError),
    Case("network-unknown-type", "<lyra:cat:1>", "a cat <lyra:cat:1>",
         "Unknown extra network type 'lyra'; use <lora:name:weight> or <hypernet:name:weight>."),
    Case("nul-character", "a NUL byte", "a\x00cat",
         "The prompt contains a NUL character; remove it and try again."),
    Case("blank", "only spaces", "   ", "The prompt is empty; describe what you want to see."),
    Case("edit-step-infinite", "[cat:dog:1e999]", "[cat:dog:1e999]",
         "The prompt-editing step '1e999' is too large; use a step or fraction."),
]  # fmt: skip

ACCEPTED = [
    Case("prompt-4000", "exactly 4,000 characters (54 windows of 75 tokens)", ("a, " * 1334)[:4000]),
    Case("a-few-breaks", "only BREAKs, three of them", "BREAK BREAK BREAK"),
    Case("nested-1000-square", "1,000 nested square brackets: weight 1.1**-1000",
         "[" * 1000 + "cat" + "]" * 1000),
    Case("nested-48-round", "48 nested round brackets: weight 97, just inside the bound",
         "(" * 48 + "cat" + ")" * 48),
    Case("unbalanced-brackets", "((a cat] with [a hat)) :) ]]", "((a cat] with [a hat)) :) ]]"),
    Case("lora-no-end", "'<lora:' with no end: plain text, as in the webui", "a red circle <lora:purple:0.5"),
    Case("weight-1e308", "(cat:1e308): not a weight in the webui's grammar, so text at 1.1", "a (cat:1e308)"),
    Case("weight-minus-5", "(cat:-5): negative weights are the webui's", "a red (circle:-5)"),
    Case("zero-width", "zero-width space, joiner, word joiner, BOM", "a\u200bred\u200d circle\u2060\ufeff"),
    Case("right-to-left", "RTL override, Hebrew and Arabic",
         "\u202ea red circle\u202c \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627"),
    Case("alternation", "[red|blue|green] every step", "a [red|blue|green] circle"),
]  # fmt: skip



@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_engine(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> AsyncIterator[Engine]:
    """One engine for the engine-level cases: each refusal must leave it serving the next case."""
    data_dir = tmp_path_factory.mktemp("bad-prompts") / "data"
    async with Engine(Settings(data_dir=data_dir, builtin_models_dir=tiny_models), recover=True) as engine:
        yield engine


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", REFUSED, ids=[case.id for case in REFUSED])
async def test_a_bad_prompt_is_refused_before_anything_is_stored(shared_engine: Engine, case: Case) -> None:
    data_dir = shared_engine.settings.data_dir
    files, jobs = stored_files(data_dir), await count_rows(shared_engine, Job)
    spec = JobSpec(prompt=case.prompt, negative_prompt=case.negative, user_id=1, **SMALL)
    with pytest.raises(case.error) as caught:
        await shared_engine.submit(spec)
    assert str(caught.value) == case.sentence
    assert await count_rows(shared_engine, Job) == jobs and stored_files(data_dir) == files


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", ACCEPTED, ids=[case.id for case in ACCEPTED])
async def test_an_odd_prompt_runs(shared_engine: Engine, case: Case) -> None:
    spec = JobSpec(prompt=case.prompt, negative_prompt=case.negative, user_id=1, **SMALL)
    result = await shared_engine.generate(spec)
    assert len(result.images) == 1 and result.spec.prompt == case.prompt
    assert result.spec.adapters == ()  # nothing in these prompts names a stored LoRA
    with Image.open(result.images[0].path) as image:
        pixels = np.asarray(image)
    assert pixels.std() > 0, "a flat image: the conditioning was not finite"  # NaN latents decode flat


# --- through the bot -------------------------------------------------------------------------------


@pytest.fixture
def modified_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discord's client enforces the declared lengths and ranges; a modified one sends anything."""
    monkeypatch.setattr(client_checks, "_check_value", lambda definition, value: None)


def _case(cases: list[Case], case_id: str) -> Case:
    return next(case for case in cases if case.id == case_id)


async def test_the_bot_refuses_bad_prompts_past_discords_checks_and_still_serves(
    double: DiscordDouble,
    bot: Any,
    engine: Engine,
    settings: Settings,
    guild: Guild,
    alice: User,
    modified_client: None,
) -> None:
    before = stored_files(settings.data_dir)
    for case_id in ("prompt-50k", "only-breaks", "nested-1000-round", "long-tag-echo", "nul-character"):
        case = _case(REFUSED, case_id)
        record = await double.slash(alice, guild, None, "imagine", options={"prompt": case.prompt, **SMALL})
        assert await sentence(record) == case.sentence, case_id
    assert await count_rows(engine, Job) == 0 and stored_files(settings.data_dir) == before
    # /imagine's lora and lora_weight options become a tag: a forged weight is refused the same way
    options = {"prompt": "a cat", "lora": "cat", "lora_weight": 1e308, **SMALL}
    record = await double.slash(alice, guild, None, "imagine", options=options)
    assert await sentence(record) == "The weight of <lora:cat> must be between -5 and 5."
    for case_id in ("lora-no-end", "right-to-left", "zero-width"):
        case = _case(ACCEPTED, case_id)
        record = await double.slash(alice, guild, None, "imagine", options={"prompt": case.prompt, **SMALL})
        message = await wait_job_message(double, record)
        assert message.attachments, (case_id, message.content)
    assert await count_rows(engine, Job) == 3
    double.assert_clean()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("prompt", "options"),
    [
        ("a <lora:x\ny:0.8>", {}),
        ("a <lora:" + "x" * 3000 + ":0.8>", {}),
        ("a cat", {"sampler": "s" * 3000}),
        ("a cat", {"model": "m" * 3000}),
    ],
    ids=["lora-name-newline", "lora-name-3000", "sampler-3000", "model-3000"],
)
async def test_a_name_from_the_user_is_quoted_short_and_on_one_line(
    shared_engine: Engine, prompt: str, options: dict[str, Any]
) -> None:
    with pytest.raises(BotError) as caught:
        await shared_engine.submit(JobSpec(prompt=prompt, user_id=1, **{**SMALL, **options}))
    text = str(caught.value)
    assert "\n" not in text and len(text) <= 300, (len(text), text[:80])
