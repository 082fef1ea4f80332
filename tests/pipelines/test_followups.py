"""Jobs made from a finished one belong to the presser, with a fresh seed and adapters to resolve again."""

from __future__ import annotations

import pytest

from pipelines import followups
from pipelines.jobs import AdapterRef, JobKind, JobSpec
from storage.errors import InvalidRequestError

WHO: followups.Who = {"user_id": 7, "guild_id": 8, "channel_id": 9}
DONE = JobSpec(
    prompt="a cat <lora:mine:0.8>",
    negative_prompt="blurry",
    model="shapes",
    width=64,
    height=64,
    seed=123,
    batch=4,
    hires_scale=2.0,
    adapters=(AdapterRef("lora", "mine", "a" * 64, "abc"),),
    user_id=1,
    guild_id=8,
)


def test_reroll_keeps_the_request_but_not_the_owner_seed_or_adapters() -> None:
    spec = followups.reroll_spec(DONE, **WHO)
    assert (spec.prompt, spec.batch, spec.hires_scale) == (DONE.prompt, 4, 2.0)
    assert (spec.user_id, spec.seed, spec.adapters) == (7, -1, ())


def test_variations_and_upscale_work_on_one_image() -> None:
    subtle = followups.variation_spec(DONE, "subtle", **WHO)
    strong = followups.variation_spec(DONE, "strong", **WHO)
    assert subtle.kind == strong.kind == JobKind.img2img and subtle.strength < strong.strength
    assert (subtle.batch, subtle.hires_scale, subtle.width, subtle.init_image) == (1, 0.0, 0, None)
    up = followups.upscale_spec(DONE, scale=2.0, **WHO)
    assert up.kind == JobKind.upscale and up.scale == 2.0 and up.user_id == 7
    with pytest.raises(InvalidRequestError):
        followups.variation_spec(DONE, "wild", **WHO)


def test_remix_reads_the_form() -> None:
    spec = followups.remix_spec(
        DONE, {"prompt": "a dog", "negative": "", "steps": "12", "cfg": "4.5", "seed": "77"}, **WHO
    )
    assert (spec.prompt, spec.negative_prompt, spec.steps, spec.cfg, spec.seed) == ("a dog", "", 12, 4.5, 77)
    assert followups.remix_spec(DONE, {"seed": ""}, **WHO).seed == -1
    with pytest.raises(InvalidRequestError, match="Steps must be a number"):
        followups.remix_spec(DONE, {"steps": "many"}, **WHO)
