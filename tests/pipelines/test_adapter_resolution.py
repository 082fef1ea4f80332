"""Resolving a job's adapters from its prompts: access, family, merging, limits, and the PNG info keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from models.families import Family
from pipelines.adapters import resolve_adapters
from pipelines.jobs import LIMITS, AdapterRef, JobKind, JobSpec
from pipelines.parameters import webui_parameters
from pipelines.pnginfo import parse_parameters
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
