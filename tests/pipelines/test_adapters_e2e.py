"""Users' adapters through the whole product path on a model with SD 1.5's real shapes.

Real files (../shared/fixtures) and webui-format files made here are added as assets, named in prompts,
applied by the worker for one job and restored: the next plain job's PNG is byte-identical to one made
before (same spec, same bytes, same sha256), and the PNG info names every adapter as the webui does.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from PIL import Image
from safetensors.torch import save_file

from models.ldm_export import vae_to_ldm
from models.sd15_reference import ensure_sd15_reference, sd15_vae
from pipelines.asset_uploads import add_asset_file
from pipelines.engine import Engine, JobResult
from pipelines.jobs import JobSpec
from pipelines.pnginfo import parse_parameters
from pipelines.settings import Settings
from storage.errors import NotFoundError
from storage.tables import AssetKind, Visibility

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALICE, BOB, GUILD = 3001, 3002, 7001
PLAIN = "a watercolor painting of a lighthouse"


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_sd15_reference(tmp_path_factory.mktemp("sd15-reference"))


def _hypernetwork_file(path: Path) -> Path:
    """A webui hypernetwork for SD 1.5's context widths: layer structure [1, 1, 1], relu, no layer norm."""
    generator = torch.Generator().manual_seed(7)
    obj: dict[object, object] = {
        "layer_structure": [1, 1, 1],
        "activation_func": "relu",
        "is_layer_norm": False,
        "use_dropout": False,
        "activate_output": False,
        "last_layer_dropout": False,
        "name": "sketchy",
        "step": 1000,
    }
    for width in (768, 320, 640, 1280):
        pair = []
        for _ in range(2):
            pair.append(
                {
                    "linear.0.weight": torch.randn(width, width, generator=generator) * 0.05,
                    "linear.0.bias": torch.zeros(width),
                    "linear.2.weight": torch.randn(width, width, generator=generator) * 0.05,
                    "linear.2.bias": torch.zeros(width),
                }
            )
        obj[width] = pair
    torch.save(obj, path)
    return path


def _vae_file(path: Path) -> Path:
    """Another VAE of SD 1.5's shapes, saved in the ldm (single-file) layout users download."""
    save_file(vae_to_ldm(sd15_vae(seed=5).state_dict()), str(path))
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    reference_dir: Path, tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path
) -> AsyncIterator[Engine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("adapters-e2e")
    settings = Settings(
        data_dir=work / "data",
        models={"sd15-reference": str(reference_dir)},
        default_model="sd15-reference",
    )
    async with Engine(settings) as eng:
        add = dict(owner_id=ALICE, guild_id=GUILD)
        await add_asset_file(eng, fixtures_dir / "lora/analog_svd_rank4.safetensors", name="analog", **add)
        await add_asset_file(
            eng, fixtures_dir / "embeddings/EasyNegative.safetensors", name="EasyNegative", **add
        )
        await add_asset_file(eng, _hypernetwork_file(work / "sketchy.pt"), name="sketchy", **add)
        await add_asset_file(eng, _vae_file(work / "vae.safetensors"), name="otherVAE", **add)
        await add_asset_file(
            eng, fixtures_dir / "lora/lora_disney.safetensors", name="disney", owner_id=BOB, guild_id=GUILD
        )
        yield eng
    torch.set_num_threads(threads)


async def _job(engine: Engine, prompt: str, negative: str = "", **kw: object) -> JobResult:
    spec = JobSpec(
        prompt,
        negative,
        width=64,
        height=64,
        steps=2,
        seed=11,
        user_id=ALICE,
        guild_id=GUILD,
        **kw,  # type: ignore[arg-type]
    )
    return await engine.generate(spec)


def _pixels(result: JobResult) -> np.ndarray:
    with Image.open(io.BytesIO(result.images[0].path.read_bytes())) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


async def test_every_kind_applies_for_one_job_and_leaves_no_trace(engine: Engine) -> None:
    before = await _job(engine, PLAIN)
    results = {
        "lora": await _job(engine, f"{PLAIN} <lora:analog:0.8>"),
        "embedding": await _job(engine, PLAIN, "EasyNegative"),
        "hypernetwork": await _job(engine, f"{PLAIN} <hypernet:sketchy:0.7>"),
        "vae": await _job(engine, PLAIN, vae="otherVAE"),
    }
    together = await _job(
        engine, f"{PLAIN} <lora:analog:0.8> <hypernet:sketchy:0.7>", "EasyNegative", vae="otherVAE"
    )
    after = await _job(engine, PLAIN)

    assert after.images[0].sha256 == before.images[0].sha256  # the very same PNG bytes
    base = _pixels(before)
    for kind, result in {**results, "all four": together}.items():
        assert np.abs(_pixels(result) - base).max() > 0, f"{kind} changed nothing"
    kinds = [ref.kind for ref in together.spec.adapters]
    assert sorted(kinds) == ["embedding", "hypernetwork", "lora", "vae"]

    _, _, params = parse_parameters(together.images[0].parameters)
    lora = next(r for r in together.spec.adapters if r.kind == "lora")
    assert params["Lora hashes"] == f"analog: {lora.short_hash}"
    assert params["TI hashes"] == "EasyNegative: c74b4e810b03"  # the webui's hash of this file
    assert params["Hypernet"] == "sketchy" and params["Hypernet strength"] == "0.7"
    assert params["VAE"] == "otherVAE" and len(params["VAE hash"]) == 10


async def test_weight_zero_lora_is_the_plain_image(engine: Engine) -> None:
    plain = _pixels(await _job(engine, PLAIN))
    zero = _pixels(await _job(engine, f"{PLAIN} <lora:analog:0>"))
    assert np.abs(zero - plain).max() <= 1  # PEFT at scale 0 adds exact zeros; PNG rounding at most


async def test_someone_elses_private_lora_cannot_be_used(engine: Engine) -> None:
    with pytest.raises(NotFoundError, match="There is no LoRA called disney that you can use here"):
        await _job(engine, f"{PLAIN} <lora:disney:1>")


async def test_shared_lora_of_the_guild_can_be_used(engine: Engine) -> None:
    from storage.assets import set_visibility

    async with engine.db.sessions.begin() as session:
        await set_visibility(
            session, owner_id=BOB, kind=AssetKind.LORA, name="disney", visibility=Visibility.GUILD
        )
    plain = _pixels(await _job(engine, PLAIN))
    shared = await _job(engine, f"{PLAIN} <lora:disney:1>")
    assert [r.name for r in shared.spec.adapters] == ["disney"]
    assert np.abs(_pixels(shared) - plain).max() > 0
