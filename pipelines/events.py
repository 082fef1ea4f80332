"""What a job produces and what happens to it on the way: results, events and the hub that fans them out.

The worker publishes :class:`JobEvent` s (queued position, start, steps with an ETA and a cheap preview,
the final outcome); the bot and the CLI subscribe per job. Events are delivered on the event loop; the
worker thread hands them over with :meth:`EventHub.publish_threadsafe`. A subscriber's queue is bounded:
when a slow reader falls behind, old progress events are dropped, never the final one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.jobs import JobSpec
from storage.errors import BotError

__all__ = [
    "Cancelled",
    "EventHub",
    "Failed",
    "Finished",
    "GeneratedImage",
    "JobEvent",
    "JobResult",
    "Progress",
    "Queued",
    "Started",
    "StoredPreview",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedImage:
    """One stored output image."""

    index: int
    seed: int
    width: int
    height: int
    sha256: str
    path: Path
    parameters: str


@dataclass(frozen=True)
class StoredPreview:
    """An intermediate image worth showing (a preprocessed control map), stored beside the outputs."""

    label: str
    sha256: str
    path: Path


@dataclass(frozen=True)
class JobResult:
    job_id: int
    spec: JobSpec
    images: list[GeneratedImage]
    seconds: float
    notes: list[str] = field(default_factory=list)  # what was changed about the inputs, for the user
    previews: list[StoredPreview] = field(default_factory=list)


@dataclass(frozen=True)
class JobEvent:
    job_id: int

    @property
    def final(self) -> bool:
        """Whether the job ends with this event."""
        return False


@dataclass(frozen=True)
class Queued(JobEvent):
    """Waiting: ``position`` 1 starts next; ``eta_s`` estimates the wait until it starts."""

    position: int
    eta_s: float


@dataclass(frozen=True)
class Started(JobEvent):
    """Running, in a pipeline call shared by ``batch_jobs`` jobs."""

    batch_jobs: int = 1


@dataclass(frozen=True)
class Progress(JobEvent):
    """``step`` of ``total`` done; ``preview`` is a small PNG of the image so far, when one was made."""

    step: int
    total: int
    eta_s: float
    preview: bytes | None = None


@dataclass(frozen=True)
class Finished(JobEvent):
    result: JobResult

    @property
    def final(self) -> bool:
        return True


@dataclass(frozen=True)
class Failed(JobEvent):
    """``reason`` is the sentence for the user; ``error`` the exception, for in-process callers."""

    reason: str
    error: BaseException | None = None

    @property
    def final(self) -> bool:
        return True

    def exception(self) -> BaseException:
        """What a waiting caller should raise."""
        if isinstance(self.error, BotError):
            return self.error
        from storage.errors import GenerationError

        return GenerationError(self.reason)


@dataclass(frozen=True)
class Cancelled(JobEvent):
    by_user: int | None = None

    @property
    def final(self) -> bool:
        return True


class EventHub:
    """Per-job subscriptions; publish from the event loop, or from any thread with ``publish_threadsafe``.

    Args:
        maxsize: How many events a subscriber's queue holds before old progress is dropped.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._subscribers: dict[int | None, list[asyncio.Queue[JobEvent]]] = defaultdict(list)
        self._preview_wanted: Counter[int | None] = Counter()
        self._without_previews: set[int] = set()  # ids of the queues that asked for none
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop events are delivered on (the engine's)."""
        self._loop = loop

    def subscribe(self, job_id: int | None, *, previews: bool = True) -> asyncio.Queue[JobEvent]:
        """A queue receiving ``job_id``'s events (None: every job's).

        Args:
            previews: Whether this subscriber wants preview images (they are only made when someone does).
        """
        queue: asyncio.Queue[JobEvent] = asyncio.Queue(self.maxsize)
        self._subscribers[job_id].append(queue)
        if previews:
            self._preview_wanted[job_id] += 1
        else:
            self._without_previews.add(id(queue))
        return queue

    def unsubscribe(self, job_id: int | None, queue: asyncio.Queue[JobEvent]) -> None:
        subscribers = self._subscribers.get(job_id, [])
        if queue in subscribers:
            subscribers.remove(queue)
            if id(queue) in self._without_previews:
                self._without_previews.discard(id(queue))
            else:
                self._preview_wanted[job_id] -= 1
                if self._preview_wanted[job_id] <= 0:
                    del self._preview_wanted[job_id]
        if not subscribers:
            self._subscribers.pop(job_id, None)

    def watched(self, job_id: int) -> bool:
        """Whether anyone listens to this job."""
        return bool(self._subscribers.get(job_id) or self._subscribers.get(None))

    def wants_previews(self, job_id: int) -> bool:
        """Whether a subscriber of this job (or of every job) wants preview images."""
        return self._preview_wanted[job_id] > 0 or self._preview_wanted[None] > 0

    def publish(self, event: JobEvent) -> None:
        """Deliver now (event loop only)."""
        for queue in [*self._subscribers.get(event.job_id, ()), *self._subscribers.get(None, ())]:
            _put(queue, event)

    def publish_threadsafe(self, event: JobEvent) -> None:
        """Deliver from another thread (the worker's)."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self.publish, event)


def _put(queue: asyncio.Queue[JobEvent], event: JobEvent) -> None:
    while True:
        try:
            queue.put_nowait(event)
            return
        except asyncio.QueueFull:
            dropped = queue.get_nowait()  # the oldest goes; a final event is never the oldest one left
            if dropped.final:
                queue.put_nowait(dropped)
                log.warning("event queue of job %s is full of final events; dropping %s", event.job_id, event)
                return
