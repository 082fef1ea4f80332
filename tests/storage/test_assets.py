"""Tests for storage.assets: names, uniqueness, visibility and who may use what."""

from __future__ import annotations

from dataclasses import replace

import pytest

from storage.assets import (
    NewAsset,
    add_asset,
    check_asset_name,
    find_usable_asset,
    list_usable_assets,
    remove_asset,
    rename_asset,
    set_visibility,
)
from storage.db import Database
from storage.errors import InvalidRequestError, NotFoundError
from storage.tables import AssetKind, Visibility

ALICE, BOB, CAROL = 1001, 1002, 1003
GUILD, OTHER_GUILD = 5001, 5002


def _new(owner: int, name: str, **kw: object) -> NewAsset:
    base = NewAsset(
        owner_id=owner,
        guild_id=GUILD,
        kind=AssetKind.LORA,
        name=name,
        family="sd15",
        format="kohya",
        sha256=f"{owner:032x}{sum(map(ord, name)):032x}",
        short_hash="abcdef123456",
        size=10,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "Give the asset a name"),
        ("   ", "Give the asset a name"),
        ("x" * 65, "at most 64"),
        ("../../bot.py", "only use letters"),
        ("a/b", "only use letters"),
        ("a\\b", "only use letters"),
        ("two words", "only use letters"),
        ("bad\x00name", "only use letters"),
        ("tab\tname", "only use letters"),
        ("🎨🎨", "only use letters"),
        ("-leading", "only use letters"),
        ("trailing.", "only use letters"),
        ("<lora:x>", "only use letters"),
    ],
)
def test_bad_names_refused(name: str, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        check_asset_name(name)


@pytest.mark.parametrize(
    "name", ["pixel-art", "EasyNegative", "bad_prompt_version2", "v1.5", "日本語", "x" * 64]
)
def test_good_names_kept(name: str) -> None:
    assert check_asset_name(f"  {name} ") == name


async def test_private_assets_invisible_to_others(db: Database) -> None:
    async with db.sessions.begin() as session:
        await add_asset(session, _new(ALICE, "secret"))
        await add_asset(session, _new(ALICE, "shared", visibility=Visibility.GUILD))
        await add_asset(session, _new(ALICE, "everyone", visibility=Visibility.PUBLIC))
    async with db.sessions() as session:
        own = await list_usable_assets(session, user_id=ALICE, guild_id=GUILD)
        same_guild = await list_usable_assets(session, user_id=BOB, guild_id=GUILD)
        elsewhere = await list_usable_assets(session, user_id=BOB, guild_id=OTHER_GUILD)
        in_dm = await list_usable_assets(session, user_id=CAROL, guild_id=None)
        bob_secret = await find_usable_asset(
            session, user_id=BOB, guild_id=GUILD, kind=AssetKind.LORA, name="secret"
        )
    assert sorted(a.name for a in own) == ["everyone", "secret", "shared"]
    assert sorted(a.name for a in same_guild) == ["everyone", "shared"]
    assert [a.name for a in elsewhere] == ["everyone"]
    assert [a.name for a in in_dm] == ["everyone"]
    assert bob_secret is None


async def test_names_unique_per_owner_and_kind_case_insensitively(db: Database) -> None:
    async with db.sessions.begin() as session:
        await add_asset(session, _new(ALICE, "Pixel_Art"))
        await add_asset(session, _new(BOB, "pixel_art"))  # another owner: fine
        await add_asset(session, _new(ALICE, "pixel_art", kind=AssetKind.EMBEDDING))  # another kind: fine
    with pytest.raises(InvalidRequestError, match="already have a LoRA called pixel_art"):
        async with db.sessions.begin() as session:
            await add_asset(session, _new(ALICE, "pixel_art"))
    async with db.sessions() as session:
        found = await find_usable_asset(
            session, user_id=ALICE, guild_id=GUILD, kind=AssetKind.LORA, name="PIXEL_ART"
        )
        # "_" is not a wildcard: "pixelXart" must not match "pixel_art".
        wild = await find_usable_asset(
            session, user_id=ALICE, guild_id=GUILD, kind=AssetKind.LORA, name="pixelXart"
        )
    assert found is not None and found.owner_id == ALICE and found.name == "Pixel_Art"
    assert wild is None


async def test_own_asset_preferred_over_shared_one_of_the_same_name(db: Database) -> None:
    async with db.sessions.begin() as session:
        await add_asset(session, _new(BOB, "style", visibility=Visibility.PUBLIC))
        await add_asset(session, _new(CAROL, "style", visibility=Visibility.GUILD))
        await add_asset(session, _new(ALICE, "style"))
    async with db.sessions() as session:
        alice = await find_usable_asset(
            session, user_id=ALICE, guild_id=GUILD, kind=AssetKind.LORA, name="style"
        )
        dave = await find_usable_asset(session, user_id=7, guild_id=GUILD, kind=AssetKind.LORA, name="style")
        erin = await find_usable_asset(session, user_id=8, guild_id=None, kind=AssetKind.LORA, name="style")
    assert alice is not None and alice.owner_id == ALICE
    assert dave is not None and dave.owner_id == CAROL  # the guild's before a public one
    assert erin is not None and erin.owner_id == BOB


async def test_remove_rename_share_only_own(db: Database) -> None:
    async with db.sessions.begin() as session:
        first = await add_asset(session, _new(ALICE, "one"))
        await add_asset(session, _new(ALICE, "copy", sha256=first.sha256))
        await add_asset(session, _new(ALICE, "two"))
    with pytest.raises(NotFoundError, match="You have no LoRA called one"):
        async with db.sessions.begin() as session:
            await remove_asset(session, owner_id=BOB, kind=AssetKind.LORA, name="one")
    async with db.sessions.begin() as session:
        assert (
            await remove_asset(session, owner_id=ALICE, kind=AssetKind.LORA, name="one") is None
        )  # bytes shared
        orphan = await remove_asset(session, owner_id=ALICE, kind=AssetKind.LORA, name="copy")
        assert orphan == first.sha256
    with pytest.raises(InvalidRequestError, match="already have a LoRA called TWO"):
        async with db.sessions.begin() as session:
            await add_asset(session, _new(ALICE, "three"))
            await rename_asset(session, owner_id=ALICE, kind=AssetKind.LORA, name="three", new_name="TWO")
    async with db.sessions.begin() as session:
        renamed = await rename_asset(session, owner_id=ALICE, kind=AssetKind.LORA, name="two", new_name="Two")
        assert renamed.name == "Two"
        shared = await set_visibility(
            session, owner_id=ALICE, kind=AssetKind.LORA, name="two", visibility=Visibility.GUILD
        )
        assert shared.visibility == Visibility.GUILD
    async with db.sessions() as session:
        names = [a.name for a in await list_usable_assets(session, user_id=ALICE, guild_id=GUILD)]
    assert names == ["Two"]  # "three" was rolled back with the failed rename


async def test_dm_upload_cannot_be_shared_with_a_guild(db: Database) -> None:
    async with db.sessions.begin() as session:
        await add_asset(session, _new(ALICE, "dm", guild_id=None))
    with pytest.raises(InvalidRequestError, match="not uploaded in a server"):
        async with db.sessions.begin() as session:
            await set_visibility(
                session, owner_id=ALICE, kind=AssetKind.LORA, name="dm", visibility=Visibility.GUILD
            )
