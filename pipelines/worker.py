"""The worker: takes fair batches from the queue, runs them on its own thread, writes the outcomes.

The event loop never computes: a batch runs on a dedicated thread (one per device) through
:class:`~pipelines.execution.BatchExecutor`, while the loop keeps serving Discord. The loop marks the
jobs running (overlapping the computation's start), and when the thread returns writes each job's one
final state — ``done`` (its PNGs are already in the file store), ``failed`` with a sentence, or
``cancelled`` — then publishes the outcome. While another writer holds the database's lock, these
writes are retried with a back-off: a finished job's result until the database takes it (it is never
lost), and the marks "running" the same way, so that a result always finds its row running.

A watchdog notices a run that stopped making progress (no step for ``stuck_after_s``): it fails the
jobs with a sentence (their users are not left waiting), flags them so the thread drops them at its
next step, and reports the worker as ``stuck`` until a step is made again. It does not start a second
thread beside the stuck one: two threads on the same pipelines would corrupt each other's runs, and a
hung GPU would hang the second thread too; the queue goes on when the thread comes back (or after a
restart, which recovers every queued job).
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import torch

from models.cache import LoadedModel
from pipelines.events import Cancelled, EventHub, Failed, Finished, JobResult, Progress, Started
from pipelines.execution import BatchExecutor, Outcome, WorkItem, unexpected
from pipelines.modes import StepHook
from pipelines.queue import JobQueue, Taken
from storage import jobs as job_rows
from storage.db import Database, DatabaseBusyError, retry_locked

__all__ = ["STUCK", "Worker", "WorkerOptions"]

log = logging.getLogger(__name__)

STUCK = "The worker stopped making progress on this job, so it was given up; try again, perhaps smaller."
STOP_WAIT_S = 5.0  # a stopping worker retries requeueing its jobs this long (a restart recovers them anyway)


@dataclass(frozen=True)
class WorkerOptions:
    job_timeout_s: float = 600.0
    stuck_after_s: float = 600.0  # no step for this long (a first load of a big checkpoint counts)
    progress_interval_s: float = 0.5  # at most one progress event per job this often (the last step always)
    preview_every: int = 5  # steps between previews (0: none)
    preview_side: int = 256
    poll_s: float | None = None  # serving a shared database: look for other processes' jobs this often


class _Sink:
    """The thread's progress reports, throttled and handed to the loop."""

    def __init__(self, hub: EventHub, options: WorkerOptions) -> None:
        self.hub = hub
        self.options = options
        self.heartbeat = time.monotonic()
        self.stuck = False  # set by the watchdog, cleared by the next step
        self.active: set[int] = set()  # the jobs the thread is running now
        self._last: dict[int, float] = {}
        self._started: dict[int, float] = {}  # job -> when the thread began it

    def begin(self, job_ids: list[int]) -> None:
        """The thread starts these jobs now (they may have waited for it)."""
        now = self.heartbeat = time.monotonic()
        self.active = set(job_ids)
        for job_id in job_ids:
            self._started[job_id] = now
            self._last.pop(job_id, None)

    def end(self, job_id: int) -> None:
        self._started.pop(job_id, None)
        self._last.pop(job_id, None)

    def _eta(self, job_id: int, done: int, total: int) -> float:
        began = self._started.get(job_id, time.monotonic())
        elapsed = time.monotonic() - began
        return round(elapsed / max(done, 1) * max(total - done, 0), 1)

    def step(self, job_id: int, done: int, total: int) -> None:
        now = self.heartbeat = time.monotonic()
        self.stuck = False
        if done < total and now - self._last.get(job_id, 0.0) < self.options.progress_interval_s:
            return
        self._last[job_id] = now
        self.hub.publish_threadsafe(Progress(job_id, done, total, self._eta(job_id, done, total)))

    def wants_preview(self, job_id: int, done: int, total: int) -> bool:
        every = self.options.preview_every
        return bool(every) and done % every == 0 and done < total and self.hub.wants_previews(job_id)

    def preview(self, job_id: int, done: int, total: int, latents: torch.Tensor, model: LoadedModel) -> None:
        from pipelines.previews import latents_to_preview, rgb_factors_for

        try:
            image = latents_to_preview(
                latents[:1], rgb_factors_for(model), max_side=self.options.preview_side
            )[0]
        except Exception:  # a preview is a nicety; never let it fail a job
            log.exception("preview of job %d failed", job_id)
            return
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self.hub.publish_threadsafe(
            Progress(job_id, done, total, self._eta(job_id, done, total), buffer.getvalue())
        )


class Worker:
    """Runs the queue's batches on one thread; ``start()`` it after the engine is open."""

    def __init__(
        self,
        queue: JobQueue,
        db: Database,
        hub: EventHub,
        make_executor: Callable[[_Sink], BatchExecutor],
        options: WorkerOptions | None = None,
    ) -> None:
        self.queue = queue
        self.db = db
        self.hub = hub
        self.options = options or WorkerOptions()
        self.sink = _Sink(hub, self.options)
        self.executor = make_executor(self.sink)
        self._thread = self._new_thread()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self._running: list[Taken] = []
        self._given_up = asyncio.Event()
        self._step_hooks: dict[int, StepHook] = {}

    def _new_thread(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")

    @property
    def thread(self) -> ThreadPoolExecutor:
        """The executor that owns the pipelines (run other pipeline work on it too)."""
        return self._thread

    @property
    def stuck(self) -> bool:
        """Whether the watchdog gave up on the running batch and no step has been made since."""
        return self.sink.stuck

    def on_step(self, job_id: int, hook: StepHook) -> None:
        """An in-process caller's own per-step hook for a job (called on the worker thread, every step)."""
        self._step_hooks[job_id] = hook

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._loop(), name="dreamcord-worker")
            self._watchdog = asyncio.create_task(self._watch(), name="dreamcord-watchdog")

    async def stop(self) -> None:
        """Stop cleanly: a running batch stops at its next step and its jobs go back to the queue."""
        self._stop.set()
        for task in (self._watchdog, self._task):
            if task is not None:
                task.cancel()
        for task in (self._task, self._watchdog):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._watchdog = None
        self._thread.shutdown(wait=True)

    # --- the loop --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stop.is_set():
            batch = await self.queue.take(self.executor.loaded)
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                await asyncio.shield(self._interrupted(batch))
                raise
            except Exception:  # the loop must survive anything one batch does
                ref = secrets.token_hex(3)
                ids = [t.entry.job_id for t in batch]
                log.exception("worker: batch %s failed outside its jobs (ref %s)", ids, ref)
                self._running = []
                try:
                    await self._write([Outcome(i, "failed", reason=unexpected(ref)) for i in ids], batch)
                except Exception:
                    log.exception("worker: could not fail the jobs %s", ids)

    async def _run(self, batch: list[Taken]) -> None:
        self._running = batch
        items = [
            WorkItem(
                t.entry.job_id,
                t.spec,
                t.cancel,
                self.options.job_timeout_s,
                self._step_hooks.get(t.entry.job_id),
                self._stop,
            )
            for t in batch
        ]
        for t in batch:
            self.hub.publish(Started(t.entry.job_id, len(batch)))
        self._given_up.clear()
        work: asyncio.Future[object] = asyncio.get_running_loop().run_in_executor(
            self._thread, self.executor.run, items
        )
        marking = asyncio.ensure_future(self._mark_running(batch))  # overlaps the computation
        given_up: asyncio.Future[object] = asyncio.ensure_future(self._given_up.wait())
        try:
            done, _ = await asyncio.wait({work, given_up}, return_when=asyncio.FIRST_COMPLETED)
            self._running = []  # off the thread: the watchdog has nothing to watch while the rows are written
            await marking  # the result needs its row running
        finally:
            given_up.cancel()
            marking.cancel()
        if work not in done:  # the watchdog failed these jobs; the thread's late result is dropped
            return
        outcomes = cast(list[Outcome], work.result())
        self.queue.rate.observe([t.spec for t in batch], max(o.seconds for o in outcomes))
        await self._write(outcomes, batch)

    async def _mark_running(self, batch: list[Taken]) -> None:
        async def write() -> None:
            async with self.db.sessions.begin() as session:
                for t in batch:
                    try:
                        await job_rows.mark_running(session, t.entry.job_id)
                    except ValueError:  # cancelled between being taken and now: the thread drops it
                        t.cancel.set()

        ids = [t.entry.job_id for t in batch]
        await retry_locked(write, give_up_after_s=None, what=f"marking jobs {ids} running")

    async def _write(self, outcomes: list[Outcome], batch: list[Taken]) -> None:
        """Each job's one final state, in the batch's (fair) order, then its event."""
        by_id = {t.entry.job_id: t for t in batch}
        for outcome in outcomes:
            taken = by_id[outcome.job_id]
            event = await self._finish(outcome, taken)
            self.queue.done_with(outcome.job_id)
            self.sink.end(outcome.job_id)
            self._step_hooks.pop(outcome.job_id, None)
            if event is not None:
                self.hub.publish(event)

    async def _finish(self, outcome: Outcome, taken: Taken) -> Finished | Failed | Cancelled | None:
        job_id = outcome.job_id
        if taken.cancel.is_set() or outcome.status == "cancelled":
            return None  # cancel() wrote the state and told the subscribers
        if outcome.status == "interrupted":
            await self._requeue([job_id])
            return None

        images = outcome.images

        async def write() -> None:
            async with self.db.sessions.begin() as session:
                if outcome.status == "done":
                    rows = [job_rows.NewImage(i.index, i.seed, i.sha256, i.width, i.height) for i in images]
                    await job_rows.mark_done(session, job_id, rows, outcome.seconds)
                else:
                    await job_rows.mark_failed(session, job_id, outcome.reason)

        try:  # never given up: the images are stored, and the user waits for them
            await retry_locked(write, give_up_after_s=None, what=f"job {job_id}'s result")
        except ValueError:  # cancelled while its last step ran: cancel() already answered
            log.info("job %d finished after it was cancelled; its outputs are not kept", job_id)
            return None
        if outcome.status == "done":
            result = JobResult(job_id, taken.spec, outcome.images, outcome.seconds, [], outcome.previews)
            return Finished(job_id, result)
        return Failed(job_id, outcome.reason, outcome.error)

    async def _interrupted(self, batch: list[Taken]) -> None:
        """A clean stop caught a batch mid-run: back to the queue, the attempt not counted."""
        ids = [t.entry.job_id for t in batch if not t.cancel.is_set()]
        if ids:
            await self._requeue(ids)
            log.info("worker stopping: requeued %s", ids)
        self.queue.requeue_taken(batch)
        self._running = []

    async def _requeue(self, ids: list[int]) -> None:
        """Running jobs back to queued (bounded: if the database stays locked, the next start does it)."""

        async def write() -> None:
            async with self.db.sessions.begin() as session:
                await job_rows.requeue(session, ids)

        try:
            await retry_locked(write, give_up_after_s=STOP_WAIT_S, what=f"requeueing jobs {ids}")
        except DatabaseBusyError:
            log.warning("jobs %s stay marked running; the next start requeues them", ids)

    # --- the watchdog ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        interval = max(0.05, min(5.0, self.options.stuck_after_s / 4))
        if self.options.poll_s is not None:
            interval = min(interval, self.options.poll_s)
        while True:
            await asyncio.sleep(interval)
            if self.options.poll_s is not None:
                try:
                    await self.queue.sync()
                except Exception:  # a busy database now and then must not stop the watchdog
                    log.exception("worker: could not look for new jobs")
            batch = self._running
            on_thread = batch and {t.entry.job_id for t in batch} <= self.sink.active
            if on_thread and time.monotonic() - self.sink.heartbeat > self.options.stuck_after_s:
                await self._give_up(batch)

    async def _give_up(self, batch: list[Taken]) -> None:
        ids = [t.entry.job_id for t in batch]
        log.error("worker stuck for %.0f s on jobs %s; giving them up", self.options.stuck_after_s, ids)
        self.sink.stuck = True
        for t in batch:
            t.cancel.set()  # if the thread ever comes back, it drops them at the next step
        await self._write([Outcome(i, "failed", reason=STUCK) for i in ids], [_untaken(t) for t in batch])
        self.sink.heartbeat = time.monotonic()
        self._given_up.set()


def _untaken(taken: Taken) -> Taken:
    """The same job with a fresh flag, so :meth:`Worker._finish` writes its failure."""
    return Taken(taken.entry, taken.spec)
