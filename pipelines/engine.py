"""The engine: settings -> database, file store, model registry, pipeline cache, queue and worker.

Every front end (CLI, demo, bot) takes the same path for a job: :meth:`Engine.submit` checks the spec
(nothing is stored for bad input), resolves the user's adapters, stores the input images and queues
the job durably; the worker runs it on its thread when its fair turn comes (maybe batched with other
users' compatible jobs), stores the PNGs content-addressed with their webui parameters and marks the
job done — or failed with a sentence. :meth:`Engine.wait` (or :meth:`Engine.generate`, both at once)
returns the result; :meth:`Engine.events` streams position, progress and previews.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from PIL import Image

from models.adapters.inspect import asset_caps
from models.adapters.runtime import AdapterRuntime
from models.adapters.targets import ModelTarget, model_target, served_targets
from models.cache import PipelineCache, choose_device
from models.extras import PLAIN_UPSCALERS
from models.families import Family, family_info
from models.registry import ModelEntry
from pipelines.adapters import resolve_adapters
from pipelines.batching import batch_key, run_batch
from pipelines.events import (
    Cancelled,
    EventHub,
    Failed,
    Finished,
    GeneratedImage,
    JobEvent,
    JobResult,
    StoredPreview,
)
from pipelines.execution import UNEXPECTED, BatchExecutor, ProgressSink
from pipelines.hires import LATENT_UPSCALERS
from pipelines.inputs import JobInputs, PreparedInputs, prepare_inputs
from pipelines.jobs import LIMITS, JobKind, JobSpec, Limits, check_spec, resolve_seed
from pipelines.modes import ExtraCache, StepHook
from pipelines.parameters import webui_parameters
from pipelines.prompts import extract_networks, parse_attention, prompt_schedule
from pipelines.queue import JobQueue, QueueLimits, QueueStatus, Submitted
from pipelines.scheduling import BatchBudget
from pipelines.settings import Settings, build_extras, build_registry
from pipelines.worker import Worker, WorkerOptions
from storage import jobs as job_rows
from storage.db import Database, retry_locked
from storage.errors import GenerationError, InvalidRequestError, NotFoundError, echo
from storage.files import FileStore
from storage.tables import JobStatus

__all__ = [
    "UNEXPECTED",
    "Engine",
    "GeneratedImage",
    "JobInputs",
    "JobResult",
    "StoredPreview",
    "webui_parameters",
]

log = logging.getLogger(__name__)


def _check_prompt_language(spec: JobSpec) -> None:
    """Parse the prompts now, so a malformed one is refused before anything is stored."""
    for text in (spec.prompt, spec.negative_prompt):
        stripped, _ = extract_networks(text)
        parse_attention(stripped)
        prompt_schedule(stripped, spec.steps)


def _check_denoising_steps(spec: JobSpec, *, has_init: bool) -> None:
    """A denoising strength so low that no step would run is refused before anything is stored."""
    strength = {
        JobKind.img2img: spec.strength,
        JobKind.inpaint: spec.strength,
        JobKind.controlnet: spec.strength if has_init else 1.0,
        JobKind.erase: spec.erase_denoise or 1.0,
    }.get(spec.kind, 1.0)
    if int(spec.steps * strength) < 1:
        raise InvalidRequestError(
            f"Denoising strength {strength:g} with {spec.steps} steps runs no step at all; "
            "raise the strength or the steps."
        )


class Engine:
    """Owns every long-lived resource; use as ``async with Engine(settings) as engine``.

    Args:
        settings: Where data lives, models, limits.
        limits: Bounds every request is checked against.
        recover: At open, take over jobs left queued or running in the database (the process that
            serves the queue — the bot, ``dreamcord worker`` — does; a one-off CLI command does not).
        start_worker: Run jobs in this process (off: it only submits, e.g. ``generate --no-wait``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        limits: Limits = LIMITS,
        recover: bool = False,
        start_worker: bool = True,
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.recover = recover
        self.start_worker = start_worker
        self.db = Database(settings.resolved_database_url)
        self.files = FileStore(settings.files_dir)
        self.registry = build_registry(settings)
        device, dtype = choose_device(settings.device, settings.dtype)
        self.cache = PipelineCache(
            self.registry, device=device, dtype=dtype, budget_bytes=settings.pipeline_cache_mb * 2**20
        )
        self.extras = build_extras(settings)
        self.extra_cache = ExtraCache(self.extras)
        self.asset_caps = asset_caps(settings.asset_max_mb)
        self.adapters = AdapterRuntime(
            cache_bytes=settings.adapter_cache_mb * 2**20, max_bytes=self.asset_caps
        )
        self.hub = EventHub()
        self.queue = JobQueue(
            self.db,
            self.hub,
            limits=QueueLimits(
                per_user=settings.queue_per_user,
                per_guild=settings.queue_per_guild,
                total=settings.queue_max,
                max_attempts=settings.job_attempts,
                batch=BatchBudget(settings.batch_max_images, settings.batch_max_pixels),
            ),
            batch_key=batch_key,
        )
        self.worker = Worker(
            self.queue,
            self.db,
            self.hub,
            self._make_executor,
            WorkerOptions(
                job_timeout_s=settings.job_timeout_s,
                stuck_after_s=settings.worker_stuck_s,
                preview_every=settings.preview_every,
                poll_s=1.0 if recover else None,
            ),
        )

    def _make_executor(self, sink: ProgressSink) -> BatchExecutor:
        return BatchExecutor(
            self.cache, self.extra_cache, self.files, self.registry, self.adapters, sink, run_batch=run_batch
        )

    async def open(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.db.open()
        self.hub.bind(asyncio.get_running_loop())
        if self.recover:
            await self.queue.recover()
        if self.start_worker:
            self.worker.start()

    async def close(self) -> None:
        await self.worker.stop()
        self.cache.clear()  # the worker has stopped; also lets the collector have the models back
        await self.db.close()

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the path of one job ---------------------------------------------------------------------

    def prepare(self, spec: JobSpec, inputs: JobInputs | None = None) -> JobSpec:
        """Resolve defaults (model, size, seed, ControlNets, upscaler) and check everything.

        Raises before anything is stored; :meth:`prepare_job` also returns the normalised input files.
        """
        return self.prepare_job(spec, inputs).spec

    def prepare_job(self, spec: JobSpec, inputs: JobInputs | None = None) -> PreparedInputs:
        entry: ModelEntry = self.registry.require(spec.model)
        size = entry.default_size or (family_info(entry.family).default_size if entry.family else 512)
        prepared = prepare_inputs(replace(spec, model=entry.name), inputs or JobInputs(), size, self.limits)
        spec = prepared.spec
        spec = replace(spec, width=spec.width or size, height=spec.height or size)
        spec = check_spec(spec, self.limits)
        spec = self._resolve_extras(spec, entry.family or Family.sd15)
        _check_prompt_language(spec)
        _check_denoising_steps(spec, has_init="init" in prepared.files or spec.init_image is not None)
        for sha in (spec.init_image, spec.mask_image, *(u.image for u in spec.controls)):
            if sha is not None and not self.files.exists(sha):
                raise InvalidRequestError("An input image of this job is no longer stored; attach it again.")
        prepared.spec = replace(spec, seed=resolve_seed(spec.seed))
        return prepared

    def served_targets(self) -> list[ModelTarget]:
        """The shapes uploads are checked against (the default model's first): see ``served_targets``."""
        return served_targets(self.registry)

    def target_of(self, model: str | None) -> ModelTarget:
        """The shapes a job on ``model`` applies adapters to (``shapes-inpaint`` shares ``shapes``')."""
        return model_target(self.registry, model)

    async def resolve_adapters(self, spec: JobSpec) -> JobSpec:
        """Name the stored adapters the job's prompts and ``vae`` option use (checks access and fit)."""
        async with self.db.sessions() as session:
            return await resolve_adapters(session, spec, self.target_of(spec.model), self.limits)

    def _resolve_extras(self, spec: JobSpec, family: Family) -> JobSpec:
        """Name the ControlNets and upscaler the job will use, so the stored spec is complete."""
        if spec.controls:
            units = tuple(
                replace(
                    unit,
                    model=self.extras.require_controlnet(
                        unit.model, family=family, control_type=unit.type, model=spec.model or ""
                    ).name,
                )
                for unit in spec.controls
            )
            spec = replace(spec, controls=units)
        if spec.kind == JobKind.upscale:
            spec = replace(spec, upscaler=self._upscaler_name(spec.upscaler, latent_ok=False))
        if spec.hires_scale:
            spec = replace(spec, hires_upscaler=self._upscaler_name(spec.hires_upscaler, latent_ok=True))
        return spec

    def _upscaler_name(self, name: str | None, *, latent_ok: bool) -> str:
        """The canonical name of an upscaler: a plain resampler, a latent mode (hires fix) or a model."""
        if name is None:
            return self.extras.require_upscaler(None).name
        builtin: list[str] = [*PLAIN_UPSCALERS, *(LATENT_UPSCALERS if latent_ok else ())]
        for known in builtin:
            if known.lower() == name.strip().lower():
                return known
        if latent_ok and name.strip().lower().startswith("latent"):
            raise InvalidRequestError(
                f"There is no latent upscaler called {echo(name)!r}; "
                f"use one of {', '.join(LATENT_UPSCALERS)}."
            )
        return self.extras.require_upscaler(name).name

    def _store_inputs(self, prepared: PreparedInputs) -> tuple[JobSpec, list[str]]:
        """Store the normalised input images and point the spec at them; also the hashes this call wrote."""
        spec = prepared.spec
        files = {role: self.files.put_bytes(data) for role, data in prepared.files.items()}
        stored = {role: file.sha256 for role, file in files.items()}
        units = tuple(
            replace(unit, image=stored.get(f"control{i}", unit.image)) for i, unit in enumerate(spec.controls)
        )
        spec = replace(
            spec,
            init_image=stored.get("init", spec.init_image),
            mask_image=stored.get("mask", spec.mask_image),
            controls=units,
        )
        return spec, [file.sha256 for file in files.values() if file.created]

    async def submit(
        self, spec: JobSpec, inputs: JobInputs | None = None, *, on_step: StepHook | None = None
    ) -> tuple[Submitted, list[str]]:
        """Check, resolve and queue a job; returns where it stands and notes for the user.

        ``on_step`` (an in-process caller's) is called on the worker thread after every step.
        """
        prepared = self.prepare_job(spec, inputs)
        prepared.spec = await self.resolve_adapters(prepared.spec)
        self.queue.check_limits(prepared.spec)  # refuse before storing the input images
        spec, created = self._store_inputs(prepared)
        try:
            submitted = await self.queue.submit(spec)
        except BaseException:
            for sha256 in created:  # refused after all (a limit reached meanwhile, the database busy)
                self.files.delete(sha256)
            raise
        if on_step is not None:
            self.worker.on_step(submitted.job_id, on_step)
        return submitted, prepared.notes

    async def generate(
        self, spec: JobSpec, on_step: StepHook | None = None, inputs: JobInputs | None = None
    ) -> JobResult:
        """Queue one job, wait for its turn and its end, and return its stored images."""
        if not self.start_worker:
            raise RuntimeError("this engine runs no worker; submit() and let the worker process run it")
        submitted, notes = await self.submit(spec, inputs, on_step=on_step)
        # no await between submit's return and the subscription: the job cannot have ended unseen
        result = await self._wait_submitted(submitted.job_id)
        return replace(result, notes=notes)

    async def events(self, job_id: int, *, previews: bool = True) -> AsyncGenerator[JobEvent, None]:
        """The job's events (position, start, progress with previews) up to and including its last one.

        A job that already ended yields its final event at once.
        """
        queue = self.hub.subscribe(job_id, previews=previews)
        try:
            final = await self._final_from_db(job_id)
            if final is not None:
                yield final
                return
            async for event in _until_final(queue):
                yield event
        finally:
            self.hub.unsubscribe(job_id, queue)

    async def wait(self, job_id: int) -> JobResult:
        """The job's result once it is done; raises its error if it failed or was cancelled."""
        events = self.events(job_id, previews=False)
        try:
            return await _result(job_id, events)
        finally:
            await events.aclose()

    async def _wait_submitted(self, job_id: int) -> JobResult:
        """:meth:`wait` for a job this engine has just queued (no event can have been missed yet)."""
        queue = self.hub.subscribe(job_id, previews=False)
        try:
            return await _result(job_id, _until_final(queue))
        finally:
            self.hub.unsubscribe(job_id, queue)

    async def cancel(self, job_id: int, by_user: int | None, *, admin_guilds: Collection[int] = ()) -> bool:
        """Cancel a queued or running job (its owner, or an admin of its guild); False if it had ended."""
        return await self.queue.cancel(job_id, by_user, admin_guilds=admin_guilds)

    def status(self, job_id: int) -> QueueStatus | None:
        """Position and ETA of a queued job (running: no position); None once it has left the queue."""
        return self.queue.status(job_id)

    async def mark_delivered(self, *job_ids: int) -> list[int]:
        """Record that these jobs' outcomes reached their users (see ``storage.jobs.mark_delivered``)."""

        async def write() -> list[int]:
            async with self.db.sessions.begin() as session:
                return await job_rows.mark_delivered(session, job_ids)

        # A lock must not leave a delivered job owed (a restart would post it again).
        return await retry_locked(write, give_up_after_s=None, what="a delivery mark")

    def stored_parameters(self, sha256: str) -> str:
        """The webui parameters a stored output PNG carries ("" if it has none)."""
        return _parameters_of(self.files.path_for(sha256))

    async def _final_from_db(self, job_id: int) -> JobEvent | None:
        """The final event of a job that has already ended, rebuilt from its rows."""
        async with self.db.sessions() as session:
            job = await job_rows.get_job(session, job_id)
            if job is None:
                raise NotFoundError(f"There is no job {job_id}.")
            if not job.status.finished:
                return None
            rows = await job_rows.list_images(session, job_id)
        if job.status == JobStatus.DONE:
            images = [
                GeneratedImage(
                    r.index,
                    r.seed,
                    r.width,
                    r.height,
                    r.sha256,
                    self.files.path_for(r.sha256),
                    self.stored_parameters(r.sha256),
                )
                for r in rows
            ]
            spec = JobSpec.from_dict(job.spec)
            return Finished(job_id, JobResult(job_id, spec, images, job.seconds or 0.0))
        if job.status == JobStatus.FAILED:
            return Failed(job_id, job.error or UNEXPECTED)
        return Cancelled(job_id)


async def _until_final(queue: asyncio.Queue[JobEvent]) -> AsyncIterator[JobEvent]:
    while True:
        event = await queue.get()
        yield event
        if event.final:
            return


async def _result(job_id: int, events: AsyncIterator[JobEvent]) -> JobResult:
    """The result carried by the final event; raises a failure's or cancellation's error."""
    async for event in events:
        if isinstance(event, Finished):
            return event.result
        if isinstance(event, Failed):
            raise event.exception()
        if event.final:
            raise GenerationError(f"Job {job_id} was cancelled.")
    raise AssertionError("unreachable: the events end with a final event")


def _parameters_of(path: Path) -> str:
    try:
        with Image.open(path) as image:
            return str(getattr(image, "text", {}).get("parameters", ""))
    except OSError:
        return ""
