"""Jobs and their images: create, move through the states, read back.

Transaction convention (the same in every ``storage`` module): functions take an
:class:`~sqlalchemy.ext.asyncio.AsyncSession` first, ``flush()`` their changes and never commit;
the caller owns the transaction::

    async with db.sessions.begin() as session:   # commits on success, rolls back on error
        job = await create_job(session, kind="txt2img", spec=spec.model_dump(mode="json"))

States: ``queued -> running -> done | failed | cancelled``; a queued job may also be failed or
cancelled directly, and :func:`requeue_running` puts jobs a crash left running back in the queue.
Apart from its state, a job that came from Discord (``channel_id`` set) is owed one message with its
outcome: :func:`mark_delivered` records that it was posted, :func:`list_undelivered` finds those still owed.
A job finishes exactly once: finishing a finished job (or completing one that never ran) raises
``ValueError``, a bug in the caller, not a user error. Each transition is one conditional
``UPDATE ... WHERE status IN (...)``, so two workers cannot both take or finish the same job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.errors import NotFoundError
from storage.tables import Image, Job, JobStatus, utcnow

__all__ = [
    "NewImage",
    "count_jobs",
    "create_job",
    "get_job",
    "list_images",
    "list_jobs",
    "list_undelivered",
    "mark_cancelled",
    "mark_delivered",
    "mark_done",
    "mark_failed",
    "mark_running",
    "require_job",
    "ids_with_status",
    "list_queued",
    "recover_interrupted",
    "requeue",
    "requeue_running",
]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_SEED = 2**63 - 1
_KIND_LENGTH = 32
_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True, slots=True)
class NewImage:
    """One finished image of a job, as :func:`mark_done` records it (the PNG is in the file store)."""

    index: int
    seed: int
    sha256: str
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"image index must be >= 0, got {self.index}")
        if not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")


async def create_job(
    session: AsyncSession,
    *,
    kind: str,
    spec: dict[str, Any],
    user_id: int | None = None,
    guild_id: int | None = None,
    channel_id: int | None = None,
) -> Job:
    """Add a queued job and flush it (so ``job.id`` is set).

    Args:
        kind: What the job does (``"txt2img"``, ...), at most 32 characters.
        spec: The request as JSON-ready data; stored as given.
        user_id: The Discord user, or None for jobs without one (the CLI).
    """
    if not kind or len(kind) > _KIND_LENGTH:
        raise ValueError(f"job kind must be 1..{_KIND_LENGTH} characters, got {kind!r}")
    job = Job(
        kind=kind,
        spec=dict(spec),
        user_id=user_id,
        guild_id=guild_id,
        channel_id=channel_id,
        status=JobStatus.QUEUED,
        attempts=0,
    )
    session.add(job)
    await session.flush()
    log.debug("created job %d (%s)", job.id, kind)
    return job


async def get_job(session: AsyncSession, job_id: int) -> Job | None:
    """The job, or None."""
    return await session.get(Job, job_id)


async def require_job(session: AsyncSession, job_id: int) -> Job:
    """The job; raises :class:`NotFoundError` if there is none."""
    job = await session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"There is no job {job_id}.")
    return job


async def _transition(
    session: AsyncSession,
    job_id: int,
    allowed: Collection[JobStatus],
    target: JobStatus,
    **values: Any,
) -> Job:
    """Move a job to ``target`` if its status is one of ``allowed``; return it reloaded."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(list(allowed)))
        .values(status=target, **values)
        .returning(Job)  # one round trip on the hot path; the job comes back updated
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    job = (await session.scalars(stmt)).one_or_none()
    if job is None:
        current = await session.get(Job, job_id, populate_existing=True)
        if current is None:
            raise NotFoundError(f"There is no job {job_id}.")
        raise ValueError(f"job {job_id} is {current.status.value}; it cannot become {target.value}")
    log.debug("job %d is %s", job_id, target.value)
    return job


async def mark_running(session: AsyncSession, job_id: int) -> Job:
    """Take a queued job: status running, ``attempts += 1``, ``started_at`` now."""
    return await _transition(
        session,
        job_id,
        (JobStatus.QUEUED,),
        JobStatus.RUNNING,
        attempts=Job.attempts + 1,
        started_at=utcnow(),
    )


async def mark_done(session: AsyncSession, job_id: int, images: Sequence[NewImage], seconds: float) -> Job:
    """Finish a running job with its images, in the caller's transaction (both or neither).

    Args:
        images: The outputs; their indices must be distinct.
        seconds: How long generation took.
    """
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    indices = [image.index for image in images]
    if len(set(indices)) != len(indices):
        raise ValueError(f"image indices must be distinct, got {indices}")
    job = await _transition(
        session,
        job_id,
        (JobStatus.RUNNING,),
        JobStatus.DONE,
        finished_at=utcnow(),
        seconds=float(seconds),
        error=None,
    )
    session.add_all(
        Image(
            job_id=job_id,
            index=image.index,
            seed=image.seed,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
        )
        for image in images
    )
    await session.flush()
    return job


async def mark_failed(session: AsyncSession, job_id: int, error: str) -> Job:
    """Fail a queued or running job, keeping ``error`` (a message for the user or the log)."""
    return await _transition(
        session, job_id, _UNFINISHED, JobStatus.FAILED, finished_at=utcnow(), error=error
    )


async def mark_cancelled(session: AsyncSession, job_id: int) -> Job:
    """Cancel a queued or running job."""
    return await _transition(session, job_id, _UNFINISHED, JobStatus.CANCELLED, finished_at=utcnow())


async def requeue_running(session: AsyncSession) -> list[int]:
    """Put every running job back in the queue (at startup, after a crash); returns their ids."""
    stmt = (
        update(Job)
        .where(Job.status == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, started_at=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    ids = sorted((await session.execute(stmt)).scalars().all())
    if ids:
        log.info("requeued %d interrupted job(s): %s", len(ids), ids)
    return ids


async def recover_interrupted(
    session: AsyncSession, *, max_attempts: int, reason: str
) -> tuple[list[int], list[int]]:
    """At startup: jobs a crash left running go back to the queue, or fail once tried ``max_attempts`` times.

    Returns:
        The ids requeued and the ids failed (with ``reason`` as their error).
    """
    failed_stmt = (
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.attempts >= max_attempts)
        .values(status=JobStatus.FAILED, finished_at=utcnow(), error=reason)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    failed = sorted((await session.execute(failed_stmt)).scalars().all())
    requeued = await requeue_running(session)
    if failed:
        log.warning("failed %d job(s) interrupted %d times: %s", len(failed), max_attempts, failed)
    return requeued, failed


async def requeue(
    session: AsyncSession, job_ids: Collection[int], *, refund_attempt: bool = True
) -> list[int]:
    """Put running jobs back in the queue (a clean shutdown interrupted them); returns those requeued.

    Args:
        refund_attempt: Undo the attempt their start counted (the interruption was not their fault).
    """
    if not job_ids:
        return []
    values: dict[str, Any] = {"status": JobStatus.QUEUED, "started_at": None}
    if refund_attempt:
        values["attempts"] = case((Job.attempts > 0, Job.attempts - 1), else_=0)
    stmt = (
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.RUNNING)
        .values(**values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return sorted((await session.execute(stmt)).scalars().all())


async def list_queued(session: AsyncSession, *, exclude: Collection[int] = ()) -> list[Job]:
    """Every queued job but those in ``exclude``, oldest first (what a worker loads into its queue)."""
    ids = (await session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED).order_by(Job.id))).all()
    wanted = [job_id for job_id in ids if job_id not in exclude]
    jobs: list[Job] = []
    for start in range(0, len(wanted), 500):  # keep each IN (...) well under SQLite's variable limit
        stmt = select(Job).where(Job.id.in_(wanted[start : start + 500])).order_by(Job.id)
        jobs.extend((await session.scalars(stmt)).all())
    return jobs


async def ids_with_status(session: AsyncSession, job_ids: Collection[int], status: JobStatus) -> list[int]:
    """Which of ``job_ids`` have ``status`` now."""
    if not job_ids:
        return []
    stmt = select(Job.id).where(Job.id.in_(list(job_ids)), Job.status == status)
    return sorted((await session.scalars(stmt)).all())


async def list_images(session: AsyncSession, job_id: int) -> list[Image]:
    """The images of a job, by index (empty for an unknown job)."""
    stmt = select(Image).where(Image.job_id == job_id).order_by(Image.index)
    return list((await session.scalars(stmt)).all())


def _filters(
    user_id: int | None, status: JobStatus | Iterable[JobStatus] | None
) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if user_id is not None:
        filters.append(Job.user_id == user_id)
    if isinstance(status, str):  # a JobStatus is a str, and so iterable: check it first
        filters.append(Job.status == JobStatus(status))
    elif status is not None:
        filters.append(Job.status.in_([JobStatus(s) for s in status]))
    return filters


async def list_jobs(
    session: AsyncSession,
    *,
    user_id: int | None = None,
    status: JobStatus | Iterable[JobStatus] | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Job]:
    """Jobs, newest first, optionally of one user and with one status (or any of several)."""
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
    stmt = select(Job).where(*_filters(user_id, status)).order_by(Job.id.desc()).limit(limit).offset(offset)
    return list((await session.scalars(stmt)).all())


async def count_jobs(
    session: AsyncSession,
    *,
    user_id: int | None = None,
    status: JobStatus | Iterable[JobStatus] | None = None,
) -> int:
    """How many jobs :func:`list_jobs` would find without a limit."""
    stmt = select(func.count()).select_from(Job).where(*_filters(user_id, status))
    return int((await session.scalar(stmt)) or 0)


async def mark_delivered(session: AsyncSession, job_ids: Collection[int]) -> list[int]:
    """Record that the outcome of these jobs reached Discord (or will never be posted); returns those
    newly marked (a job already marked keeps its first time)."""
    if not job_ids:
        return []
    stmt = (
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.delivered_at.is_(None))
        .values(delivered_at=utcnow())
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return sorted((await session.execute(stmt)).scalars().all())


async def list_undelivered(session: AsyncSession, *, created_before: datetime) -> list[Job]:
    """Jobs from Discord (``channel_id`` set) created before ``created_before`` whose outcome was never
    marked delivered, oldest first: what a restarted bot still owes its users."""
    stmt = (
        select(Job)
        .where(Job.channel_id.is_not(None), Job.delivered_at.is_(None), Job.created_at < created_before)
        .order_by(Job.id)
    )
    return list((await session.scalars(stmt)).all())
