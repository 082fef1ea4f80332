"""The contract between the engine and the runners, one runner module per mode.

A runner is ``run(ctx: RunContext) -> RunOutput``; it runs on the worker thread (blocking, may mutate
pipelines) and reads everything it needs from the context: the complete spec, the model (loaded lazily,
so an upscale job loads no checkpoint), the stored input images by sha256, the ControlNet/upscaler
registry and a per-step hook. It returns PIL images plus the webui parameters only it knows.
"""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from models.cache import LoadedModel, PipelineCache
from models.extras import ExtraEntry, ExtraRegistry
from pipelines.jobs import JobKind, JobSpec
from storage.errors import GenerationError
from storage.files import FileStore

__all__ = [
    "RUNNERS",
    "AdapterHook",
    "ExtraCache",
    "RunContext",
    "RunOutput",
    "Runner",
    "StepHook",
    "latents_hook",
    "run_job",
    "runner_for",
]

log = logging.getLogger(__name__)

# Called after every denoising step with (steps done, steps in all); raising stops the run.
StepHook = Callable[[int, int], None]
# Called after every denoising step with (steps done, steps in all, the current latents), for previews.
LatentsHook = Callable[[int, int, Any], None]
#: The running job's :data:`LatentsHook`, set by the worker around a run on its own thread; the prompt
#: conditioning's step callback (which every diffusion mode installs) calls it.
latents_hook: ContextVar[LatentsHook | None] = ContextVar("latents_hook", default=None)
# Applies the job's adapters to a freshly got model for the rest of the run; exiting restores it.
AdapterHook = Callable[[LoadedModel], AbstractContextManager[object]]


class ExtraCache:
    """Loaded ControlNets and upscalers, kept by (kind, name); worker thread only, small LRU by count."""

    def __init__(self, registry: ExtraRegistry, *, keep: int = 4) -> None:
        self.registry = registry
        self.keep = keep
        self._loaded: dict[tuple[str, str, str], Any] = {}

    def get(self, entry: ExtraEntry, loader: Callable[[ExtraEntry], Any], variant: str = "") -> Any:
        """``loader(entry)``, cached; ``variant`` separates differently-loaded copies (device, dtype)."""
        key = (str(entry.kind), entry.location, variant)
        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)  # most recently used last
            return self._loaded[key]
        self.registry.ensure_built(entry)
        value = loader(entry)
        self._loaded[key] = value
        while len(self._loaded) > self.keep:
            self._loaded.pop(next(iter(self._loaded)))
        return value

    def clear(self) -> None:
        self._loaded.clear()


@dataclass
class RunContext:
    """What a runner may use. ``model()`` loads the job's checkpoint on first call.

    Every model a runner gets through :meth:`model` or :meth:`load` has the job's adapters (LoRAs,
    embeddings, hypernetworks, VAE) applied until :func:`run_job` returns, then restored.
    """

    spec: JobSpec
    cache: PipelineCache
    extras: ExtraCache
    files: FileStore
    on_step: StepHook | None = None
    adapters: AdapterHook | None = None
    _model: LoadedModel | None = field(default=None, repr=False)
    _applied: ExitStack = field(default_factory=ExitStack, repr=False)
    _adapted: set[int] = field(default_factory=set, repr=False)

    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = self.load(self.spec.model)
        return self._model

    def load(self, name: str | None) -> LoadedModel:
        """A model from the cache (the job's or another, e.g. its inpainting variant), adapters applied."""
        model = self.cache.get(name)
        if self.adapters is not None and id(model) not in self._adapted:
            self._applied.enter_context(self.adapters(model))
            self._adapted.add(id(model))
        return model

    def applied_adapters(self) -> ExitStack:
        """Enter around a run: the adapters applied to the models it loads are restored on exit."""
        return self._applied

    @property
    def loaded_model(self) -> LoadedModel | None:
        """The checkpoint if a runner loaded it (for the PNG info), else None."""
        return self._model

    def image(self, sha256: str | None, mode: str = "RGB") -> Image.Image:
        """A stored input image (the engine stored it as PNG after checking it)."""
        if sha256 is None:
            raise GenerationError("This job lost one of its input images; submit it again.")
        with Image.open(io.BytesIO(self.files.read_bytes(sha256))) as image:
            return image.convert(mode)

    def init_image(self) -> Image.Image:
        return self.image(self.spec.init_image)

    def mask_image(self) -> Image.Image:
        """The mask as ``L``: white (255) = repaint, at the init image's size."""
        return self.image(self.spec.mask_image, "L")

    def step(self, done: int, total: int) -> None:
        if self.on_step is not None:
            self.on_step(done, total)


@dataclass
class RunOutput:
    """A runner's images, what the PNG info should add, and previews (e.g. preprocessed control maps)."""

    images: list[Image.Image]
    parameters: dict[str, object] = field(default_factory=dict)
    previews: list[tuple[str, Image.Image]] = field(default_factory=list)


Runner = Callable[[RunContext], RunOutput]

#: mode -> "module:function" (imported on first use so light commands stay fast).
RUNNERS: dict[str, str] = {
    JobKind.txt2img: "pipelines.text_to_image:run",
    "hires": "pipelines.hires:run",
    JobKind.img2img: "pipelines.image_to_image:run",
    JobKind.inpaint: "pipelines.inpaint:run",
    JobKind.erase: "pipelines.erase:run",
    JobKind.controlnet: "pipelines.controlnet:run",
    JobKind.upscale: "pipelines.upscale:run",
}


def runner_for(spec: JobSpec) -> Runner:
    key = "hires" if spec.kind == JobKind.txt2img and spec.hires_scale else str(spec.kind)
    module_name, _, func_name = RUNNERS[key].partition(":")
    runner: Runner = getattr(importlib.import_module(module_name), func_name)
    return runner


def run_job(ctx: RunContext) -> RunOutput:
    """Run the job's mode; the output has exactly ``spec.batch`` images. Adapters are restored after."""
    with ctx._applied:
        output = runner_for(ctx.spec)(ctx)
    if len(output.images) != ctx.spec.batch:
        raise GenerationError(
            f"The {ctx.spec.kind} runner returned {len(output.images)} images instead of {ctx.spec.batch}."
        )
    return output
