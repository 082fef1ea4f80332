"""The prompt language changes what the shapes model draws, read back by the scorer from stored PNGs."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.shapes.scorer import score_image
from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.settings import Settings

SEEDS = (0, 4, 8)  # three jobs of four images: seeds 0-11


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), builtin_models_dir=tiny_models)


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads stall on a shared two-core machine
    async with Engine(settings) as eng:
        yield eng
    torch.set_num_threads(threads)


async def _readings(engine: Engine, prompt: str) -> list[list[tuple[str, str]]]:
    """(colour, shape) of every shape the scorer finds, per image, over 12 seeds through the engine."""
    found = []
    for seed in SEEDS:
        result = await engine.generate(
            JobSpec(prompt=prompt, seed=seed, batch=4, cfg=3.0, sampler="DPM++ 2M")
        )
        for image in result.images:
            with Image.open(io.BytesIO(image.path.read_bytes())) as png:
                reading = score_image(np.asarray(png.convert("RGB")))
            found.append([(s.colour, s.shape) for s in reading.shapes])
    return found


def _count(
    readings: list[list[tuple[str, str]]], *, colour: str | None = None, shape: str | None = None
) -> int:
    """Images with at least one shape of that colour and/or kind."""
    return sum(
        any((colour is None or c == colour) and (shape is None or s == shape) for c, s in image)
        for image in readings
    )


async def test_prompt_editing_switches_the_shape_during_sampling(engine: Engine) -> None:
    plain = await _readings(engine, "a red circle")
    edited = await _readings(engine, "a red [circle:square:0.5]")  # circle for steps 1-10, then square
    last_step = await _readings(engine, "a red [circle:square:19]")  # square for the last step only
    assert _count(plain, shape="circle") >= 10, plain
    assert _count(edited, shape="square") >= 10 and _count(edited, shape="circle") <= 2, edited
    # Switched during sampling, not replaced up front: one square step leaves the circle drawn.
    assert _count(last_step, shape="circle") >= 10, last_step
    assert all(_count(r, colour="red") >= 10 for r in (plain, edited, last_step))


async def test_attention_weight_shifts_the_colour_balance(engine: Engine) -> None:
    """Emphasis changes the scored picture; on this small model it *suppresses* the weighted colour.

    The shapes model never saw scaled token features in training; a 2× "blue" mostly drops the blue square
    and draws red instead (real SD models read emphasis as "more"). What matters here is that the weights
    reach the UNet with the webui's arithmetic (``test_conditioning`` checks that number by number) and
    change the image; the direction is the model's.
    """
    plain = await _readings(engine, "red circle, blue square")
    weighted = await _readings(engine, "red circle, (blue:2) square")
    softened = await _readings(engine, "red circle, [blue] square")
    assert _count(plain, colour="blue") >= 10 and _count(plain, colour="red") >= 10, plain
    assert _count(weighted, colour="blue") <= 4, weighted
    assert _count(weighted, colour="red") >= 10, weighted
    assert _count(softened, colour="blue") >= 10, softened  # ÷1.1 is too small to matter here
    colours = Counter(c for image in weighted for c, _ in image)
    assert colours["red"] > 2 * colours["blue"], colours


async def test_a_lora_trained_here_turns_circles_purple_through_the_engine(engine: Engine) -> None:
    """The committed kohya file, uploaded like a user's, named in the prompt, read back by the scorer."""
    from pipelines.asset_uploads import add_asset_file

    lora = Path(__file__).resolve().parents[2] / "models/shapes/loras/purple-circles.safetensors"
    added = await add_asset_file(engine, lora, name="purple", owner_id=4242)
    assert added.checked.info.details["model"] == "shapes"
    spec = {"prompt": "a red circle on a white background <lora:purple:1>", "user_id": 4242}
    purple = []
    for seed in SEEDS:
        result = await engine.generate(JobSpec(**spec, seed=seed, batch=4, cfg=3.0, sampler="DPM++ 2M"))
        assert "purple: " in result.images[0].parameters  # Lora hashes
        for image in result.images:
            with Image.open(io.BytesIO(image.path.read_bytes())) as png:
                purple.append(
                    [(s.colour, s.shape) for s in score_image(np.asarray(png.convert("RGB"))).shapes]
                )
    plain = await _readings(engine, "a red circle on a white background")
    assert _count(plain, colour="purple", shape="circle") == 0, plain
    assert _count(purple, colour="purple", shape="circle") >= 8, purple
