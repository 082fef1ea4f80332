"""The durable, fair, bounded job queue.

The database is the queue's durable copy, :class:`~pipelines.scheduling.FairScheduler` its in-memory
index. :meth:`JobQueue.submit` checks the limits, writes the job (status ``queued``) in one transaction
and only then indexes it and answers with its id and position. :meth:`JobQueue.recover` (at start) puts
jobs a crash left ``running`` back in the queue — or fails them after ``max_attempts`` tries — and loads
every queued job. The worker takes batches with :meth:`JobQueue.take`. One process runs the worker for
a database; other processes (the CLI) may submit and wait on their own queue. While another writer
holds the database's lock, a submit or cancel retries for ``QueueLimits.busy_wait_s`` and then refuses
with a sentence (storing nothing).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field

from pipelines.events import Cancelled, EventHub, Queued
from pipelines.jobs import JobKind, JobSpec
from pipelines.scheduling import BatchBudget, Entry, FairScheduler
from storage import jobs as job_rows
from storage.db import Database, retry_locked
from storage.errors import NotFoundError, QueueFullError, QuotaExceededError
from storage.tables import JobStatus

__all__ = [
    "INTERRUPTED_TOO_OFTEN",
    "JobQueue",
    "QueueLimits",
    "QueueStatus",
    "StepRate",
    "Submitted",
    "Taken",
    "affinity_of",
]

log = logging.getLogger(__name__)

INTERRUPTED_TOO_OFTEN = (
    "This job was interrupted {n} times (the bot restarted while it ran); it was given up — "
    "try it again, perhaps smaller."
)

BatchKeyFn = Callable[[JobSpec], Hashable | None]


@dataclass(frozen=True)
class QueueLimits:
    """Back-pressure: how much may wait or run at once."""

    per_user: int = 10  # queued + running jobs of one user
    per_guild: int = 100
    total: int = 1000  # queued jobs in all
    max_attempts: int = 3  # starts before a job interrupted by crashes is given up
    busy_wait_s: float = 10.0  # a submit or cancel retries this long while another writer locks the database
    batch: BatchBudget = field(default_factory=BatchBudget)


@dataclass(frozen=True)
class Submitted:
    job_id: int
    position: int
    eta_s: float


@dataclass(frozen=True)
class QueueStatus:
    """Where a job stands: queued (with position and ETA) or running."""

    job_id: int
    status: JobStatus
    position: int | None
    eta_s: float | None


@dataclass
class Taken:
    """A job handed to the worker, with the flag that cancels it."""

    entry: Entry
    spec: JobSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled_by: int | None = None


class StepRate:
    """Recent seconds per denoising step and megapixel-image, for ETAs (an exponential moving average)."""

    def __init__(self, initial: float = 0.5, alpha: float = 0.3) -> None:
        self.value = initial
        self.alpha = alpha
        self.measured = False

    @staticmethod
    def work(spec: JobSpec) -> float:
        """A job's size in step × megapixel-images (at least a little, for zero-step modes)."""
        width, height = spec.output_size if spec.kind == JobKind.upscale else (spec.width, spec.height)
        steps = spec.steps + (spec.hires_steps or spec.steps if spec.hires_scale else 0)
        return max(steps * spec.batch * width * height / 1e6, 1e-3)

    def estimate(self, spec: JobSpec) -> float:
        return self.work(spec) * self.value

    def observe(self, specs: Collection[JobSpec], seconds: float) -> None:
        """A batch of ``specs`` took ``seconds``."""
        work = sum(self.work(spec) for spec in specs)
        rate = seconds / work
        self.value = rate if not self.measured else (1 - self.alpha) * self.value + self.alpha * rate
        self.measured = True


def affinity_of(spec: JobSpec) -> Hashable:
    """What must be loaded for a job: its model, VAE and adapters with their weights."""
    adapters = tuple((a.kind, a.sha256, a.weight, a.te_weight, a.unet_weight) for a in spec.adapters)
    return (spec.model, spec.vae, adapters)


class JobQueue:
    """Submit, cancel and inspect jobs; the worker takes batches from it. Event loop only."""

    def __init__(
        self,
        db: Database,
        hub: EventHub,
        *,
        limits: QueueLimits | None = None,
        batch_key: BatchKeyFn = lambda spec: None,
    ) -> None:
        self.db = db
        self.hub = hub
        self.limits = limits or QueueLimits()
        self.batch_key = batch_key
        self.rate = StepRate()
        self.scheduler = FairScheduler(self.limits.batch)
        self.paused = False
        self._specs: dict[int, JobSpec] = {}
        self._seen: set[int] = set()  # every job this queue has indexed
        self._running: dict[int, Taken] = {}
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------------

    async def recover(self) -> tuple[list[int], list[int]]:
        """At start: requeue jobs a crash left running (or fail them), then index every queued job.

        Returns:
            The ids requeued and the ids given up.
        """
        reason = INTERRUPTED_TOO_OFTEN.format(n=self.limits.max_attempts)

        async def write() -> tuple[list[int], list[int]]:
            async with self.db.sessions.begin() as session:
                return await job_rows.recover_interrupted(
                    session, max_attempts=self.limits.max_attempts, reason=reason
                )

        requeued, failed = await retry_locked(write, give_up_after_s=self.limits.busy_wait_s, what="recovery")
        loaded = await self.sync()
        log.info(
            "queue recovered: %d queued job(s) (%d interrupted ones requeued, %d given up)",
            loaded,
            len(requeued),
            len(failed),
        )
        return requeued, failed

    async def sync(self) -> int:
        """Pick up what other processes did: jobs they queued, and cancels of jobs running here.

        Returns:
            How many queued jobs were new to this queue.
        """
        # Under the submit lock: a job this process is storing must not be indexed twice (here and by submit).
        async with self._lock:
            return await self._sync_locked()

    async def _sync_locked(self) -> int:
        async with self.db.sessions() as session:
            queued = await job_rows.list_queued(session, exclude=self._seen)
            cancelled = await job_rows.ids_with_status(session, list(self._running), JobStatus.CANCELLED)
        for job_id in cancelled:
            if job_id in self._running:
                self._running[job_id].cancel.set()
        queued = [job for job in queued if job.id not in self._seen]
        for job in queued:
            try:
                spec = JobSpec.from_dict(job.spec)
            except Exception:  # a row no release of ours can run any more: fail it, keep the rest
                log.exception("job %d has an unreadable spec", job.id)
                async with self.db.sessions.begin() as session:
                    await job_rows.mark_failed(
                        session, job.id, "This job could not be read back; submit it again."
                    )
                continue
            self._index(job.id, spec)
        if queued:
            self._wakeup.set()
        return len(queued)

    def pause(self) -> None:
        """Stop starting new jobs (running ones finish)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wakeup.set()

    # --- submitting and cancelling ---------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Submitted:
        """Store a complete, checked spec as a queued job; refuse politely past the limits."""
        async with self._lock:
            self.check_limits(spec)
            job_id = await retry_locked(
                lambda: self._store_job(spec), give_up_after_s=self.limits.busy_wait_s, what="a submit"
            )
            self._index(job_id, spec)
        self._wakeup.set()
        position = self.scheduler.position(job_id) or 1
        return Submitted(job_id, position, self._eta(job_id))

    async def _store_job(self, spec: JobSpec) -> int:
        async with self.db.sessions.begin() as session:
            job = await job_rows.create_job(
                session,
                kind=str(spec.kind),
                spec=spec.to_dict(),
                user_id=spec.user_id,
                guild_id=spec.guild_id,
                channel_id=spec.channel_id,
            )
            return job.id

    def check_limits(self, spec: JobSpec) -> None:
        """Raise the sentence :meth:`submit` would give for the queue's and the user's limits."""
        limits = self.limits
        if len(self.scheduler) >= limits.total:
            raise QueueFullError(
                f"The queue is full ({limits.total:,} jobs waiting); try again in a few minutes."
            )
        if spec.user_id is not None and self.scheduler.active_count(user=spec.user_id) >= limits.per_user:
            raise QuotaExceededError(
                f"You already have {limits.per_user} jobs waiting or running; "
                "wait for one to finish or cancel one."
            )
        if spec.guild_id is not None and self.scheduler.active_count(guild=spec.guild_id) >= limits.per_guild:
            raise QuotaExceededError(
                f"This server already has {limits.per_guild} jobs waiting or running; try again shortly."
            )

    def _index(self, job_id: int, spec: JobSpec) -> None:
        self._seen.add(job_id)
        self._specs[job_id] = spec
        self.scheduler.add(
            Entry(
                job_id=job_id,
                user=spec.user_id,
                guild=spec.guild_id,
                images=spec.batch,
                pixels=spec.batch * spec.width * spec.height,
                batch_key=self.batch_key(spec),
                affinity=affinity_of(spec),
                work=StepRate.work(spec),
            )
        )

    async def cancel(self, job_id: int, by_user: int | None, *, admin_guilds: Collection[int] = ()) -> bool:
        """Cancel a queued or running job; only its owner or an admin of its guild may.

        Args:
            by_user: Who asks (None: the operator, e.g. the CLI, who may cancel anything).
            admin_guilds: Guilds where ``by_user`` is an admin.

        Returns:
            True if it was cancelled now, False if it had already finished.

        Raises:
            NotFoundError: no such job, or one the user may not touch (the same answer, so ids leak nothing).
        """
        async with self.db.sessions() as session:
            job = await job_rows.get_job(session, job_id)
        allowed = job is not None and (
            by_user is None
            or job.user_id == by_user
            or (job.guild_id is not None and job.guild_id in admin_guilds)
        )
        if job is None or not allowed:
            raise NotFoundError(f"There is no job {job_id} that you can cancel.")
        if job.status.finished:
            return False
        try:  # the row first: a database locked too long refuses the cancel and changes nothing
            await retry_locked(
                lambda: self._mark_cancelled(job_id), give_up_after_s=self.limits.busy_wait_s, what="a cancel"
            )
        except ValueError:  # it finished meanwhile
            return False
        taken = self._running.get(job_id)  # no await since the commit: the worker has not seen it yet
        if taken is not None:
            taken.cancelled_by = by_user
            taken.cancel.set()  # the worker stops it within a step
        else:
            self.scheduler.remove(job_id)
            self._specs.pop(job_id, None)
        self.hub.publish(Cancelled(job_id, by_user))
        self._announce_positions()
        return True

    async def _mark_cancelled(self, job_id: int) -> None:
        async with self.db.sessions.begin() as session:
            await job_rows.mark_cancelled(session, job_id)

    # --- inspecting ------------------------------------------------------------------------------

    def status(self, job_id: int) -> QueueStatus | None:
        """A queued or running job's place; None if this queue does not hold it."""
        if job_id in self._running:
            return QueueStatus(job_id, JobStatus.RUNNING, None, None)
        position = self.scheduler.position(job_id)
        if position is None:
            return None
        return QueueStatus(job_id, JobStatus.QUEUED, position, self._eta(job_id))

    def jobs_of(self, user: int | None) -> list[QueueStatus]:
        """A user's queued and running jobs, running first, then by position."""
        running = [
            QueueStatus(t.entry.job_id, JobStatus.RUNNING, None, None)
            for t in self._running.values()
            if t.entry.user == user
        ]
        queued = [self.status(e.job_id) for e in self.scheduler.order() if e.user == user]
        return running + [s for s in queued if s is not None]

    def _eta(self, job_id: int) -> float:
        """Seconds until the job starts: what runs now (half done, on average) plus the work ahead."""
        running = sum(self.rate.estimate(t.spec) for t in self._running.values()) / 2
        return round(running + self.scheduler.work_ahead(job_id) * self.rate.value, 1)

    def _announce_positions(self) -> None:
        """Tell the watched queued jobs where they now stand."""
        for entry in self.scheduler.order():
            if self.hub.watched(entry.job_id):
                self.hub.publish(
                    Queued(entry.job_id, self.scheduler.position(entry.job_id) or 1, self._eta(entry.job_id))
                )

    # --- the worker's side -----------------------------------------------------------------------

    async def take(self, loaded: Hashable | None = None) -> list[Taken]:
        """Wait for the next batch (fair order, compatible batch-mates) and hand it over as running."""
        while True:
            if not self.paused:
                batch = self.scheduler.next_batch(loaded)
                if batch:
                    taken = [Taken(entry, self._specs.pop(entry.job_id)) for entry in batch]
                    self._running.update((t.entry.job_id, t) for t in taken)
                    self._announce_positions()
                    return taken
            self._wakeup.clear()
            await self._wakeup.wait()

    def done_with(self, job_id: int) -> None:
        """The worker has written the job's final state."""
        self._running.pop(job_id, None)
        self.scheduler.finish(job_id)

    def running(self) -> list[Taken]:
        return list(self._running.values())

    def requeue_taken(self, taken: Collection[Taken]) -> None:
        """Give taken jobs back to the in-memory queue (a clean stop interrupted them)."""
        for item in taken:
            self.done_with(item.entry.job_id)
            if not item.cancel.is_set():
                self._index(item.entry.job_id, item.spec)
        self._wakeup.set()
