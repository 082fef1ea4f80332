"""Resolving a job's adapters from its prompts: access, family, merging, limits, and the PNG info keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.adapters.targets import ModelTarget, target_for_folder
from models.families import Family
from pipelines.adapters import resolve_adapters
from pipelines.asset_uploads import add_asset_file
from pipelines.engine import Engine
from pipelines.jobs import LIMITS, AdapterRef, JobKind, JobSpec
from pipelines.parameters import webui_parameters
from pipelines.pnginfo import parse_parameters
from pipelines.settings import Settings
from storage.assets import NewAsset, add_asset
from storage.db import Database, sqlite_url
from storage.errors import IncompatibleAssetError, InvalidRequestError, NotFoundError
from storage.tables import AssetKind, Visibility

ALICE, BOB = 2001, 2002
GUILD = 9001


def _asset(owner: int, kind: AssetKind, name: str, **kw: object) -> NewAsset:
    base = NewAsset(
        owner_id=owner,
        guild_id=GUILD,
        kind=kind,
        name=name,
        family="sd15",
        format="kohya",
        sha256=f"{abs(hash((owner, kind, name))):064x}"[-64:],
        short_hash=f"{abs(hash(name)):012x}"[-12:],
        size=1,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database(sqlite_url(tmp_path / "db.sqlite")) as database:
        async with database.sessions.begin() as session:
            await add_asset(session, _asset(ALICE, AssetKind.LORA, "pixel"))
            await add_asset(session, _asset(ALICE, AssetKind.LORA, "xl-style", family="sdxl"))
            await add_asset(session, _asset(BOB, AssetKind.LORA, "bobs-private"))
            await add_asset(session, _asset(BOB, AssetKind.LORA, "bobs-shared", visibility=Visibility.GUILD))
            await add_asset(session, _asset(ALICE, AssetKind.HYPERNETWORK, "anime"))
            await add_asset(session, _asset(ALICE, AssetKind.EMBEDDING, "EasyNegative", format="webui"))
            await add_asset(
                session, _asset(BOB, AssetKind.EMBEDDING, "bad-hands-5", visibility=Visibility.PUBLIC)
            )
            await add_asset(session, _asset(ALICE, AssetKind.VAE, "clearvae", format="ldm"))
        yield database


async def _resolve(db: Database, prompt: str, negative: str = "", user: int = ALICE, **kw: object) -> JobSpec:
    spec = JobSpec(prompt, negative, user_id=user, guild_id=GUILD, **kw)  # type: ignore[arg-type]
    async with db.sessions() as session:
        return await resolve_adapters(session, spec, Family.sd15, LIMITS)


async def test_tags_words_and_vae_resolve_to_stored_bytes(db: Database) -> None:
    spec = await _resolve(
        db,
        "a cat <lora:pixel:0.8>, <hypernet:anime:0.5> <lora:bobs-shared:te=0.3:unet=1.2>",
        "easynegative, bad-hands-5",
        vae="ClearVAE",
    )
    got = [(r.kind, r.name, r.weight, r.te_weight, r.unet_weight) for r in spec.adapters]
    assert got == [
        ("lora", "pixel", 0.8, None, None),
        ("hypernetwork", "anime", 0.5, None, None),
        ("lora", "bobs-shared", 1.0, 0.3, 1.2),
        ("embedding", "EasyNegative", 1.0, None, None),  # in order of first use
        ("embedding", "bad-hands-5", 1.0, None, None),  # Bob's, public
        ("vae", "clearvae", 1.0, None, None),
    ]
    assert all(len(r.sha256) == 64 for r in spec.adapters)
    assert JobSpec.from_dict(spec.to_dict()) == spec  # stored and read back whole


async def test_private_lora_of_another_user_is_not_found(db: Database) -> None:
    with pytest.raises(NotFoundError, match="There is no LoRA called bobs-private that you can use here"):
        await _resolve(db, "a cat <lora:bobs-private:1>")
    spec = await _resolve(db, "a cat <lora:bobs-private:1>", user=BOB)
    assert [r.name for r in spec.adapters] == ["bobs-private"]


async def test_embedding_word_of_someone_elses_private_asset_is_plain_text(db: Database) -> None:
    spec = await _resolve(db, "a cat, EasyNegative", user=BOB)  # Alice's embedding is private
    assert spec.adapters == ()


async def test_embedding_needs_a_whole_word(db: Database) -> None:
    spec = await _resolve(db, "NotEasyNegative, EasyNegatives")
    assert spec.adapters == ()


async def test_wrong_family_refused_by_name(db: Database) -> None:
    with pytest.raises(
        IncompatibleAssetError, match=r"This LoRA is for SDXL; this server's model is SD 1\.5\."
    ):
        await _resolve(db, "a cat <lora:xl-style>")


async def test_same_lora_twice_sums_weights(db: Database) -> None:
    spec = await _resolve(db, "<lora:pixel:0.5> a cat <lora:PIXEL:0.25>")
    assert [(r.name, r.weight) for r in spec.adapters] == [("pixel", 0.75)]


@pytest.mark.parametrize(
    ("prompt", "error", "fragment"),
    [
        ("<lora:pixel:9>", InvalidRequestError, "must be between -5 and 5"),
        ("<lora:nope>", NotFoundError, "There is no LoRA called nope"),
        ("<hypernet:nope:1>", NotFoundError, "There is no hypernetwork called nope"),
    ],
)
async def test_bad_tags(db: Database, prompt: str, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        await _resolve(db, prompt)


async def test_unknown_vae(db: Database) -> None:
    with pytest.raises(NotFoundError, match="There is no VAE called nope"):
        await _resolve(db, "a cat", vae="nope")


async def test_adapters_refused_where_nothing_diffuses(db: Database) -> None:
    with pytest.raises(InvalidRequestError, match="do not apply to upscale"):
        await _resolve(db, "a cat <lora:pixel>", kind=JobKind.upscale)


async def test_too_many_adapters(db: Database) -> None:
    limits = replace(LIMITS, max_adapters=1)
    spec = JobSpec("<lora:pixel> <hypernet:anime>", user_id=ALICE, guild_id=GUILD)
    async with db.sessions() as session:
        with pytest.raises(InvalidRequestError, match="use at most 1 at once"):
            await resolve_adapters(session, spec, Family.sd15, limits)


def test_parameters_name_adapters_as_the_webui() -> None:
    spec = JobSpec(
        "a cat <lora:pixel:0.8>, EasyNegative",
        width=512,
        height=512,
        seed=1,
        adapters=(
            AdapterRef("lora", "pixel", "a" * 64, "0123456789ab", weight=0.8),
            AdapterRef("lora", "ink", "b" * 64, "ba9876543210"),
            AdapterRef("embedding", "EasyNegative", "c" * 64, "c74b4e810b03"),
            AdapterRef("hypernetwork", "anime", "d" * 64, "ddddddddddee", weight=0.5),
            AdapterRef("vae", "clearvae", "e" * 64, "eeeeeeeeeeff"),
        ),
    )
    text = webui_parameters(spec, 1, "shapes", "f" * 64)
    assert 'Lora hashes: "pixel: 0123456789ab, ink: ba9876543210"' in text
    assert 'TI hashes: "EasyNegative: c74b4e810b03"' in text
    assert "VAE hash: eeeeeeeeee, VAE: clearvae" in text
    assert "Hypernet: anime, Hypernet hash: dddddddddd, Hypernet strength: 0.5" in text
    assert text.startswith("a cat <lora:pixel:0.8>, EasyNegative\n")  # tags stay in the prompt
    _, _, parsed = parse_parameters(text)
    assert parsed["Lora hashes"] == "pixel: 0123456789ab, ink: ba9876543210"


# --- adapters made for a model with shapes of its own (the built-in shapes model) ---------------------------

REPO = Path(__file__).resolve().parents[2]
SHAPES_DIR = REPO / "models" / "shapes" / "model"
PURPLE = REPO / "models" / "shapes" / "loras" / "purple-circles.safetensors"


@pytest.fixture(scope="module")
def shapes_target() -> ModelTarget:
    return target_for_folder("shapes", Family.sd15, SHAPES_DIR)


@pytest.fixture
async def shapes_db(tmp_path: Path, shapes_target: ModelTarget) -> AsyncIterator[Database]:
    made_for_shapes = {"model": "shapes", "model_key": shapes_target.key}
    async with Database(sqlite_url(tmp_path / "db.sqlite")) as database:
        async with database.sessions.begin() as session:
            for kind, name, details in [
                (AssetKind.LORA, "purple-circles", made_for_shapes),
                (AssetKind.EMBEDDING, "shapey", {**made_for_shapes, "width": 64, "vectors": 2}),
                (AssetKind.EMBEDDING, "EasyNegative", {"width": 768, "vectors": 8}),
                (AssetKind.HYPERNETWORK, "anime", {"widths": [320, 640, 768, 1280]}),
                (AssetKind.HYPERNETWORK, "shapenet", {**made_for_shapes, "widths": [48, 64, 96]}),
                (AssetKind.VAE, "clearvae", {"latent_channels": 4}),
                (AssetKind.LORA, "pixel", {"rank": 4}),
            ]:
                await add_asset(session, _asset(ALICE, kind, name, details=details))
        yield database


async def _resolve_on(db: Database, target: ModelTarget | Family, prompt: str, **kw: object) -> JobSpec:
    spec = JobSpec(prompt, user_id=ALICE, guild_id=GUILD, **kw)  # type: ignore[arg-type]
    async with db.sessions() as session:
        return await resolve_adapters(session, spec, target, LIMITS)


async def test_adapters_made_for_shapes_resolve_on_its_jobs_only(
    shapes_db: Database, shapes_target: ModelTarget
) -> None:
    prompt = "a red circle <lora:purple-circles:0.9> <hypernet:shapenet:0.5>, shapey, EasyNegative"
    spec = await _resolve_on(shapes_db, shapes_target, prompt)
    # EasyNegative (768-wide vectors) cannot go into the shapes model's 64-wide encoder: plain text there
    assert [(r.kind, r.name) for r in spec.adapters] == [
        ("lora", "purple-circles"),
        ("hypernetwork", "shapenet"),
        ("embedding", "shapey"),
    ]
    inpaint = target_for_folder("shapes-inpaint", Family.sd15, REPO / "models" / "shapes" / "inpaint")
    assert (await _resolve_on(shapes_db, inpaint, prompt)).adapters == spec.adapters  # same shapes

    with pytest.raises(IncompatibleAssetError) as refused:
        await _resolve_on(shapes_db, Family.sd15, "a red circle <lora:purple-circles>")
    assert str(refused.value) == (
        "The LoRA purple-circles was made for the shapes model; choose that model or another LoRA."
    )
    with pytest.raises(IncompatibleAssetError, match="^The hypernetwork shapenet was made for the shapes"):
        await _resolve_on(shapes_db, Family.sd15, "a red circle <hypernet:shapenet>")
    on_sd15 = await _resolve_on(shapes_db, Family.sd15, "a red circle, shapey, EasyNegative")
    assert [r.name for r in on_sd15.adapters] == ["EasyNegative"]


async def test_family_adapters_that_cannot_fit_the_shapes_model_are_refused_by_name(
    shapes_db: Database, shapes_target: ModelTarget
) -> None:
    with pytest.raises(IncompatibleAssetError) as refused:
        await _resolve_on(shapes_db, shapes_target, "a red circle <hypernet:anime>")
    assert str(refused.value) == (
        "The hypernetwork anime was made for SD 1.5 models and does not fit the shapes model; "
        "choose another model or hypernetwork."
    )
    with pytest.raises(IncompatibleAssetError, match="^The VAE clearvae was made for SD 1.5 models"):
        await _resolve_on(shapes_db, shapes_target, "a red circle", vae="clearvae")
    # a LoRA's layers are only known from its file: it is checked when the worker applies it
    spec = await _resolve_on(shapes_db, shapes_target, "a red circle <lora:pixel>")
    assert [r.name for r in spec.adapters] == ["pixel"]


async def test_purple_circles_through_the_engine_on_the_default_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upload, resolve, apply for one job, restore: the product path on a server with no settings."""
    import os

    for key in [k for k in os.environ if k.startswith("DREAMCORD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DREAMCORD_CONFIG", str(tmp_path / "none.toml"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        async with Engine(Settings(data_dir=tmp_path / "data")) as engine:
            added = await add_asset_file(
                engine, PURPLE, name="purple-circles", owner_id=ALICE, guild_id=GUILD
            )
            assert added.checked.info.details["model"] == "shapes"
            common: dict[str, object] = {"steps": 4, "seed": 5, "user_id": ALICE, "guild_id": GUILD}
            before = await engine.generate(JobSpec("a red circle", **common))  # type: ignore[arg-type]
            with_lora = await engine.generate(
                JobSpec("a red circle <lora:purple-circles>", **common)  # type: ignore[arg-type]
            )
            after = await engine.generate(JobSpec("a red circle", **common))  # type: ignore[arg-type]
            with pytest.raises(IncompatibleAssetError, match="made for the shapes model"):
                await engine.generate(
                    JobSpec("a red circle <lora:purple-circles>", model="tiny-sd15", **common)  # type: ignore[arg-type]
                )
    finally:
        torch.set_num_threads(threads)
    assert with_lora.images[0].sha256 != before.images[0].sha256
    assert after.images[0].sha256 == before.images[0].sha256  # the very same PNG bytes
    assert f'Lora hashes: "purple-circles: {added.checked.short_hash}"' in with_lora.images[0].parameters
