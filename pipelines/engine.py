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
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from models.adapters.inspect import asset_caps
from models.adapters.runtime import ActiveAdapter, AdapterRuntime
from models.adapters.targets import ModelTarget, model_target, served_targets
from models.cache import PipelineCache, choose_device
from models.extras import PLAIN_UPSCALERS
from models.families import Family, family_info
from models.registry import ModelEntry
from pipelines.adapters import resolve_adapters
from pipelines.hires import LATENT_UPSCALERS
from pipelines.inputs import JobInputs, PreparedInputs, prepare_inputs
from pipelines.jobs import LIMITS, JobKind, JobSpec, Limits, check_spec, resolve_seed
from pipelines.modes import AdapterHook, ExtraCache, RunContext, StepHook, run_job
from pipelines.parameters import webui_parameters
from pipelines.pnginfo import png_bytes
from pipelines.prompts import extract_networks, parse_attention, prompt_schedule
from pipelines.settings import Settings, build_extras, build_registry
from storage import jobs as job_rows
from storage.db import Database
from storage.errors import BotError, InvalidRequestError
from storage.files import FileStore
from storage.tables import AssetKind

__all__ = ["Engine", "GeneratedImage", "JobInputs", "JobResult", "StoredPreview", "webui_parameters"]

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
class _Outputs:
    images: list[GeneratedImage]
    previews: list[StoredPreview]


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
        self.extras = build_extras(settings)
        self.extra_cache = ExtraCache(self.extras)
        self.asset_caps = asset_caps(settings.asset_max_mb)
        self.adapters = AdapterRuntime(
            cache_bytes=settings.adapter_cache_mb * 2**20, max_bytes=self.asset_caps
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
                f"There is no latent upscaler called {name!r}; use one of {', '.join(LATENT_UPSCALERS)}."
            )
        return self.extras.require_upscaler(name).name

    def _store_inputs(self, prepared: PreparedInputs) -> JobSpec:
        """Store the normalised input images and point the spec at them."""
        spec = prepared.spec
        stored = {role: self.files.put_bytes(data).sha256 for role, data in prepared.files.items()}
        units = tuple(
            replace(unit, image=stored.get(f"control{i}", unit.image)) for i, unit in enumerate(spec.controls)
        )
        return replace(
            spec,
            init_image=stored.get("init", spec.init_image),
            mask_image=stored.get("mask", spec.mask_image),
            controls=units,
        )

    async def generate(
        self, spec: JobSpec, on_step: StepHook | None = None, inputs: JobInputs | None = None
    ) -> JobResult:
        """Run one job to the end and return its stored images."""
        prepared = self.prepare_job(spec, inputs)
        prepared.spec = await self.resolve_adapters(prepared.spec)
        spec = self._store_inputs(prepared)
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
            running, outputs = await asyncio.gather(self._mark_running(job_id), work, return_exceptions=True)
            for outcome in (outputs, running):
                if isinstance(outcome, BaseException):
                    raise outcome
            assert isinstance(outputs, _Outputs)
            images = outputs.images
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
        return JobResult(job_id, spec, images, seconds, prepared.notes, outputs.previews)

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

    def _run_blocking(self, spec: JobSpec, on_step: StepHook | None) -> _Outputs:
        """On the worker thread: load (cached), run the mode, encode and store the PNGs."""
        ctx = RunContext(spec, self.cache, self.extra_cache, self.files, on_step, self._adapter_hook(spec))
        output = run_job(ctx)
        loaded = ctx.loaded_model
        model_name = loaded.entry.name if loaded else None
        model_hash = self.registry.model_hash(loaded.entry) if loaded else None
        stored: list[GeneratedImage] = []
        for index, (image, seed) in enumerate(zip(output.images, spec.seeds(), strict=True)):
            parameters = webui_parameters(spec, seed, model_name, model_hash, output.parameters)
            saved = self.files.put_bytes(png_bytes(image, parameters))
            stored.append(
                GeneratedImage(index, seed, image.width, image.height, saved.sha256, saved.path, parameters)
            )
        previews = []
        for label, image in output.previews:
            saved = self.files.put_bytes(png_bytes(image, ""))
            previews.append(StoredPreview(label, saved.sha256, saved.path))
        return _Outputs(stored, previews)
