"""txt2img through the engine on the tiny models: storage, determinism, batches, samplers, bad input."""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.samplers import SAMPLERS
from pipelines.text_to_image import generate_arrays
from storage.errors import BotError, GenerationError, InvalidRequestError, NotFoundError
from storage.tables import Image as ImageRow
from storage.tables import Job

SMALL = {"width": 64, "height": 64, "steps": 4}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


async def _count(engine: Engine, model: type) -> int:
    async with engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
async def test_txt2img_is_stored_with_webui_parameters(engine: Engine, model: str, no_network: None) -> None:
    result = await engine.generate(JobSpec(prompt="a red circle", model=model, seed=1234, **SMALL))
    assert len(result.images) == 1
    image = result.images[0]
    with Image.open(io.BytesIO(image.path.read_bytes())) as png:
        png.load()
    assert png.size == (64, 64) and png.mode == "RGB"
    params = png.info["parameters"]
    assert params.startswith("a red circle\n")
    assert "Seed: 1234" in params and "Size: 64x64" in params and f"Model: {model}" in params
    assert image.path.name == image.sha256
    async with engine.db.sessions() as session:
        job = await session.get(Job, result.job_id)
        assert job is not None and job.status == "done" and job.attempts == 1
        assert (
            job.spec["prompt"] == "a red circle" and job.spec["seed"] == 1234 and job.spec["model"] == model
        )
        rows = (await session.scalars(select(ImageRow).where(ImageRow.job_id == result.job_id))).all()
        assert [(r.seed, r.sha256, r.width) for r in rows] == [(1234, image.sha256, 64)]


async def test_default_model_size_and_random_seed_are_recorded(engine: Engine) -> None:
    spec = engine.prepare(JobSpec(prompt="x"))
    assert spec.model == "shapes" and (spec.width, spec.height) == (64, 64)  # trained at 64×64
    assert 0 <= spec.seed < 2**32
    sd = engine.prepare(JobSpec(prompt="x", model="tiny-sd15"))
    assert (sd.width, sd.height) == (512, 512)
    xl = engine.prepare(JobSpec(prompt="x", model="TINY-SDXL"))
    assert xl.model == "tiny-sdxl" and xl.width == 1024


async def test_same_seed_same_image_other_seed_other_image(engine: Engine) -> None:
    spec = engine.prepare(JobSpec(prompt="a blue star", seed=7, **SMALL))
    model = engine.cache.get(spec.model)
    first = generate_arrays(model, spec)
    again = generate_arrays(model, spec)
    other = generate_arrays(model, engine.prepare(JobSpec(prompt="a blue star", seed=8, **SMALL)))
    np.testing.assert_allclose(first, again, atol=1e-5, rtol=0)
    assert np.abs(first - other).max() > 1e-2


@pytest.mark.parametrize("model_name", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DPM++ 2M Karras"])
async def test_batch_equals_single_runs(engine: Engine, model_name: str, sampler: str) -> None:
    base = JobSpec(prompt="a green square", model=model_name, sampler=sampler, seed=100, **SMALL)
    model = engine.cache.get(model_name)
    batch = generate_arrays(model, engine.prepare(JobSpec(**{**base.to_dict(), "batch": 3})))
    singles = [
        generate_arrays(model, engine.prepare(JobSpec(**{**base.to_dict(), "seed": s})))
        for s in (100, 101, 102)
    ]
    assert batch.shape == (3, 64, 64, 3)
    for i, single in enumerate(singles):
        np.testing.assert_allclose(batch[i], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
async def test_every_sampler_generates(engine: Engine, sampler: str) -> None:
    spec = engine.prepare(JobSpec(prompt="a yellow ring", sampler=sampler, seed=3, **SMALL))
    arrays = generate_arrays(engine.cache.get(spec.model), spec)
    assert arrays.shape == (1, 64, 64, 3)
    assert np.isfinite(arrays).all() and arrays.std() > 0


async def test_progress_hook_sees_every_step(engine: Engine) -> None:
    seen: list[tuple[int, int]] = []
    await engine.generate(JobSpec(prompt="x", seed=1, **SMALL), on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"width": 65}, InvalidRequestError),
        ({"steps": 0}, InvalidRequestError),
        ({"steps": 10_000}, InvalidRequestError),
        ({"sampler": "nope"}, InvalidRequestError),
        ({"batch": 9}, InvalidRequestError),
        ({"prompt": ""}, InvalidRequestError),
        ({"model": "no-such-model"}, NotFoundError),
    ],
)
async def test_bad_input_stores_nothing(engine: Engine, change: dict[str, object], error: type) -> None:
    spec = JobSpec(**{**JobSpec(prompt="x", **SMALL).to_dict(), **change})
    with pytest.raises(error):
        await engine.generate(spec)
    assert await _count(engine, Job) == 0
    assert await _count(engine, ImageRow) == 0
    assert not list(engine.files.iter_hashes())


async def test_runner_failure_marks_the_job_failed(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("pipelines.text_to_image.run_text_to_image", explode)
    # the waiter gets the generic sentence; the traceback only goes to the log
    with pytest.raises(GenerationError, match="broke on our side"):
        await engine.generate(JobSpec(prompt="x", seed=1, **SMALL))
    async with engine.db.sessions() as session:
        job = (await session.scalars(select(Job))).one()
    assert job.status == "failed" and job.error and "boom" not in job.error
    assert await _count(engine, ImageRow) == 0


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            {"kind": "img2img", "strength": 0.04, "steps": 20},
            "Denoising strength 0.04 with 20 steps runs no step",
        ),
        (
            {"kind": "img2img", "upscaler": None, "hires_scale": 2.0},
            "Hires fix applies to text-to-image only",
        ),
        ({"kind": "upscale", "upscaler": "no-such-upscaler"}, "no upscaler called 'no-such-upscaler'"),
        (
            {"hires_scale": 2.0, "hires_upscaler": "Latent (sharp)"},
            r"no latent upscaler called 'Latent \(sharp\)'",
        ),
    ],
)
async def test_mode_options_are_checked_before_anything_is_stored(
    engine: Engine, change: dict[str, object], fragment: str
) -> None:
    from pipelines.inputs import JobInputs

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    spec = JobSpec.from_dict({**JobSpec(prompt="x", **SMALL).to_dict(), **change})
    inputs = JobInputs(init=buffer.getvalue()) if spec.kind != "txt2img" else None
    with pytest.raises((InvalidRequestError, NotFoundError), match=fragment):
        await engine.generate(spec, inputs=inputs)
    assert await _count(engine, Job) == 0
    assert not list(engine.files.iter_hashes())


def test_upscaler_names_are_made_canonical(engine: Engine) -> None:
    from pipelines.inputs import JobInputs

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    inputs = JobInputs(init=buffer.getvalue())
    assert (
        engine.prepare(JobSpec(prompt="", kind="upscale", upscaler="lanczos"), inputs).upscaler == "Lanczos"
    )
    assert (
        engine.prepare(JobSpec(prompt="", kind="upscale", upscaler="TINY-X4"), inputs).upscaler == "tiny-x4"
    )
    assert engine.prepare(JobSpec(prompt="", kind="upscale"), inputs).upscaler == "tiny-x4"  # the default
    hires = engine.prepare(JobSpec(prompt="x", hires_scale=1.5, hires_upscaler="latent (NEAREST)", **SMALL))
    assert hires.hires_upscaler == "Latent (nearest)"


async def test_the_webui_prompt_language_reaches_txt2img(engine: Engine) -> None:
    model = engine.cache.get("tiny-sd15")

    def run(prompt: str) -> np.ndarray:
        return generate_arrays(
            model, engine.prepare(JobSpec(prompt=prompt, model="tiny-sd15", seed=3, **SMALL))
        )

    base, blue = run("a red circle"), run("a blue circle")
    assert np.abs(run("a (red:1.6) circle") - base).max() > 1e-3
    edited = run("a [red:blue:1] circle")  # red for steps 0-1, then blue
    # random tiny weights respond weakly to words; identical runs agree to ~1e-7
    assert np.abs(edited - base).max() > 1e-5 and np.abs(edited - blue).max() > 1e-5
    assert np.abs(run("a [red:blue:1] circle") - edited).max() < 1e-6
    assert run(", ".join(["a red circle"] * 40)).shape == (1, 64, 64, 3)  # 120+ tokens: two chunks


async def test_clip_skip_2_works_on_sd15(engine: Engine) -> None:
    model = engine.cache.get("tiny-sd15")
    one = generate_arrays(
        model, engine.prepare(JobSpec(prompt="a red circle", model="tiny-sd15", seed=3, **SMALL))
    )
    two = generate_arrays(
        model, engine.prepare(JobSpec(prompt="a red circle", model="tiny-sd15", seed=3, clip_skip=2, **SMALL))
    )
    assert np.abs(one - two).max() > 1e-3


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("a cat <lora:pixelart:0.8>", "There is no LoRA called pixelart that you can use here"),
        ("a (cat:1.2.3)", "'1.2.3' is not a number"),
        ("a cat <lora:x:abc>", "The weight 'abc' in '<lora:x:abc>' is not a number"),
    ],
)
async def test_prompt_language_errors_are_refused_up_front(
    engine: Engine, prompt: str, fragment: str
) -> None:
    with pytest.raises(BotError, match=fragment):
        await engine.generate(JobSpec(prompt=prompt, seed=1, **SMALL))
    assert await _count(engine, Job) == 0
