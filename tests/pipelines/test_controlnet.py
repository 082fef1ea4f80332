"""ControlNet mode through the engine: tiny sd15/sdxl plumbing, MultiControlNet, weights, img2img, loading
rules, bad input — and the shapes model really following a scribble."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sqlalchemy import func, select

from models.shapes import scenes
from models.shapes.scorer import iou, region_mask_for_colour
from pipelines.engine import Engine, JobResult
from pipelines.inputs import JobInputs
from pipelines.jobs import ControlUnit, JobKind, JobSpec
from pipelines.settings import Settings
from storage.errors import IncompatibleAssetError, InvalidRequestError
from storage.tables import Image as ImageRow
from storage.tables import Job

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "seed": 11, "kind": JobKind.controlnet}
SD15: dict[str, Any] = {**SMALL, "model": "tiny-sd15"}
CN15 = "tiny-controlnet"


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads on a machine shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(tmp_path: Path, tiny_models: Path, **extra: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", builtin_models_dir=tiny_models, **extra)


@pytest.fixture
async def engine(tmp_path: Path, tiny_models: Path) -> AsyncIterator[Engine]:
    async with Engine(_settings(tmp_path, tiny_models)) as eng:
        yield eng


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _circle_drawing() -> Image.Image:
    """A black circle outline on white paper, drawn at twice the output size."""
    image = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(image).ellipse((24, 28, 100, 104), outline="black", width=6)
    return image


def _square_photo() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).rectangle((18, 18, 45, 45), fill=(230, 200, 40))
    return image


def _pixels(result: JobResult, index: int = 0) -> np.ndarray:
    with Image.open(io.BytesIO(result.images[index].path.read_bytes())) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


def _parameters(result: JobResult) -> str:
    with Image.open(io.BytesIO(result.images[0].path.read_bytes())) as png:
        return str(png.info["parameters"])


async def _generate(
    engine: Engine, units: list[ControlUnit], images: list[Image.Image], **spec: Any
) -> JobResult:
    job = JobSpec(prompt=spec.pop("prompt", "a red circle"), controls=tuple(units), **{**SD15, **spec})
    return await engine.generate(job, inputs=JobInputs(controls=tuple(_png(i) for i in images)))


async def _count(engine: Engine, table: type) -> int:
    async with engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


def _weights_sha(folder: Path) -> str:
    return hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


# --- end to end on the tiny models ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "controlnet", "folder"),
    [("tiny-sd15", CN15, "sd15-controlnet"), ("tiny-sdxl", "tiny-controlnet-xl", "sdxl-controlnet")],
)
async def test_controlnet_end_to_end(
    engine: Engine, tiny_models: Path, model: str, controlnet: str, folder: str
) -> None:
    result = await _generate(
        engine, [ControlUnit("scribble", model=controlnet)], [_circle_drawing()], model=model
    )
    assert result.spec.model == model and result.spec.controls[0].model == controlnet
    assert len(result.images) == 1 and _pixels(result).shape == (64, 64, 3)
    params = _parameters(result)
    short = _weights_sha(tiny_models / folder)[:8]
    assert f'ControlNet 0: "Module: scribble, Model: {controlnet} [{short}], Weight: 1' in params
    # the preview is the scribble map at the output size: the drawing's circle, white on black
    assert [p.label for p in result.previews] == ["control 1: scribble"]
    with Image.open(result.previews[0].path) as preview:
        mask = np.asarray(preview.convert("L"))
    assert preview.size == (64, 64) and set(np.unique(mask)) <= {0, 255}
    expected = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(expected).ellipse((12, 14, 50, 52), outline=255, width=3)  # the drawing at half size
    assert iou(mask == 255, np.asarray(expected) == 255) > 0.6
    async with engine.db.sessions() as session:
        job = await session.get(Job, result.job_id)
        assert job is not None and job.status == "done"
        assert job.spec["controls"][0]["image"] and engine.files.exists(job.spec["controls"][0]["image"])


async def test_weight_zero_ignores_the_control_and_weight_one_does_not(engine: Engine) -> None:
    drawing = [_circle_drawing()]
    plain = await engine.generate(JobSpec(prompt="a red circle", **{**SD15, "kind": JobKind.txt2img}))
    zero = await _generate(engine, [ControlUnit("scribble", weight=0.0, model=CN15)], drawing)
    one = await _generate(engine, [ControlUnit("scribble", weight=1.0, model=CN15)], drawing)
    # guidance that ends before the first step ends (4 steps: 0.2 < 1/4) adds nothing either
    late = await _generate(engine, [ControlUnit("scribble", end=0.2, model=CN15)], drawing)
    assert np.abs(_pixels(one) - _pixels(zero)).max() > 10
    assert np.abs(_pixels(zero) - _pixels(plain)).max() <= 1  # weight 0: exactly the txt2img image
    assert np.abs(_pixels(late) - _pixels(plain)).max() <= 1


async def test_two_controlnets_at_once(engine: Engine) -> None:
    units = [ControlUnit("scribble", model=CN15), ControlUnit("canny", model=CN15, low=50, high=150)]
    images = [_circle_drawing(), _square_photo()]
    both = await _generate(engine, units, images)
    first_only = await _generate(engine, units[:1], images[:1])
    muted = await _generate(engine, [units[0], ControlUnit("canny", weight=0.0, model=CN15)], images)
    assert [p.label for p in both.previews] == ["control 1: scribble", "control 2: canny"]
    params = _parameters(both)
    assert 'ControlNet 0: "Module: scribble' in params and 'ControlNet 1: "Module: canny' in params
    assert "Threshold A: 50, Threshold B: 150" in params
    assert np.abs(_pixels(both) - _pixels(first_only)).max() > 10  # the second unit steers too
    assert np.abs(_pixels(muted) - _pixels(first_only)).max() <= 1  # ... through its own weight
    with Image.open(both.previews[1].path) as edges:
        assert np.asarray(edges.convert("L"))[30, 30] == 0 and np.asarray(edges.convert("L")).max() == 255


async def test_batch_equals_single_runs(engine: Engine) -> None:
    units, drawing = [ControlUnit("scribble", model=CN15)], [_circle_drawing()]
    batch = await _generate(engine, units, drawing, batch=2, seed=40)
    singles = [await _generate(engine, units, drawing, seed=s) for s in (40, 41)]
    assert [i.seed for i in batch.images] == [40, 41]
    for index, single in enumerate(singles):
        assert np.abs(_pixels(batch, index) - _pixels(single)).max() <= 1


@pytest.mark.parametrize(("model", "controlnet"), [("tiny-sd15", CN15), ("tiny-sdxl", "tiny-controlnet-xl")])
async def test_with_an_init_image_it_is_controlnet_img2img(
    engine: Engine, model: str, controlnet: str
) -> None:
    seen: list[tuple[int, int]] = []
    units, drawing = [ControlUnit("scribble", model=controlnet)], [_circle_drawing()]
    spec = JobSpec(prompt="a red circle", controls=tuple(units), strength=0.5, **{**SD15, "model": model})
    inputs = JobInputs(init=_png(_square_photo()), controls=(_png(drawing[0]),))
    result = await engine.generate(spec, on_step=lambda d, t: seen.append((d, t)), inputs=inputs)
    assert seen == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps
    assert "Denoising strength: 0.5" in _parameters(result)
    other_init = JobInputs(init=_png(Image.new("RGB", (64, 64), "white")), controls=inputs.controls)
    other = await engine.generate(spec, inputs=other_init)
    txt2img = await _generate(engine, units, drawing, model=model)
    assert np.abs(_pixels(result) - _pixels(other)).max() > 10  # the init image matters
    assert np.abs(_pixels(result) - _pixels(txt2img)).max() > 10


# --- loading rules and bad input --------------------------------------------------------------------


async def test_single_file_controlnet_loads_with_its_config_folder(tmp_path: Path, tiny_models: Path) -> None:
    folder = tiny_models / "sd15-controlnet"
    shared = tmp_path / "controlnets"
    shared.mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", shared / "my-scribble.safetensors")
    (shared / "my-scribble.config").mkdir()
    shutil.copy(folder / "config.json", shared / "my-scribble.config" / "config.json")
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", shared / "bare.safetensors")
    controlnets = {
        "my-scribble": str(shared / "my-scribble.safetensors"),
        "bare": str(shared / "bare.safetensors"),
    }
    async with Engine(_settings(tmp_path, tiny_models, controlnets=controlnets)) as engine:
        drawing = [_circle_drawing()]
        from_file = await _generate(engine, [ControlUnit("scribble", model="my-scribble")], drawing)
        from_folder = await _generate(engine, [ControlUnit("scribble", model=CN15)], drawing)
        assert np.abs(_pixels(from_file) - _pixels(from_folder)).max() <= 1  # the same weights
        with pytest.raises(IncompatibleAssetError) as caught:
            await _generate(engine, [ControlUnit("scribble", model="bare")], drawing)
        async with engine.db.sessions() as session:
            failed = (await session.scalars(select(Job).where(Job.status == "failed"))).one()
    message = str(caught.value)
    assert "'bare'" in message and "bare.config" in message and str(tmp_path) not in message
    assert failed.error == message


async def test_a_controlnet_for_another_base_model_fails_with_a_sentence(engine: Engine) -> None:
    # shapes-scribble is an sd15 ControlNet, but for the shapes model's UNet, not tiny-sd15's
    with pytest.raises(IncompatibleAssetError) as caught:
        await _generate(engine, [ControlUnit("scribble", model="shapes-scribble")], [_circle_drawing()])
    message = str(caught.value)
    assert "'shapes-scribble'" in message and "'tiny-sd15'" in message and "\n" not in message
    assert await _count(engine, ImageRow) == 0


@pytest.mark.parametrize(
    ("units", "controls", "error", "words"),
    [
        ([ControlUnit("segmentation", model=CN15)], 1, InvalidRequestError, "control type"),
        ([ControlUnit("scribble", model="tiny-controlnet-xl")], 1, IncompatibleAssetError, "sdxl"),
        ([ControlUnit("scribble", model=CN15)], 0, InvalidRequestError, "control image"),
        ([ControlUnit("canny", model=CN15, low=200, high=100)], 1, InvalidRequestError, "threshold"),
    ],
)
async def test_bad_input_is_one_sentence_and_stores_nothing(
    engine: Engine, units: list[ControlUnit], controls: int, error: type, words: str
) -> None:
    with pytest.raises(error) as caught:
        await _generate(engine, units, [_circle_drawing()] * controls)
    message = str(caught.value)
    assert words in message and message.endswith(".") and "\n" not in message
    assert await _count(engine, Job) == 0 and await _count(engine, ImageRow) == 0
    assert not list(engine.files.iter_hashes())


# --- the shapes model follows a scribble ------------------------------------------------------------

N_SCENES, BATCH = 4, 4
#: Mean IoU the scribble ControlNet must reach, and what the same runs at weight 0 must stay under.
FOLLOWS, IGNORED = 0.5, 0.2


async def _shapes_iou(engine: Engine, weight: float) -> float:
    """Mean IoU of the prompted colour's region with the scribbled shape: the first evaluation scenes (one
    shape each, prompt "a {colour} {kind}"), 4 seeds each, the scribble drawn as dark pen on white paper."""
    rng = np.random.default_rng(321)
    values = []
    for index, (_, scene) in enumerate(scenes.eval_prompts(N_SCENES, seed=9)):
        target = scene.shapes[0]
        drawing = Image.fromarray(255 - scenes.scribble(scene, rng))
        result = await _generate(
            engine,
            [ControlUnit("scribble", weight=weight)],
            [drawing],
            prompt=f"a {target.colour} {target.kind}",
            model=None,
            cfg=3.0,
            steps=10,
            sampler="DPM++ 2M",
            seed=100 * index,
            batch=BATCH,
        )
        assert result.spec.model == "shapes" and result.spec.controls[0].model == "shapes-scribble"
        truth = scenes.shape_mask(target)
        for i in range(BATCH):
            values.append(
                iou(region_mask_for_colour(_pixels(result, i).astype(np.uint8), target.colour), truth)
            )
    return float(np.mean(values))


async def test_shapes_model_follows_a_scribbled_shape(engine: Engine) -> None:
    """Training measured IoU 0.61 with the control over 50 scenes (0.64 here, 16 images)."""
    assert await _shapes_iou(engine, 1.0) >= FOLLOWS


async def test_shapes_model_at_weight_zero_does_not_follow_the_scribble(engine: Engine) -> None:
    """The same runs with the control at weight 0: training measured IoU 0.14 (0.07 here)."""
    assert await _shapes_iou(engine, 0.0) <= IGNORED
