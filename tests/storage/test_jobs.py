"""Jobs: the full round trip, state transitions, one-transaction completion, listing."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from storage.db import Database
from storage.errors import NotFoundError
from storage.jobs import (
    NewImage,
    count_jobs,
    create_job,
    get_job,
    list_images,
    list_jobs,
    mark_cancelled,
    mark_done,
    mark_failed,
    mark_running,
    requeue_running,
    require_job,
)
from storage.tables import Image, JobStatus
from storage.users import ensure_user

SPEC = {
    "prompt": "a lighthouse at dusk, 🌅",
    "negative": "",
    "size": [512, 768],
    "steps": 20,
    "cfg": 6.5,
    "loras": [{"name": "ink", "weight": 0.8}],
    "hires": None,
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _images(count: int, tag: str = "x") -> list[NewImage]:
    return [
        NewImage(index=i, seed=1000 + i, sha256=_sha(f"{tag}{i}"), width=512, height=768)
        for i in range(count)
    ]


async def _new_job(db: Database, **kwargs: object) -> int:
    async with db.sessions.begin() as session:
        job = await create_job(session, kind=str(kwargs.pop("kind", "txt2img")), spec=SPEC, **kwargs)  # type: ignore[arg-type]
        return job.id


async def test_round_trip(db: Database) -> None:
    before = datetime.now(UTC)
    async with db.sessions.begin() as session:
        await ensure_user(session, 111)
        job = await create_job(session, kind="txt2img", spec=SPEC, user_id=111, guild_id=222, channel_id=333)
        job_id = job.id
        assert job.status is JobStatus.QUEUED and job.attempts == 0

    async with db.sessions.begin() as session:
        running = await mark_running(session, job_id)
        assert running.status is JobStatus.RUNNING and running.attempts == 1
    async with db.sessions.begin() as session:
        await mark_done(session, job_id, _images(3), seconds=4.25)

    async with db.sessions() as session:  # a fresh session reads from the database
        job = await require_job(session, job_id)
        images = await list_images(session, job_id)
    assert job.status is JobStatus.DONE
    assert job.spec == SPEC
    assert (job.user_id, job.guild_id, job.channel_id, job.kind) == (111, 222, 333, "txt2img")
    assert job.seconds == 4.25 and job.error is None and job.attempts == 1
    for stamp in (job.created_at, job.started_at, job.finished_at):
        assert stamp is not None and stamp.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)
    assert job.created_at <= job.started_at <= job.finished_at  # type: ignore[operator]
    assert [(i.index, i.seed, i.sha256, i.width, i.height) for i in images] == [
        (0, 1000, _sha("x0"), 512, 768),
        (1, 1001, _sha("x1"), 512, 768),
        (2, 1002, _sha("x2"), 512, 768),
    ]


async def test_job_without_user(db: Database) -> None:
    job_id = await _new_job(db)
    async with db.sessions() as session:
        job = await get_job(session, job_id)
    assert job is not None and job.user_id is None


async def test_missing_job(db: Database) -> None:
    async with db.sessions() as session:
        assert await get_job(session, 42) is None
        with pytest.raises(NotFoundError) as info:
            await require_job(session, 42)
        assert str(info.value) == "There is no job 42."
        with pytest.raises(NotFoundError):
            await mark_running(session, 42)
        assert await list_images(session, 42) == []


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ((), "done"),  # queued cannot complete without running
        (("done",), "running"),
        (("done",), "done"),
        (("done",), "failed"),
        (("done",), "cancelled"),
        (("failed",), "done"),
        (("failed",), "cancelled"),
        (("cancelled",), "failed"),
        (("cancelled",), "running"),
        (("running",), "running"),
        (("running", "cancelled"), "done"),
    ],
)
async def test_illegal_transitions(db: Database, path: tuple[str, ...], bad: str) -> None:
    job_id = await _new_job(db)

    async def apply(step: str) -> None:
        async with db.sessions.begin() as session:
            if step == "running":
                await mark_running(session, job_id)
            elif step == "done":
                if "running" not in path:
                    await mark_running(session, job_id)
                await mark_done(session, job_id, _images(1), seconds=1.0)
            elif step == "failed":
                await mark_failed(session, job_id, "boom")
            else:
                await mark_cancelled(session, job_id)

    for step in path:
        await apply(step)
    async with db.sessions() as session:
        status_before = (await require_job(session, job_id)).status

    with pytest.raises(ValueError, match=f"job {job_id} is"):
        async with db.sessions.begin() as session:
            if bad == "running":
                await mark_running(session, job_id)
            elif bad == "done":
                await mark_done(session, job_id, _images(1, "again"), seconds=1.0)
            elif bad == "failed":
                await mark_failed(session, job_id, "again")
            else:
                await mark_cancelled(session, job_id)

    async with db.sessions() as session:
        job = await require_job(session, job_id)
        assert job.status == status_before
        assert len(await list_images(session, job_id)) == (1 if status_before is JobStatus.DONE else 0)


async def test_fail_and_cancel_from_queued_and_running(db: Database) -> None:
    ids = [await _new_job(db) for _ in range(4)]
    async with db.sessions.begin() as session:
        await mark_running(session, ids[1])
        await mark_running(session, ids[3])
        await mark_failed(session, ids[0], "The prompt is empty.")
        await mark_failed(session, ids[1], "Out of memory.")
        await mark_cancelled(session, ids[2])
        await mark_cancelled(session, ids[3])
    async with db.sessions() as session:
        jobs = [await require_job(session, i) for i in ids]
    failed, cancelled = JobStatus.FAILED, JobStatus.CANCELLED
    assert [j.status for j in jobs] == [failed, failed, cancelled, cancelled]
    assert [j.error for j in jobs] == ["The prompt is empty.", "Out of memory.", None, None]
    assert all(j.finished_at is not None for j in jobs)
    assert [j.started_at is not None for j in jobs] == [False, True, False, True]


async def test_mark_done_is_one_transaction(db: Database) -> None:
    """If inserting the images fails, the status change is rolled back with them."""
    job_id = await _new_job(db)
    async with db.sessions.begin() as session:
        await mark_running(session, job_id)
        # An image row the real completion will collide with (same job, same index).
        session.add(Image(job_id=job_id, index=1, seed=5, sha256=_sha("old"), width=8, height=8))

    with pytest.raises(IntegrityError):
        async with db.sessions.begin() as session:
            await mark_done(session, job_id, _images(2), seconds=2.0)

    async with db.sessions() as session:
        job = await require_job(session, job_id)
        images = await list_images(session, job_id)
    assert job.status is JobStatus.RUNNING and job.finished_at is None and job.seconds is None
    assert [(i.index, i.sha256) for i in images] == [(1, _sha("old"))]


async def test_only_one_worker_takes_a_job(file_db: Database) -> None:
    job_id = await _new_job(file_db)

    async def take() -> str:
        try:
            async with file_db.sessions.begin() as session:
                await mark_running(session, job_id)
                await asyncio.sleep(0.05)  # hold the write transaction while the other tries
            return "took"
        except ValueError:
            return "refused"

    results = await asyncio.gather(take(), take())
    assert sorted(results) == ["refused", "took"]
    async with file_db.sessions() as session:
        assert (await require_job(session, job_id)).attempts == 1


async def test_requeue_running_after_a_crash(db: Database) -> None:
    ids = [await _new_job(db) for _ in range(3)]
    async with db.sessions.begin() as session:
        await mark_running(session, ids[0])
        await mark_running(session, ids[2])
    async with db.sessions.begin() as session:
        assert await requeue_running(session) == [ids[0], ids[2]]
    async with db.sessions.begin() as session:
        assert await requeue_running(session) == []
        again = await mark_running(session, ids[0])
    assert again.attempts == 2 and again.status is JobStatus.RUNNING


async def test_list_and_count(db: Database) -> None:
    ids: dict[str, list[int]] = {"alice": [], "bob": [], "cli": []}
    users = {"alice": 1, "bob": 2, "cli": None}
    for round_ in range(3):
        for name, user in users.items():
            ids[name].append(await _new_job(db, user_id=user, kind=f"k{round_}"))
    async with db.sessions.begin() as session:
        await mark_running(session, ids["alice"][0])
        await mark_cancelled(session, ids["alice"][1])
        await mark_running(session, ids["bob"][2])

    async with db.sessions() as session:
        alice = await list_jobs(session, user_id=1)
        assert [j.id for j in alice] == sorted(ids["alice"], reverse=True)  # newest first
        assert [j.id for j in await list_jobs(session)] == sorted(sum(ids.values(), []), reverse=True)
        assert [j.id for j in await list_jobs(session, status=JobStatus.RUNNING)] == [
            ids["bob"][2],
            ids["alice"][0],
        ]
        active = await list_jobs(session, user_id=1, status=[JobStatus.QUEUED, JobStatus.RUNNING])
        assert [j.id for j in active] == [ids["alice"][2], ids["alice"][0]]
        assert [j.id for j in await list_jobs(session, status="cancelled")] == [ids["alice"][1]]  # type: ignore[arg-type]
        page = await list_jobs(session, limit=4, offset=2)
        assert [j.id for j in page] == sorted(sum(ids.values(), []), reverse=True)[2:6]

        assert await count_jobs(session) == 9
        assert await count_jobs(session, user_id=1) == 3
        assert await count_jobs(session, user_id=3) == 0
        assert await count_jobs(session, status=JobStatus.QUEUED) == 6
        assert await count_jobs(session, user_id=2, status=[JobStatus.RUNNING, JobStatus.DONE]) == 1
        with pytest.raises(ValueError):
            await list_jobs(session, limit=-1)


async def test_job_ids_are_never_reused(file_db: Database) -> None:
    from sqlalchemy import delete

    from storage.tables import Job

    first = await _new_job(file_db)
    async with file_db.sessions.begin() as session:
        await session.execute(delete(Job).where(Job.id == first))
    assert await _new_job(file_db) > first


@pytest.mark.parametrize(
    "kwargs",
    [
        {"index": -1},
        {"seed": -1},
        {"seed": 2**63},
        {"sha256": "A" * 64},
        {"sha256": "abc"},
        {"width": 0},
    ],
)
def test_new_image_validation(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"index": 0, "seed": 0, "sha256": "0" * 64, "width": 8, "height": 8}
    NewImage(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NewImage(**(fields | kwargs))  # type: ignore[arg-type]


async def test_mark_done_rejects_bad_arguments(db: Database) -> None:
    job_id = await _new_job(db)
    async with db.sessions.begin() as session:
        await mark_running(session, job_id)
        dup = [_images(1)[0], _images(1, "y")[0]]
        with pytest.raises(ValueError, match="distinct"):
            await mark_done(session, job_id, dup, seconds=1.0)
        with pytest.raises(ValueError):
            await mark_done(session, job_id, _images(1), seconds=-1.0)
    async with db.sessions() as session:
        assert (await require_job(session, job_id)).status is JobStatus.RUNNING


async def test_create_job_validates_kind(db: Database) -> None:
    async with db.sessions() as session:
        for kind in ("", "x" * 33):
            with pytest.raises(ValueError):
                await create_job(session, kind=kind, spec={})
