"""The upscale mode through the engine: the x4 upscaler, GAN upscalers (tiled), resampling, bad files."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sqlalchemy import func, select

from models.extras import ExtraRegistry
from models.shapes.scenes import Scene, make_shape, render
from models.shapes.scorer import score_image
from models.tiny import tiny_esrgan_path
from models.tiny_components import esrgan_state_dict
from pipelines.engine import Engine, JobResult
from pipelines.gan import gan_passes, load_gan, upscale_array
from pipelines.inputs import JobInputs
from pipelines.jobs import JobKind, JobSpec
from pipelines.pnginfo import parse_parameters
from pipelines.samplers import SAMPLERS, make_scheduler
from pipelines.settings import Settings
from pipelines.upscale import load_x4, upscale_x4
from storage.errors import IncompatibleAssetError, NotFoundError
from storage.tables import Image as ImageRow
from storage.tables import Job

CPU = torch.device("cpu")
SCENE = Scene((make_shape("circle", "red", "top left", "large"),), ("blue",))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def _smooth(height: int, width: int) -> np.ndarray:
    """Slow gradients and waves in [0.2, 0.8]: nothing a 4x model would sharpen into edges."""
    y, x = np.mgrid[0:height, 0:width] / 64.0
    channels = [
        0.5 + 0.3 * np.sin(2 * x + 1),
        0.5 + 0.3 * np.cos(3 * y),
        0.2 + 0.6 * x * y / (x.max() * y.max()),
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def _pixels(result: JobResult, index: int = 0) -> np.ndarray:
    with Image.open(io.BytesIO(result.images[index].path.read_bytes())) as png:
        return np.asarray(png.convert("RGB"))


def _params(result: JobResult, index: int = 0) -> dict[str, str]:
    with Image.open(io.BytesIO(result.images[index].path.read_bytes())) as png:
        return parse_parameters(png.info["parameters"])[2]


def _upscale(upscaler: str, scale: float = 4, **fields: object) -> JobSpec:
    return JobSpec(prompt="", kind=JobKind.upscale, upscaler=upscaler, scale=scale, **fields)  # type: ignore[arg-type]


async def _count(engine: Engine, table: type) -> int:
    async with engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


# --- the x4 latent upscaler -----------------------------------------------------------------------------


async def test_x4_turns_64_into_256_end_to_end(engine: Engine) -> None:
    seen: list[tuple[int, int]] = []
    result = await engine.generate(
        _upscale("tiny-x4", steps=5, seed=3),
        on_step=lambda done, total: seen.append((done, total)),
        inputs=JobInputs(init=_png(render(SCENE))),
    )
    assert (result.spec.width, result.spec.height) == (64, 64)
    pixels = _pixels(result)
    assert pixels.shape == (256, 256, 3) and pixels.std() > 0
    assert seen == [(i, 5) for i in range(1, 6)]
    params = _params(result)
    assert params["Size"] == "256x256" and params["Postprocess upscaler"] == "tiny-x4"
    assert params["Postprocess upscale by"] == "4" and params["Noise level"] == "20"
    assert params["Steps"] == "5" and "Tile size" not in params  # 64 px fits one tile
    async with engine.db.sessions() as session:
        job = await session.get(Job, result.job_id)
        assert job is not None and job.status == "done"


async def test_x4_batch_equals_single_runs_and_scale_2_is_its_lanczos(engine: Engine) -> None:
    init = JobInputs(init=_png(_noise(32, 32)))
    batch = await engine.generate(_upscale("tiny-x4", steps=2, seed=10, batch=2), inputs=init)
    single = await engine.generate(_upscale("tiny-x4", steps=2, seed=11), inputs=init)
    half = await engine.generate(_upscale("tiny-x4", scale=2, steps=2, seed=10), inputs=init)
    first, second = _pixels(batch, 0), _pixels(batch, 1)
    assert [i.seed for i in batch.images] == [10, 11]
    assert first.shape == (128, 128, 3) and np.abs(first.astype(int) - second).mean() > 1  # seeds differ
    np.testing.assert_array_equal(second, _pixels(single))
    expected = Image.fromarray(first).resize((64, 64), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(_pixels(half), np.asarray(expected))


def test_x4_tiles_a_large_input_and_crops_its_padding(tiny_models: Path) -> None:
    entry = ExtraRegistry(builtin_dir=tiny_models).get_upscaler("tiny-x4")
    assert entry is not None
    up = load_x4(entry, device=CPU, dtype=torch.float32)
    spec = JobSpec(prompt="", kind=JobKind.upscale, steps=2)
    seen: list[tuple[int, int]] = []
    image = Image.fromarray(_noise(37, 45))  # padded to 48×40: tiles of 32 start at x 0, 16 and y 0, 8
    result = upscale_x4(up, image, spec, 1, tile=32, overlap=8, on_step=lambda d, t: seen.append((d, t)))
    assert result.size == (180, 148)
    assert seen[-1] == (8, 8) and len(seen) == 8  # 2 steps × 4 tiles
    assert np.asarray(result).std() > 0


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_maps_onto_the_x4_noise_schedule(tiny_models: Path, sampler: str) -> None:
    """The x4 runner swaps in the job's sampler: each keeps the x4's v-prediction and its betas."""
    config = json.loads((tiny_models / "upscaler-x4" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = make_scheduler(sampler, config)
    scheduler.set_timesteps(5)
    assert scheduler.config.prediction_type == "v_prediction" == config["prediction_type"]
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (
        config["beta_start"],
        config["beta_end"],
    )
    assert len(scheduler.timesteps) >= 5


# --- GAN upscalers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "size"), [(2, (90, 74)), (4, (180, 148))])
async def test_gan_upscale_gives_the_asked_scale(engine: Engine, scale: int, size: tuple[int, int]) -> None:
    result = await engine.generate(
        _upscale("tiny-esrgan", scale), inputs=JobInputs(init=_png(_noise(37, 45)))
    )
    image = result.images[0]
    assert (image.width, image.height) == size and _pixels(result).shape == (size[1], size[0], 3)
    params = _params(result)
    assert params["Postprocess upscaler"] == "tiny-esrgan" and params["Size"] == f"{size[0]}x{size[1]}"


def test_gan_passes_follow_the_native_scale() -> None:
    assert [gan_passes(4, s) for s in (1, 2, 4)] == [1, 1, 1]
    assert [gan_passes(2, s) for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert gan_passes(1, 4) == 1 and gan_passes(2, 100) == 3


def test_tiled_gan_upscale_has_no_seams(tiny_models: Path) -> None:
    """tiny-esrgan on a smooth image: tiled with overlap equals untiled within 0.3/255 (so 8-bit outputs
    differ by at most one level), and is closer to it than hard-cut tiles are."""
    model = load_gan(tiny_esrgan_path(tiny_models), "tiny-esrgan", device=CPU, dtype=torch.float32)
    image = _smooth(64, 56)
    untiled = upscale_array(model, image, tile=64, overlap=0)
    tiled = upscale_array(model, image, tile=40, overlap=12)  # 2×2 tiles
    hard = upscale_array(model, image, tile=32, overlap=0)  # 2×2 tiles meeting edge to edge
    assert tiled.shape == untiled.shape == (256, 224, 3)
    blended_error, hard_error = np.abs(tiled - untiled).max(), np.abs(hard - untiled).max()
    assert blended_error < 0.3 / 255, blended_error * 255
    assert blended_error < hard_error


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest", "tiny-esrgan"])
async def test_an_upscaled_scene_keeps_its_colours_and_shape(engine: Engine, upscaler: str) -> None:
    """Upscale a rendered scene 4x, shrink it back to 64: the scorer reads the scene. (tiny-esrgan has random
    weights but is built near-identity, a 4x nearest-neighbour plus small residuals; a random x4 is not.)"""
    result = await engine.generate(_upscale(upscaler), inputs=JobInputs(init=_png(render(SCENE))))
    big = Image.fromarray(_pixels(result))
    assert big.size == (256, 256)
    reading = score_image(np.asarray(big.resize((64, 64), Image.Resampling.BOX)))
    shape, want = reading.shapes[0], SCENE.shapes[0]
    assert (shape.colour, shape.shape, shape.position, shape.size) == (
        want.colour,
        want.kind,
        want.position,
        want.size,
    )
    assert reading.background == "blue"


async def test_deterministic_upscalers_return_copies_for_a_batch(engine: Engine) -> None:
    result = await engine.generate(
        _upscale("Lanczos", 2, batch=2, seed=4), inputs=JobInputs(init=_png(_noise(16, 24)))
    )
    assert [i.seed for i in result.images] == [4, 5]
    np.testing.assert_array_equal(_pixels(result, 0), _pixels(result, 1))
    assert _pixels(result, 0).shape == (32, 48, 3)


def test_a_pth_upscaler_loads_without_pickle_code_and_matches_its_safetensors(
    tiny_models: Path, tmp_path: Path
) -> None:
    path = tmp_path / "4x_tiny.pth"
    torch.save({"params_ema": esrgan_state_dict(10)}, path)  # Real-ESRGAN's release layout
    from_pth = load_gan(path, "pth", device=CPU, dtype=torch.float32)
    from_safetensors = load_gan(tiny_esrgan_path(tiny_models), "st", device=CPU, dtype=torch.float32)
    image = _smooth(16, 16)
    assert from_pth.architecture.name == "ESRGAN" and from_pth.scale == 4
    np.testing.assert_array_equal(upscale_array(from_pth, image), upscale_array(from_safetensors, image))


# --- bad upscalers ---------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call to os.mkdir: loading it with plain pickle would create the directory."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.target),)


def _bad_file(kind: str, folder: Path) -> Path:
    if kind == "random.pth":
        path = folder / "random.pth"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind in ("payload.pth", "payload.pt"):
        path = folder / kind
        torch.save({"conv_first.weight": torch.zeros(1), "extra": _Payload(folder / "pwned")}, path)
    elif kind == "unknown.safetensors":
        path = folder / kind
        save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))
    else:
        path = folder / kind
        path.write_text("not a model")
    return path


@pytest.mark.parametrize(
    "kind", ["random.pth", "payload.pth", "payload.pt", "unknown.safetensors", "notes.txt"]
)
async def test_a_file_spandrel_cannot_read_is_refused_in_one_sentence(
    tmp_path: Path, tiny_models: Path, kind: str
) -> None:
    path = _bad_file(kind, tmp_path)
    settings = Settings(
        data_dir=tmp_path / "data", builtin_models_dir=tiny_models, upscalers={"bad": str(path)}
    )
    async with Engine(settings) as engine:
        init = _png(_noise(16, 16))
        with pytest.raises(IncompatibleAssetError) as info:
            await engine.generate(_upscale("bad"), inputs=JobInputs(init=init))
        message = str(info.value)
        assert "'bad'" in message and message.endswith(".") and "\n" not in message
        assert str(tmp_path) not in message and path.name not in message
        assert not (tmp_path / "pwned").exists()  # the pickle's payload never ran
        assert await _count(engine, ImageRow) == 0
        async with engine.db.sessions() as session:
            job = (await session.scalars(select(Job))).one()
        assert job.status == "failed" and job.error == message
        assert len(list(engine.files.iter_hashes())) == 1  # only the input image


async def test_an_unknown_upscaler_is_refused_before_anything_is_stored(engine: Engine) -> None:
    with pytest.raises(NotFoundError) as info:
        await engine.generate(_upscale("4x-nope"), inputs=JobInputs(init=_png(_noise(16, 16))))
    message = str(info.value)
    assert "'4x-nope'" in message and "tiny-esrgan" in message and "\n" not in message
    assert await _count(engine, Job) == 0 and not list(engine.files.iter_hashes())
