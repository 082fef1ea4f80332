"""The engine: settings -> database, file store, model registry, pipeline cache and the GPU thread.

``Engine.generate(spec)`` is the one path every front end (CLI, demo, bot) takes for a job: check the
spec (nothing is stored for bad input), record the job, run it on the worker thread, store the PNGs
content-addressed with their webui parameters, and mark the job done — or failed with a sentence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from models.cache import LoadedModel, PipelineCache, choose_device
from models.families import family_info
from models.registry import ModelEntry
from pipelines.jobs import LIMITS, JobSpec, Limits, check_spec, resolve_seed
from pipelines.pnginfo import format_parameters, png_bytes
from pipelines.settings import Settings, build_registry
from pipelines.text_to_image import StepHook, run_text_to_image
from storage import jobs as job_rows
from storage.db import Database
from storage.errors import BotError
from storage.files import FileStore

__all__ = ["Engine", "GeneratedImage", "JobResult", "webui_parameters"]

log = logging.getLogger(__name__)

UNEXPECTED = "Something broke on our side while generating; the error was logged."


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
class JobResult:
    job_id: int
    spec: JobSpec
    images: list[GeneratedImage]
    seconds: float


def webui_parameters(spec: JobSpec, seed: int, model_name: str, model_hash: str | None) -> str:
    """The A1111 ``parameters`` text for one image of ``spec``."""
    params: dict[str, object] = {
        "Steps": spec.steps,
        "Sampler": spec.sampler,
        "CFG scale": spec.cfg,
        "Seed": seed,
        "Size": f"{spec.width}x{spec.height}",
        "Model hash": model_hash[:10] if model_hash else None,
        "Model": model_name,
        "Clip skip": spec.clip_skip if spec.clip_skip > 1 else None,
    }
    return format_parameters(spec.prompt, spec.negative_prompt, params)


class Engine:
    """Owns every long-lived resource; use as ``async with Engine(settings) as engine``."""

    def __init__(self, settings: Settings, *, limits: Limits = LIMITS) -> None:
        self.settings = settings
        self.limits = limits
        self.db = Database(settings.resolved_database_url)
        self.files = FileStore(settings.files_dir)
        self.registry = build_registry(settings)
        device, dtype = choose_device(settings.device, settings.dtype)
        self.cache = PipelineCache(
            self.registry, device=device, dtype=dtype, budget_bytes=settings.pipeline_cache_mb * 2**20
        )
        self._executor: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.db.open()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        await self.db.close()

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the path of one job ---------------------------------------------------------------------

    def prepare(self, spec: JobSpec) -> JobSpec:
        """Resolve defaults (model, size, seed) and check everything; raises before anything is stored."""
        entry: ModelEntry = self.registry.require(spec.model)
        size = entry.default_size or (family_info(entry.family).default_size if entry.family else 512)
        spec = replace(
            spec,
            model=entry.name,
            width=spec.width or size,
            height=spec.height or size,
        )
        spec = check_spec(spec, self.limits)
        return replace(spec, seed=resolve_seed(spec.seed))

    async def generate(self, spec: JobSpec, on_step: StepHook | None = None) -> JobResult:
        """Run one job to the end and return its stored images."""
        spec = self.prepare(spec)
        started = time.perf_counter()
        async with self.db.sessions.begin() as session:
            job = await job_rows.create_job(
                session,
                kind=str(spec.kind),
                spec=spec.to_dict(),
                user_id=spec.user_id,
                guild_id=spec.guild_id,
                channel_id=spec.channel_id,
            )
            job_id = job.id
        work = asyncio.get_running_loop().run_in_executor(
            self._require_executor(), self._run_blocking, spec, on_step
        )
        try:
            # The status write overlaps the computation instead of delaying it; both are awaited.
            running, images = await asyncio.gather(self._mark_running(job_id), work, return_exceptions=True)
            for outcome in (images, running):
                if isinstance(outcome, BaseException):
                    raise outcome
            assert isinstance(images, list)
        except BotError as exc:
            await self._fail(job_id, str(exc))
            raise
        except Exception:
            log.exception("job %s failed", job_id)
            await self._fail(job_id, UNEXPECTED)
            raise
        seconds = time.perf_counter() - started
        async with self.db.sessions.begin() as session:
            await job_rows.mark_done(
                session,
                job_id,
                [job_rows.NewImage(i.index, i.seed, i.sha256, i.width, i.height) for i in images],
                seconds,
            )
        return JobResult(job_id=job_id, spec=spec, images=images, seconds=seconds)

    def _require_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise RuntimeError("Engine is not open; use `async with Engine(settings)`")
        return self._executor

    async def _mark_running(self, job_id: int) -> None:
        async with self.db.sessions.begin() as session:
            await job_rows.mark_running(session, job_id)

    async def _fail(self, job_id: int, reason: str) -> None:
        async with self.db.sessions.begin() as session:
            await job_rows.mark_failed(session, job_id, reason)

    def _run_blocking(self, spec: JobSpec, on_step: StepHook | None) -> list[GeneratedImage]:
        """On the worker thread: load (cached), generate, encode and store the PNGs."""
        model: LoadedModel = self.cache.get(spec.model)
        model_hash = self.registry.model_hash(model.entry)
        pil_images = run_text_to_image(model, spec, on_step)
        stored: list[GeneratedImage] = []
        for index, (image, seed) in enumerate(zip(pil_images, spec.seeds(), strict=True)):
            parameters = webui_parameters(spec, seed, model.entry.name, model_hash)
            saved = self.files.put_bytes(png_bytes(image, parameters))
            stored.append(
                GeneratedImage(index, seed, image.width, image.height, saved.sha256, saved.path, parameters)
            )
        return stored
