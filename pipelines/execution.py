"""The worker thread's side of a batch: run it, store the PNGs, report progress, survive faults.

Everything here runs on the one thread that owns the pipelines (diffusers pipelines and schedulers are
not thread-safe). Inputs and outputs are plain data — specs, flags, stored files' hashes — so the same
:class:`BatchExecutor` could run in a worker process later, with the progress sink and the flags carried
over a pipe instead of shared memory.

Faults stay inside one job: a user-facing error fails that job with its sentence; a crash fails it with
a generic sentence and a reference id (the traceback is logged under it); a full disk while storing the
PNGs fails it with a sentence and removes what it had stored; CUDA out-of-memory on a shared batch
reruns its jobs one by one, and on a lone job of several images reruns it image by image (same seeds,
same pictures) before giving up with a sentence; a job past its time limit or cancelled stops at its
next step, and in a shared batch only its rows stop.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from PIL import Image

from models.adapters.runtime import ActiveAdapter, AdapterRuntime
from models.cache import LoadedModel, PipelineCache
from models.registry import ModelRegistry
from pipelines.events import GeneratedImage, StoredPreview
from pipelines.jobs import JobSpec
from pipelines.modes import AdapterHook, ExtraCache, RunContext, RunOutput, StepHook, latents_hook, run_job
from pipelines.parameters import webui_parameters
from pipelines.pnginfo import png_bytes
from pipelines.queue import affinity_of
from storage.errors import BotError, GenerationError
from storage.files import FileStore, StorageFullError
from storage.tables import AssetKind

__all__ = [
    "DISK_FULL",
    "OUT_OF_MEMORY",
    "UNEXPECTED",
    "BatchExecutor",
    "Outcome",
    "ProgressSink",
    "WorkItem",
    "is_out_of_memory",
    "unexpected",
]

log = logging.getLogger(__name__)

UNEXPECTED = "Something broke on our side while generating; the error was logged."
DISK_FULL = "The server ran out of disk space while saving your images; an admin needs to free some space."
OUT_OF_MEMORY = (
    "The GPU ran out of memory for this job; try a smaller size or fewer images, or turn hires fix down."
)


class JobStopped(Exception):
    """Raised inside a run when its job was cancelled or the worker is stopping (not a failure)."""


class JobTimedOut(GenerationError):
    pass


class ProgressSink(Protocol):
    """Where the thread reports; implemented by the worker (thread-safe, cheap, throttled)."""

    def begin(self, job_ids: list[int]) -> None: ...

    def step(self, job_id: int, done: int, total: int) -> None: ...

    def wants_preview(self, job_id: int, done: int, total: int) -> bool: ...

    def preview(
        self, job_id: int, done: int, total: int, latents: torch.Tensor, model: LoadedModel
    ) -> None: ...


@dataclass
class WorkItem:
    """One job of a batch. ``on_step`` is an in-process caller's own hook (every step, this thread)."""

    job_id: int
    spec: JobSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    timeout_s: float = 600.0
    on_step: StepHook | None = None
    stop: threading.Event | None = None  # the worker is stopping (the job goes back to the queue)


@dataclass
class Outcome:
    """How one job ended on the thread (the worker writes it to the database)."""

    job_id: int
    status: Literal["done", "failed", "cancelled", "interrupted"]
    images: list[GeneratedImage] = field(default_factory=list)
    previews: list[StoredPreview] = field(default_factory=list)
    reason: str = ""
    error: BaseException | None = None
    seconds: float = 0.0


def unexpected(ref: str) -> str:
    """The sentence for a crash, with the reference id its traceback is logged under."""
    return f"Something broke on our side while generating (ref {ref}); the error was logged."


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS) running out of memory, by type or by the message torch uses."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class _Control:
    """The per-step checks of one job: cancel, stop, deadline; then progress."""

    def __init__(self, item: WorkItem, sink: ProgressSink) -> None:
        self.item = item
        self.sink = sink
        self.deadline = time.monotonic() + item.timeout_s
        self.model: LoadedModel | None = None

    def halted(self) -> bool:
        stop = self.item.stop
        return self.item.cancel.is_set() or (stop is not None and stop.is_set())

    def dropped(self) -> bool:
        """Whether the job must stop now (cancelled, worker stopping, or past its time limit)."""
        return self.halted() or time.monotonic() > self.deadline

    def timed_out(self) -> JobTimedOut:
        return JobTimedOut(
            f"This job took longer than the {self.item.timeout_s:.0f}-second limit and was stopped; "
            "try fewer steps or a smaller size."
        )

    def check(self) -> None:
        if self.halted():
            raise JobStopped
        if time.monotonic() > self.deadline:
            raise self.timed_out()

    def on_step(self, done: int, total: int) -> None:
        self.check()
        if self.item.on_step is not None:
            self.item.on_step(done, total)
        self.sink.step(self.item.job_id, done, total)

    def on_latents(self, done: int, total: int, latents: torch.Tensor) -> None:
        if self.model is not None and self.sink.wants_preview(self.item.job_id, done, total):
            self.sink.preview(self.item.job_id, done, total, latents, self.model)


class BatchExecutor:
    """Runs batches on the worker thread with the engine's caches, store and adapter runtime."""

    def __init__(
        self,
        cache: PipelineCache,
        extras: ExtraCache,
        files: FileStore,
        registry: ModelRegistry,
        adapters: AdapterRuntime,
        sink: ProgressSink,
        *,
        run_batch: Callable[..., list[list[Image.Image] | None]] | None = None,
    ) -> None:
        self.cache = cache
        self.extras = extras
        self.files = files
        self.registry = registry
        self.adapters = adapters
        self.sink = sink
        self.run_batch = run_batch
        self.loaded: object = None  # affinity of what the last batch used

    def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        """Run one batch (one job, or compatible jobs sharing a pipeline call); never raises."""
        started = time.perf_counter()
        self.sink.begin([item.job_id for item in items])
        try:
            if len(items) == 1:
                outcomes = [self._solo(items[0])]
            else:
                outcomes = self._shared(items)
        except Exception as exc:  # a bug outside any one job's run: fail them all, keep serving
            ref = secrets.token_hex(3)
            log.exception("batch %s failed (ref %s)", [i.job_id for i in items], ref)
            outcomes = [Outcome(i.job_id, "failed", reason=unexpected(ref), error=exc) for i in items]
        seconds = time.perf_counter() - started
        return [replace(o, seconds=seconds) for o in outcomes]

    # --- one job ---------------------------------------------------------------------------------

    def _solo(self, item: WorkItem) -> Outcome:
        control = _Control(item, self.sink)
        try:
            ctx, output = self._generate(item.spec, control)
        except Exception as exc:
            if is_out_of_memory(exc) and item.spec.batch > 1:
                _free_memory()
                log.warning("job %d ran out of memory; retrying image by image", item.job_id)
                return self._image_by_image(item, control)
            return self._failure(item, exc)
        return self._done(item, ctx.loaded_model, output.images, output.parameters, output.previews)

    def _image_by_image(self, item: WorkItem, control: _Control) -> Outcome:
        """Rerun a several-image job one image at a time (each image keeps its seed, so its pixels)."""
        images: list[Image.Image] = []
        ctx, output = None, None
        for seed in item.spec.seeds():
            try:
                ctx, output = self._generate(replace(item.spec, seed=seed, batch=1), control)
            except Exception as exc:
                return self._failure(item, exc)
            images.extend(output.images)
        assert ctx is not None and output is not None
        return self._done(item, ctx.loaded_model, images, output.parameters)

    def _generate(self, spec: JobSpec, control: _Control) -> tuple[RunContext, RunOutput]:
        """Run the job's mode with the control's checks, progress and previews."""
        ctx = RunContext(spec, self.cache, self.extras, self.files, control.on_step, self._adapter_hook(spec))
        control.check()
        token = latents_hook.set(
            lambda done, total, latents: _preview_from(control, ctx, done, total, latents)
        )
        try:
            output = run_job(ctx)
        finally:
            latents_hook.reset(token)
        control.check()  # cancelled during the last step or the decode: it stays cancelled
        self.loaded = affinity_of(spec)
        return ctx, output

    def _failure(self, item: WorkItem, exc: Exception) -> Outcome:
        if isinstance(exc, JobStopped):
            return Outcome(item.job_id, "cancelled" if item.cancel.is_set() else "interrupted")
        if is_out_of_memory(exc):
            _free_memory()
            log.warning("job %d ran out of memory", item.job_id)
            return Outcome(item.job_id, "failed", reason=OUT_OF_MEMORY, error=GenerationError(OUT_OF_MEMORY))
        if isinstance(exc, StorageFullError):
            return Outcome(item.job_id, "failed", reason=DISK_FULL, error=GenerationError(DISK_FULL))
        if isinstance(exc, BotError):
            return Outcome(item.job_id, "failed", reason=str(exc), error=exc)
        ref = secrets.token_hex(3)
        log.exception("job %d failed (ref %s)", item.job_id, ref)
        return Outcome(item.job_id, "failed", reason=unexpected(ref), error=exc)

    # --- jobs sharing one call -------------------------------------------------------------------

    def _shared(self, items: Sequence[WorkItem]) -> list[Outcome]:
        if self.run_batch is None:
            return [self._solo(item) for item in items]
        from pipelines.batching import RowHooks

        controls = [_Control(item, self.sink) for item in items]
        ctx = RunContext(
            items[0].spec, self.cache, self.extras, self.files, None, self._adapter_hook(items[0].spec)
        )
        hooks = [
            RowHooks(
                on_step=_quiet_step(control),
                cancelled=control.dropped,
                on_latents=_row_preview(control),
            )
            for control in controls
        ]
        try:
            with ctx.applied_adapters():
                model = ctx.model()
                for control in controls:
                    control.model = model
                results = self.run_batch(model, [item.spec for item in items], hooks)
        except Exception as exc:
            if is_out_of_memory(exc):
                _free_memory()
                log.warning("a batch of %d jobs ran out of memory; running them one by one", len(items))
                return [self._solo(item) for item in items]
            raise
        self.loaded = affinity_of(items[0].spec)
        outcomes = []
        for item, control, images in zip(items, controls, results, strict=True):
            if control.dropped():
                reason = JobStopped() if control.halted() else control.timed_out()
                outcomes.append(self._failure(item, reason))
            elif images is None:
                raise RuntimeError(f"the batch runner dropped job {item.job_id}, which was not stopped")
            else:
                outcomes.append(self._done(item, ctx.loaded_model, images, {}))
        return outcomes

    # --- storing ---------------------------------------------------------------------------------

    def _done(
        self,
        item: WorkItem,
        model: LoadedModel | None,
        images: Sequence[Image.Image],
        extra: dict[str, object],
        previews: Sequence[tuple[str, Image.Image]] = (),
    ) -> Outcome:
        """Store a job's PNGs (and previews): all of them, or — on a full disk, say — none.

        Files this job wrote are removed again when a later one fails (bytes that were stored before
        stay: they belong to other jobs too).
        """
        created: list[str] = []
        try:
            stored = self._store(item.spec, model, images, extra, created)
            kept = [self._store_preview(label, image, created) for label, image in previews]
        except Exception as exc:
            for sha256 in created:
                self.files.delete(sha256)
            if isinstance(exc, StorageFullError):
                log.error("job %d: the disk is full, its %d image(s) were not kept", item.job_id, len(images))
            return self._failure(item, exc)
        return Outcome(item.job_id, "done", stored, kept)

    def _store(
        self,
        spec: JobSpec,
        model: LoadedModel | None,
        images: Sequence[Image.Image],
        extra: dict[str, object],
        created: list[str],
    ) -> list[GeneratedImage]:
        model_name = model.entry.name if model else None
        model_hash = self.registry.model_hash(model.entry) if model else None
        stored = []
        for index, (image, seed) in enumerate(zip(images, spec.seeds(), strict=True)):
            parameters = webui_parameters(spec, seed, model_name, model_hash, extra)
            saved = self.files.put_bytes(png_bytes(image, parameters))
            if saved.created:
                created.append(saved.sha256)
            stored.append(
                GeneratedImage(index, seed, image.width, image.height, saved.sha256, saved.path, parameters)
            )
        return stored

    def _store_preview(self, label: str, image: Image.Image, created: list[str]) -> StoredPreview:
        saved = self.files.put_bytes(png_bytes(image, ""))
        if saved.created:
            created.append(saved.sha256)
        return StoredPreview(label, saved.sha256, saved.path)

    def _adapter_hook(self, spec: JobSpec) -> AdapterHook | None:
        """What applies the job's adapters to each model it loads (None when it uses none)."""
        if not spec.adapters:
            return None
        active = [
            ActiveAdapter(
                kind=AssetKind(ref.kind),
                name=ref.name,
                sha256=ref.sha256,
                path=self.files.path_for(ref.sha256),
                weight=ref.weight,
                te_weight=ref.weight if ref.te_weight is None else ref.te_weight,
                unet_weight=ref.weight if ref.unet_weight is None else ref.unet_weight,
            )
            for ref in spec.adapters
        ]
        return lambda model: self.adapters.applied(model, active)


def _quiet_step(control: _Control) -> Callable[[int, int], None]:
    """A batch row's step hook: never raises (the batch runner drops halted rows instead)."""

    def on_step(done: int, total: int) -> None:
        if control.item.on_step is not None:
            control.item.on_step(done, total)
        control.sink.step(control.item.job_id, done, total)

    return on_step


def _row_preview(control: _Control) -> Callable[[int, torch.Tensor], None]:
    def on_latents(done: int, latents: torch.Tensor) -> None:
        control.on_latents(done, int(control.item.spec.steps), latents)

    return on_latents


def _preview_from(control: _Control, ctx: RunContext, done: int, total: int, latents: Any) -> None:
    control.model = ctx.loaded_model
    control.on_latents(done, total, latents)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
