"""The built-in shapes model follows prompts, as measured by the scorer — and a random model does not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.shapes.evaluate import evaluate
from models.shapes.scorer import score_image
from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.samplers import make_scheduler
from pipelines.settings import Settings

N_PROMPTS = 30


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), builtin_models_dir=tiny_models)


@pytest.fixture
async def engine(settings: Settings) -> Engine:
    async with Engine(settings) as eng:
        yield eng


def _accuracy(engine: Engine, model_name: str) -> dict[str, float]:
    model = engine.cache.get(model_name)
    pipe = model.pipeline(model.base_class_name)
    pipe.scheduler = make_scheduler("DPM++ 2M", model.default_scheduler_config)
    result: dict[str, float] = evaluate(pipe, N_PROMPTS, guidance=3.0, steps=20, seed=0, batch=N_PROMPTS)[
        "accuracy"
    ]
    return result


async def test_shapes_model_follows_colour_shape_and_position(engine: Engine) -> None:
    accuracy = _accuracy(engine, "shapes")
    assert accuracy["colour"] >= 0.9, accuracy
    assert accuracy["shape"] >= 0.8, accuracy
    assert accuracy["position"] >= 0.8, accuracy
    assert accuracy["background"] >= 0.9, accuracy


async def test_the_same_measure_fails_a_random_model(engine: Engine) -> None:
    accuracy = _accuracy(engine, "tiny-sd15")  # random weights: noise, whatever the prompt
    assert accuracy["colour"] < 0.5 and accuracy["shape"] < 0.5 and accuracy["position"] < 0.5, accuracy


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a large red circle at the top left on a blue background", ("red", "circle", "top left", "blue")),
        (
            "a green square at the bottom right on a white background",
            ("green", "square", "bottom right", "white"),
        ),
        ("black background, large yellow star in the centre", ("yellow", "star", "centre", "black")),
    ],
)
async def test_through_the_engine_the_stored_png_shows_the_prompt(
    engine: Engine, prompt: str, expected: tuple[str, str, str, str]
) -> None:
    result = await engine.generate(JobSpec(prompt=prompt, seed=5, cfg=3.0, sampler="DPM++ 2M"))
    assert result.spec.model == "shapes" and (result.spec.width, result.spec.height) == (64, 64)
    with Image.open(io.BytesIO(result.images[0].path.read_bytes())) as png:
        reading = score_image(np.asarray(png.convert("RGB")))
    assert reading.shapes, f"no shape found for {prompt!r}"
    shape = reading.shapes[0]
    assert (shape.colour, shape.shape, shape.position, reading.background) == expected
