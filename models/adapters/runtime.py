"""Apply a job's adapters to a loaded model on the worker thread, and put everything back after the job.

:class:`AdapterRuntime` owns what outlives one job: the files read and converted (kept by sha256 in an LRU
bounded by bytes, so alternating jobs re-read nothing) and one :class:`~models.adapters.lora.LoraSet` per
loaded model (LoRAs stay resident in PEFT layers and are only switched). :meth:`AdapterRuntime.applied`
is a context manager: on exit the model computes exactly what it did before (LoRAs disabled, embedding
tokens removed, the UNet's own attention processors and the model's own VAE back in every pipeline).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from models.adapters.base import AssetInfo
from models.adapters.embeddings import embedding_vectors, load_embeddings
from models.adapters.hypernetwork import Hypernetwork, apply_hypernetworks, load_hypernetwork
from models.adapters.inspect import DEFAULT_MAX_MB, FileContents, read_adapter_file
from models.adapters.lora import ActiveLora, LoraSet, inspect_lora
from models.adapters.targets import ModelTarget
from models.adapters.vae import load_vae
from models.cache import LoadedModel
from models.families import Family
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

__all__ = ["ActiveAdapter", "AdapterRuntime"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveAdapter:
    """One adapter of one job: the stored file and how strongly to apply it."""

    kind: AssetKind
    name: str
    sha256: str
    path: Path
    weight: float = 1.0
    te_weight: float | None = None
    unet_weight: float | None = None


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, torch.nn.Module):
        return sum(_nbytes(t) for t in (*value.parameters(), *value.buffers()))
    if isinstance(value, Hypernetwork):
        return sum(_nbytes(m) for pair in value.layers.values() for m in pair)
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _lora_info(contents: FileContents, target: ModelTarget) -> AssetInfo | None:
    # the live model's target: a file made for a model such as shapes is recognised on it
    return inspect_lora(contents.tensors or {}, contents.metadata, targets=(target,))


class AdapterRuntime:
    """Worker-thread state for adapters: converted files by sha256 and resident LoRAs per model."""

    def __init__(
        self, *, cache_bytes: int = 2 * 2**30, max_bytes: Mapping[AssetKind, int] | None = None
    ) -> None:
        self.cache_bytes = cache_bytes
        self.max_bytes = dict(max_bytes or {k: mb * 2**20 for k, mb in DEFAULT_MAX_MB.items()})
        self._items: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._lora_sets: dict[int, LoraSet] = {}
        self.reads = 0  # files read from disk (for tests and the benchmark)

    # --- the cache of converted files ------------------------------------------------------------

    def _cached(self, key: tuple[str, str], make: Callable[[], Any]) -> Any:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit[0]
        value = make()
        size = _nbytes(value)
        self._items[key] = (value, size)
        total = sum(s for _, s in self._items.values())
        while total > self.cache_bytes and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            total -= dropped
        return value

    def _read(self, adapter: ActiveAdapter) -> FileContents:
        def read() -> FileContents:
            self.reads += 1
            if not adapter.path.is_file():
                raise InvalidRequestError(
                    f"The file of {adapter.kind} {adapter.name} is no longer stored; upload it again."
                )
            return read_adapter_file(adapter.path, max_bytes=self.max_bytes[adapter.kind])

        contents: FileContents = self._cached((adapter.sha256, "file"), read)
        return contents

    # --- applying --------------------------------------------------------------------------------

    @contextmanager
    def applied(self, model: LoadedModel, adapters: Sequence[ActiveAdapter]) -> Iterator[LoadedModel]:
        """Apply ``adapters`` to ``model`` for the ``with`` block; restores everything on exit."""
        by_kind = {kind: [a for a in adapters if a.kind == kind] for kind in AssetKind}
        with ExitStack() as stack:
            for vae in by_kind[AssetKind.VAE][-1:]:
                stack.enter_context(self._vae(model, vae))
            if by_kind[AssetKind.LORA]:
                stack.enter_context(self._loras(model, by_kind[AssetKind.LORA]))
            if by_kind[AssetKind.EMBEDDING]:
                stack.enter_context(self._embeddings(model, by_kind[AssetKind.EMBEDDING]))
            if by_kind[AssetKind.HYPERNETWORK]:
                stack.enter_context(self._hypernetworks(model, by_kind[AssetKind.HYPERNETWORK]))
            yield model

    @contextmanager
    def _vae(self, model: LoadedModel, adapter: ActiveAdapter) -> Iterator[None]:
        base = model.base
        original = base.vae
        config = dict(original.config)

        def build() -> torch.nn.Module:
            contents = self._read(adapter)
            if contents.tensors is None:
                raise InvalidRequestError(f"The VAE {adapter.name} could not be read as weights.")
            vae: torch.nn.Module = load_vae(contents.tensors, config, dtype=original.dtype)
            return vae.to(original.device)

        vae = self._cached((adapter.sha256, f"vae:{model.entry.name}"), build)
        pipes = list(model.by_class.values())
        for pipe in pipes:
            pipe.vae = vae
        try:
            yield
        finally:
            # pipelines made from the base during the job took the job's VAE too
            for pipe in {id(p): p for p in [*pipes, *model.by_class.values()]}.values():
                pipe.vae = original

    def lora_set(self, model: LoadedModel) -> LoraSet:
        """The resident LoRAs of a loaded model (made on first use)."""
        lora_set = self._lora_sets.get(id(model.base))
        if lora_set is None:
            lora_set = LoraSet(model.base)
            self._lora_sets[id(model.base)] = lora_set
        return lora_set

    @contextmanager
    def _loras(self, model: LoadedModel, adapters: Sequence[ActiveAdapter]) -> Iterator[None]:
        lora_set = self.lora_set(model)
        active = []
        for adapter in adapters:
            contents = self._read(adapter)
            if contents.tensors is None:
                raise InvalidRequestError(f"The LoRA {adapter.name} could not be read as weights.")
            info = self._cached(
                (adapter.sha256, f"lora-info:{lora_set.target.key}"),
                partial(_lora_info, contents, lora_set.target),
            )
            if info is None:
                raise InvalidRequestError(f"The file of LoRA {adapter.name} is not a LoRA; upload it again.")
            active.append(
                ActiveLora(
                    key=adapter.sha256,
                    state_dict=contents.tensors,
                    info=info,
                    weight=adapter.weight,
                    te_weight=adapter.te_weight,
                    unet_weight=adapter.unet_weight,
                    metadata=contents.metadata,
                )
            )
        lora_set.activate(model.base, active)
        try:
            yield
        finally:
            lora_set.deactivate(model.base)

    @contextmanager
    def _embeddings(self, model: LoadedModel, adapters: Sequence[ActiveAdapter]) -> Iterator[None]:
        family = model.family
        vectors = {
            a.name: self._cached(
                (a.sha256, f"embedding:{family}"), partial(self._embedding_vectors, a, family)
            )
            for a in adapters
        }
        loaded = load_embeddings(model.base, family, vectors)
        model.embeddings = loaded
        try:
            yield
        finally:
            model.embeddings = {}
            loaded.restore()

    def _embedding_vectors(self, adapter: ActiveAdapter, family: Family) -> dict[str, torch.Tensor]:
        return embedding_vectors(self._read(adapter).obj, family)

    def _hypernetwork(self, adapter: ActiveAdapter, device: torch.device) -> Hypernetwork:
        return load_hypernetwork(self._read(adapter).obj, adapter.name).to(device)

    @contextmanager
    def _hypernetworks(self, model: LoadedModel, adapters: Sequence[ActiveAdapter]) -> Iterator[None]:
        unet = model.base.unet
        device = next(unet.parameters()).device
        pairs = []
        for adapter in adapters:
            network: Hypernetwork = self._cached(
                (adapter.sha256, f"hypernetwork:{device}"), partial(self._hypernetwork, adapter, device)
            )
            pairs.append((network, adapter.weight))
        with apply_hypernetworks(unet, pairs):
            yield
