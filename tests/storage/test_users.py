"""Users and guilds: creation on first use, settings, deleting a user's data."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from storage.db import Database
from storage.jobs import NewImage, create_job, mark_done, mark_running
from storage.tables import Asset, AssetKind, Guild, Image, Job, User, Visibility
from storage.users import (
    delete_user_data,
    ensure_guild,
    ensure_user,
    get_guild_settings,
    get_user_settings,
    set_guild_settings,
    set_user_settings,
    update_guild_settings,
    update_user_settings,
)

ALICE, BOB = 180_000_000_000_000_001, 180_000_000_000_000_002  # snowflake-sized ids


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _asset(owner: int, name: str, sha: str, kind: AssetKind = AssetKind.LORA) -> Asset:
    return Asset(
        owner_id=owner,
        kind=kind,
        name=name,
        family="sd15",
        format="safetensors",
        sha256=sha,
        short_hash=sha[:10],
        size=1234,
    )


async def test_ensure_user_creates_once(db: Database) -> None:
    async with db.sessions.begin() as session:
        first = await ensure_user(session, ALICE)
        again = await ensure_user(session, ALICE)
        assert first is again
    async with db.sessions.begin() as session:
        user = await ensure_user(session, ALICE)
        guild = await ensure_guild(session, BOB)
    assert user.id == ALICE and user.settings == {}
    assert user.created_at.utcoffset() == timedelta(0)
    assert guild.id == BOB and guild.settings == {}
    async with db.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 1
        assert await session.scalar(select(func.count()).select_from(Guild)) == 1


async def test_concurrent_first_use_creates_one_row(file_db: Database) -> None:
    async def ensure() -> int:
        async with file_db.sessions.begin() as session:
            user = await ensure_user(session, ALICE)
            await asyncio.sleep(0.02)
            return user.id

    assert await asyncio.gather(*(ensure() for _ in range(4))) == [ALICE] * 4
    async with file_db.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 1


@pytest.mark.parametrize("bad", [0, -5, 2**63, True, "123"])
async def test_ensure_user_rejects_non_snowflakes(db: Database, bad: object) -> None:
    async with db.sessions() as session:
        with pytest.raises(ValueError):
            await ensure_user(session, bad)  # type: ignore[arg-type]


async def test_user_settings(db: Database) -> None:
    async with db.sessions.begin() as session:
        assert await get_user_settings(session, ALICE) == {}
        assert await session.get(User, ALICE) is None  # reading creates nothing
        stored = await set_user_settings(session, ALICE, {"sampler": "euler_a", "size": [512, 512]})
        stored["sampler"] = "mutated"  # a copy: changes nothing
    async with db.sessions.begin() as session:
        assert await get_user_settings(session, ALICE) == {"sampler": "euler_a", "size": [512, 512]}
        merged = await update_user_settings(session, ALICE, {"sampler": None, "steps": 30})
        assert merged == {"size": [512, 512], "steps": 30}
    async with db.sessions() as session:
        assert await get_user_settings(session, ALICE) == {"size": [512, 512], "steps": 30}
        with pytest.raises(ValueError):
            await set_user_settings(session, ALICE, {"when": object()})


async def test_guild_settings(db: Database) -> None:
    async with db.sessions.begin() as session:
        await set_guild_settings(session, BOB, {"nsfw": False})
        await update_guild_settings(session, BOB, {"max_steps": 40})
    async with db.sessions() as session:
        assert await get_guild_settings(session, BOB) == {"nsfw": False, "max_steps": 40}
        assert await get_guild_settings(session, ALICE) == {}


async def test_asset_names_are_unique_per_owner_and_kind(db: Database) -> None:
    async with db.sessions.begin() as session:
        await ensure_user(session, ALICE)
        await ensure_user(session, BOB)
        session.add_all(
            [
                _asset(ALICE, "ink", _sha("a")),
                _asset(ALICE, "ink", _sha("b"), AssetKind.EMBEDDING),
                _asset(BOB, "ink", _sha("c")),
            ]
        )
    async with db.sessions() as session:
        asset = await session.scalar(select(Asset).where(Asset.owner_id == BOB))
        assert asset is not None and asset.visibility is Visibility.PRIVATE and asset.details == {}
    with pytest.raises(IntegrityError):
        async with db.sessions.begin() as session:
            session.add(_asset(ALICE, "ink", _sha("d")))


async def test_deleting_a_job_cascades_to_its_images(db: Database) -> None:
    async with db.sessions.begin() as session:
        job = await create_job(session, kind="txt2img", spec={})
        await mark_running(session, job.id)
        await mark_done(session, job.id, [NewImage(0, 1, _sha("i"), 8, 8)], seconds=0.1)
        job_id = job.id
    async with db.sessions.begin() as session:
        await session.delete(await session.get(Job, job_id))
    async with db.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Image)) == 0


async def _add_job(db: Database, user: int | None, hashes: list[str]) -> int:
    async with db.sessions.begin() as session:
        job = await create_job(session, kind="txt2img", spec={"prompt": "p"}, user_id=user)
        await mark_running(session, job.id)
        images = [NewImage(i, i, sha, 64, 64) for i, sha in enumerate(hashes)]
        await mark_done(session, job.id, images, seconds=1.0)
        return job.id


async def test_delete_user_data(db: Database) -> None:
    shared_with_bob_asset, shared_with_bob_image, shared_with_cli = _sha("s1"), _sha("s2"), _sha("s3")
    alice_only = [_sha("a1"), _sha("a2"), _sha("a3"), _sha("a4")]
    async with db.sessions.begin() as session:
        await set_user_settings(session, ALICE, {"sampler": "ddim"})
        await ensure_user(session, BOB)
        session.add_all(
            [
                _asset(ALICE, "mine", alice_only[0]),
                _asset(ALICE, "shared", shared_with_bob_asset),
                _asset(BOB, "theirs", shared_with_bob_asset),
            ]
        )
    alice_jobs = [
        await _add_job(db, ALICE, [alice_only[1], alice_only[2], shared_with_bob_image]),
        await _add_job(db, ALICE, [alice_only[3], alice_only[1], shared_with_cli]),
    ]
    bob_job = await _add_job(db, BOB, [shared_with_bob_image])
    cli_job = await _add_job(db, None, [shared_with_cli])
    async with db.sessions.begin() as session:  # a job that never finished, no images
        await create_job(session, kind="upscale", spec={}, user_id=ALICE)

    async with db.sessions.begin() as session:
        orphans = await delete_user_data(session, ALICE)
    assert orphans == sorted(alice_only)

    async with db.sessions() as session:
        assert await session.get(User, ALICE) is None
        assert await get_user_settings(session, ALICE) == {}
        assert (await session.scalars(select(Job.id).where(Job.user_id == ALICE))).all() == []
        assert (await session.scalars(select(Job.id).where(Job.id.in_(alice_jobs)))).all() == []
        assert (await session.scalars(select(Asset.name))).all() == ["theirs"]
        remaining = (await session.scalars(select(Image.job_id).order_by(Image.job_id))).all()
        assert remaining == [bob_job, cli_job]
        assert await session.get(User, BOB) is not None

    async with db.sessions.begin() as session:  # nothing left: idempotent
        assert await delete_user_data(session, ALICE) == []
