"""Loaded pipelines, kept by model and evicted least-recently-used by a memory budget.

Call only from the worker thread: diffusers pipelines and schedulers are not thread-safe, so the
cache does no locking of its own. Pipelines for other tasks (img2img, inpaint, ...) of a loaded model
are made with ``from_pipe`` and share its components, so they cost no extra memory.

After each load the heap is frozen (``gc.freeze``): a loaded model is hundreds of thousands of long-lived
Python objects, and without this every full garbage collection walks them all, stalling the bot's event
loop for up to a second (measured in the load run). Evicting a model unfreezes first, so its cycles can
still be collected.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from models.families import Family, family_info
from models.registry import ModelEntry, ModelRegistry, SourceKind

__all__ = ["LoadedModel", "PipelineCache", "choose_device", "pipeline_bytes"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def choose_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda/fp16 when a GPU is present, else cpu/fp32; explicit settings win."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if dtype == "auto":
        return torch.device(device), (torch.float32 if device == "cpu" else torch.float16)
    return torch.device(device), _DTYPES[dtype]


def pipeline_bytes(pipe: DiffusionPipeline) -> int:
    """Bytes held by the pipeline's modules (parameters and buffers, each tensor once)."""
    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class LoadedModel:
    """A model's base pipeline plus the task pipelines made from it."""

    entry: ModelEntry
    base: DiffusionPipeline
    nbytes: int
    default_scheduler_config: dict[str, Any]
    by_class: dict[str, DiffusionPipeline] = field(default_factory=dict)
    #: Embeddings loaded for the running job: name -> the token strings it occupies in the tokenizer.
    embeddings: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def family(self) -> Family:
        """The entry's family; for hub models, read from the loaded pipeline."""
        if self.entry.family is not None:
            return self.entry.family
        return Family.sdxl if "XL" in type(self.base).__name__ else Family.sd15

    @property
    def base_class_name(self) -> str:
        """The text-to-image pipeline class of this model's family."""
        return family_info(self.family).txt2img_class

    def pipeline(self, class_name: str) -> DiffusionPipeline:
        """The pipeline of class ``class_name`` sharing this model's components."""
        pipe = self.by_class.get(class_name)
        if pipe is None:
            cls = getattr(diffusers, class_name)
            pipe = cls.from_pipe(self.base, dtype=self.base.dtype)  # else from_pipe casts to float32
            pipe.set_progress_bar_config(disable=True)
            self.by_class[class_name] = pipe
        return pipe


class PipelineCache:
    """An LRU of :class:`LoadedModel` within ``budget_bytes`` (the model in use is never evicted)."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        device: torch.device,
        dtype: torch.dtype,
        budget_bytes: int,
    ) -> None:
        self.registry = registry
        self.device = device
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, name: str | None) -> LoadedModel:
        entry = self.registry.require(name)
        key = entry.name.lower()
        loaded = self._loaded.get(key)
        if loaded is not None and loaded.entry == entry:
            self._loaded.move_to_end(key)
            self._evict(keep=key)  # the budget may have shrunk since
            return loaded
        pipe = self._load(entry)
        loaded = LoadedModel(
            entry=entry,
            base=pipe,
            nbytes=pipeline_bytes(pipe),
            default_scheduler_config=dict(pipe.scheduler.config),
        )
        loaded.by_class[type(pipe).__name__] = pipe
        self._loaded[key] = loaded
        self._evict(keep=key)
        _freeze_heap()
        return loaded

    def loaded_names(self) -> list[str]:
        return [m.entry.name for m in self._loaded.values()]

    def clear(self) -> None:
        if self._loaded:
            gc.unfreeze()  # let the dropped models' cycles be collected
        self._loaded.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _evict(self, keep: str) -> None:
        total = sum(m.nbytes for m in self._loaded.values())
        for key in list(self._loaded):
            if total <= self.budget_bytes:
                break
            if key == keep:
                continue
            gc.unfreeze()  # let the evicted model's cycles be collected
            total -= self._loaded.pop(key).nbytes
            log.info("evicted model %s from the pipeline cache", key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load(self, entry: ModelEntry) -> DiffusionPipeline:
        log.info("loading model %s (%s) on %s/%s", entry.name, entry.kind, self.device, self.dtype)
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipe: DiffusionPipeline
        if entry.built_on_demand:
            from models.tiny import ensure_tiny_models

            ensure_tiny_models(self.registry.builtin_dir)
        if entry.kind == SourceKind.single_file:
            from models.single_file import load_single_file

            pipe = load_single_file(entry.path, torch_dtype=self.dtype)
        else:
            pipe = DiffusionPipeline.from_pretrained(
                entry.location, dtype=self.dtype, local_files_only=entry.kind != SourceKind.hub
            )
        if self.device.type != "cpu":  # loading already put the weights on the CPU
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _freeze_heap() -> None:
    """Collect once, then move every surviving object out of the collector's reach (see the module doc)."""
    gc.collect()
    gc.freeze()
    log.debug("froze %d objects after a model load", gc.get_freeze_count())
