"""The request checks: every bad value gets one clear sentence naming it."""

from __future__ import annotations

import pytest

from pipelines.jobs import JobSpec, check_spec, resolve_seed
from pipelines.samplers import SAMPLERS
from storage.errors import InvalidRequestError

GOOD = JobSpec(prompt="a red circle", width=512, height=512)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"width": 65}, "multiple of 8"),
        ({"height": 100}, "multiple of 8"),
        ({"width": 32}, "between 64 and 2048"),
        ({"width": 4096}, "between 64 and 2048"),
        ({"steps": 0}, "Steps must be between 1 and 150"),
        ({"steps": 10_000}, "Steps must be between 1 and 150"),
        ({"batch": 9}, "Batch size must be between 1 and 4"),
        ({"batch": 0}, "Batch size"),
        ({"sampler": "Euler z"}, "no sampler called 'Euler z'"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   \n"}, "prompt is empty"),
        ({"prompt": "x" * 5000}, "5,000 characters"),
        ({"cfg": 31.0}, "CFG scale"),
        ({"cfg": float("nan")}, "CFG scale"),
        ({"seed": -2}, "Seed must be between -1"),
        ({"seed": 2**40}, "Seed must be between -1"),
        ({"clip_skip": 0}, "Clip skip"),
        ({"width": 2048, "height": 2048 + 8}, "between 64 and 2048"),
    ],
)
def test_bad_values_get_one_sentence(change: dict[str, object], fragment: str) -> None:
    spec = JobSpec(**{**GOOD.to_dict(), **change})
    with pytest.raises(InvalidRequestError) as info:
        check_spec(spec)
    message = str(info.value)
    assert fragment in message
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message


def test_width_hint_names_nearest_multiples() -> None:
    with pytest.raises(InvalidRequestError, match="try 64 or 72"):
        check_spec(JobSpec(prompt="x", width=65, height=64))


def test_good_spec_passes_and_sampler_is_made_canonical() -> None:
    checked = check_spec(JobSpec(prompt="x", width=64, height=64, sampler="euler A", cfg=7))
    assert checked.sampler == "Euler a"
    assert isinstance(checked.cfg, float)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_name_is_accepted(name: str) -> None:
    assert check_spec(JobSpec(prompt="x", width=64, height=64, sampler=name)).sampler == name


def test_seed_resolution_and_batch_seeds() -> None:
    assert resolve_seed(1234) == 1234
    drawn = {resolve_seed(-1) for _ in range(20)}
    assert all(0 <= s < 2**32 for s in drawn) and len(drawn) > 1
    assert JobSpec(prompt="x", seed=10, batch=3).seeds() == [10, 11, 12]
    assert JobSpec(prompt="x", seed=2**32 - 1, batch=2).seeds() == [2**32 - 1, 0]


def test_spec_round_trips_through_a_dict() -> None:
    spec = JobSpec(prompt="a", negative_prompt="b", width=64, height=72, seed=5, batch=2, extra={"k": 1})
    assert JobSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InvalidRequestError, match="Unknown job option"):
        JobSpec.from_dict({**spec.to_dict(), "bogus": 1})
