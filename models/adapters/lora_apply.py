"""Apply LoRAs to a pipeline for one job and put it back exactly as it was afterwards.

Every layout is first converted to one form: per layer, the diffusers module it adapts and either a LoRA pair
(alpha/rank folded into the up weight) or factors whose delta weight is computed here (LyCORIS LoKr and LoHa).
LoRA pairs go through diffusers' PEFT adapters: loaded once per file (``load_lora_weights``), switched per job
(``set_adapters`` with per-part weights), switched off after (``disable_lora``), which leaves every layer
computing exactly what it did before. diffusers' SD 1.x/SDXL loaders take no LoKr/LoHa keys, so those layers'
delta weights are computed for the job and swapped in, and the original weight tensors, never written to, are
swapped back after.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from models.adapters.base import AssetInfo, wrong_family
from models.adapters.lora_formats import parse_lora_keys, resolve_for
from models.adapters.lora_layers import LayerTarget
from models.adapters.targets import ModelTarget, pipeline_target
from models.families import Family
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

__all__ = [
    "ActiveLora",
    "DeltaLayer",
    "LoraSet",
    "PeftLayer",
    "PreparedLora",
    "pipeline_family",
    "prepare_lora",
]

log = logging.getLogger(__name__)

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: Layers diffusers' text-encoder LoRA loader cannot size (it reads ranks only of attention and MLP layers):
#: their LoRA pairs are applied as delta weights instead.
_DELTA_ONLY = frozenset({"text_projection"})
_TEXT_SUFFIXES = ("lora_linear_layer.down", "lora_linear_layer.up")
_MISFIT_MESSAGE = "This LoRA does not fit the layers of this server's model; upload a LoRA made for it."


@dataclass(frozen=True)
class PeftLayer:
    """A LoRA pair for one layer: ``lora_A`` (rank × in[, kh, kw]) and ``lora_B`` (out × rank[, 1, 1])."""

    target: LayerTarget
    lora_a: torch.Tensor
    lora_b: torch.Tensor


@dataclass(frozen=True)
class DeltaLayer:
    """A LyCORIS layer whose whole delta weight is computed per job.

    Attributes:
        target: The layer it adapts.
        algo: ``lokr`` (Kronecker product), ``loha`` (Hadamard product of two low-rank products) or ``lora``
            (``up @ down``, for layers diffusers' loaders cannot take).
        factors: The file's tensors by role (``lokr_w1_a``, ``hada_w2_b``...), float32.
        scale: alpha / rank, or 1 where the file has no alpha or no rank.
    """

    target: LayerTarget
    algo: str
    factors: dict[str, torch.Tensor]
    scale: float

    def delta(self, device: torch.device, multiplier: float = 1.0) -> torch.Tensor:
        """The delta weight in the target's weight shape (float32): factors × alpha/rank × ``multiplier``."""
        f = {role: t.to(device) for role, t in self.factors.items()}

        def product(full: str, a: str, b: str) -> torch.Tensor:
            return f[full] if full in f else f[a] @ f[b].flatten(1)

        factor = self.scale * multiplier  # applied to the small first factor, not to the full delta
        if self.algo == "lokr":
            w1 = product("lokr_w1", "lokr_w1_a", "lokr_w1_b") * factor
            w2 = product("lokr_w2", "lokr_w2_a", "lokr_w2_b")
            delta = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2)
        elif self.algo == "loha":
            delta = (f["hada_w1_a"] * factor @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        else:
            delta = (f["up"].flatten(1) * factor) @ f["down"].flatten(1)
        return delta.reshape(self.target.weight_shape)


@dataclass(frozen=True)
class PreparedLora:
    """A LoRA file converted for application: PEFT pairs and LyCORIS deltas."""

    peft: tuple[PeftLayer, ...]
    deltas: tuple[DeltaLayer, ...]

    @property
    def peft_components(self) -> tuple[str, ...]:
        return tuple(c for c in _COMPONENTS if any(p.target.component == c for p in self.peft))


@dataclass(frozen=True)
class ActiveLora:
    """One LoRA used by one job.

    Attributes:
        key: The file's sha256 (identifies the adapter while it stays loaded).
        state_dict: The file's tensors, as loaded.
        info: What ``inspect_lora`` found.
        weight: The prompt's weight (``<lora:name:0.8>``); 0 has no effect, negative values invert it.
        te_weight: Weight for the text encoder(s), if the prompt gave one apart.
        unet_weight: Weight for the UNet, if the prompt gave one apart.
        metadata: The file's metadata (for a PEFT alpha, see ``peft_config_metadata``).
    """

    key: str
    state_dict: Mapping[str, torch.Tensor]
    info: AssetInfo
    weight: float = 1.0
    te_weight: float | None = None
    unet_weight: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def part_weight(self, component: str) -> float:
        if component == "unet":
            return self.weight if self.unet_weight is None else self.unet_weight
        return self.weight if self.te_weight is None else self.te_weight


def pipeline_family(pipe: Any) -> Family:
    """SDXL when the pipeline has a second text encoder, else SD 1.5."""
    return Family.sdxl if getattr(pipe, "text_encoder_2", None) is not None else Family.sd15


def _metadata_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """Per-component ``lora_alpha`` from diffusers' ``lora_adapter_metadata`` (``""`` = every component)."""
    try:
        raw = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return {}
    alphas: dict[str, float] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            prefix, _, name = str(key).rpartition(".")
            if name == "lora_alpha" and isinstance(value, int | float):
                alphas[prefix] = float(value)
    return alphas


def _scale(alpha: float | None, rank: int | None) -> float:
    # kohya and LyCORIS read a missing or zero alpha as alpha = rank.
    return 1.0 if not alpha or not rank else alpha / rank


def _peft_layer(target: LayerTarget, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> PeftLayer:
    rank = int(down.shape[0])
    kernel = target.kernel
    down = down.reshape(rank, target.in_features, *kernel) if kernel else down.reshape(rank, -1)
    up = up.reshape(up.shape[0], rank, *((1, 1) if kernel else ()))
    return PeftLayer(target, down.float().contiguous(), (up.float() * _scale(alpha, rank)).contiguous())


def _delta_rank(algo: str, factors: Mapping[str, torch.Tensor]) -> int | None:
    for role in {"lokr": ("lokr_w2_b", "lokr_w1_b"), "loha": ("hada_w1_b",)}.get(algo, ("down",)):
        if role in factors:
            return int(factors[role].shape[0])
    return None


def prepare_lora(
    state_dict: Mapping[str, torch.Tensor],
    model: Family | ModelTarget,
    metadata: Mapping[str, str] | None = None,
) -> PreparedLora:
    """Convert a LoRA state dict of any recognised layout for application on a model.

    Args:
        state_dict: The file's tensors.
        model: The model's shapes: a family (its canonical shapes) or a model target, e.g. the live
            pipeline's (:func:`~models.adapters.targets.pipeline_target`).
        metadata: The file's metadata (a PEFT alpha, see ``peft_config_metadata``).

    Raises:
        InvalidRequestError: Not a LoRA, not for ``model``, or holding layers we cannot apply.
    """
    parsed = parse_lora_keys(list(state_dict))
    resolved = (
        None
        if parsed is None
        else resolve_for(parsed, {k: tuple(v.shape) for k, v in state_dict.items()}, model)
    )
    if parsed is None or resolved is None:
        raise InvalidRequestError(_MISFIT_MESSAGE)
    alphas = _metadata_alphas(metadata or {})
    peft: list[PeftLayer] = []
    deltas: list[DeltaLayer] = []
    for layer_id, layer in parsed.layers.items():
        if layer.unsupported:
            raise InvalidRequestError(f"{layer.unsupported} can't be applied yet; upload a standard LoRA.")
        target = resolved[layer_id]
        alpha_key = layer.keys.get("alpha")
        alpha = float(state_dict[alpha_key]) if alpha_key else alphas.get(target.component, alphas.get(""))
        if layer.algo == "lora" and target.module not in _DELTA_ONLY:
            peft.append(
                _peft_layer(target, state_dict[layer.keys["down"]], state_dict[layer.keys["up"]], alpha)
            )
            continue
        factors = {
            role: state_dict[key].detach().float() for role, key in layer.keys.items() if role != "alpha"
        }
        deltas.append(
            DeltaLayer(target, layer.algo, factors, _scale(alpha, _delta_rank(layer.algo, factors)))
        )
    return PreparedLora(tuple(peft), tuple(deltas))


@dataclass(frozen=True)
class _Resident:
    name: str
    components: tuple[str, ...]
    deltas: tuple[DeltaLayer, ...]


def _loaded_adapters(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _adapter_name(key: str) -> str:
    return "lora_" + re.sub(r"[^0-9A-Za-z_]", "_", key)


class LoraSet:
    """LoRAs resident in one pipeline's modules; activate some for a job, deactivate after.

    Owned by the worker thread. Up to ``max_resident`` files stay loaded (least recently used evicted), so
    alternating jobs with LoRA A, LoRA B and none load each file once. Pipelines made with ``from_pipe``
    share the modules, so activating through the base pipeline affects them too. Files are resolved against
    the pipeline's own shapes (``target``, from its components' configs), so a LoRA made for a model such as
    ``shapes`` applies to it just as an SD 1.5 LoRA applies to an SD 1.5 checkpoint.
    """

    def __init__(self, pipe: Any, *, max_resident: int = 4) -> None:
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.target = pipeline_target(pipe)  # layers are resolved against the live model's own shapes
        self.family = self.target.family
        self.max_resident = max_resident
        self._components: dict[str, torch.nn.Module] = {
            name: getattr(pipe, name) for name in _COMPONENTS if getattr(pipe, name, None) is not None
        }
        self._resident: OrderedDict[str, _Resident] = OrderedDict()
        self._saved: dict[tuple[str, str], tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self._peft_enabled = False
        self.active: tuple[str, ...] = ()

    @property
    def resident(self) -> tuple[str, ...]:
        """Keys of the loaded LoRAs, least recently used first."""
        return tuple(self._resident)

    def activate(self, pipe: Any, loras: Sequence[ActiveLora]) -> None:
        """Make exactly ``loras`` active, with their weights (the same key twice adds its weights).

        Raises:
            InvalidRequestError: A LoRA is for another family, cannot be applied, or does not fit the model.
        """
        self._check_pipe(pipe)
        self.deactivate(pipe)
        jobs: dict[str, list[ActiveLora]] = {}
        for lora in loras:
            self._check(lora)
            jobs.setdefault(lora.key, []).append(lora)
        try:
            residents = {key: self._ensure(pipe, same[0], set(jobs)) for key, same in jobs.items()}
            weights = {
                key: {c: sum(lora.part_weight(c) for lora in same) for c in _COMPONENTS}
                for key, same in jobs.items()
            }
            self._set_peft(pipe, residents, weights)
            self._apply_deltas(residents, weights)
        except BaseException:
            self.deactivate(pipe)
            raise
        self.active = tuple(jobs)
        log.debug("active LoRAs: %s", ", ".join(self.active) or "none")

    def deactivate(self, pipe: Any) -> None:
        """Switch every LoRA off; the modules compute exactly what they did before :meth:`activate`."""
        with torch.no_grad():
            for param, original in self._saved.values():
                param.data = original
        self._saved.clear()
        if self._peft_enabled:
            pipe.disable_lora()
            self._peft_enabled = False
        self.active = ()

    def clear(self, pipe: Any) -> None:
        """Deactivate and unload every resident LoRA (the PEFT wrappers stay, computing the plain layers)."""
        self.deactivate(pipe)
        self._delete_adapters(pipe, [r.name for r in self._resident.values() if r.components])
        self._resident.clear()

    def _delete_adapters(self, pipe: Any, names: list[str]) -> None:
        """Delete PEFT adapters, none left active first (else peft picks another one, with a warning)."""
        if not names:
            return
        for model in self._components.values():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.set_adapter([])
        pipe.delete_adapters(names)

    def _check_pipe(self, pipe: Any) -> None:
        if any(getattr(pipe, name, None) is not module for name, module in self._components.items()):
            raise ValueError("this LoraSet belongs to a pipeline with other modules")

    def _check(self, lora: ActiveLora) -> None:
        if lora.info.kind != AssetKind.LORA:
            raise ValueError(f"not a LoRA: {lora.info.kind}")
        if lora.info.family != self.family:
            raise wrong_family(AssetKind.LORA, lora.info.family, self.family)
        if not lora.info.details.get("applicable", True):
            what = lora.info.details.get("unsupported", "Files of this type")
            raise InvalidRequestError(f"{what} can't be applied yet; upload a standard LoRA.")

    def _live(self, target: LayerTarget) -> tuple[str, torch.nn.Parameter]:
        """The module path in the live component and its weight, checked against the target's shape."""
        model = self._components.get(target.component)
        for name in (target.module, f"text_model.{target.module}"):
            try:
                module = model.get_submodule(name) if model is not None else None
            except AttributeError:
                continue
            weight = getattr(getattr(module, "base_layer", module), "weight", None)
            if isinstance(weight, torch.nn.Parameter) and tuple(weight.shape) == target.weight_shape:
                return name, weight
            break
        log.info("LoRA layer %s.%s does not fit the live model", target.component, target.module)
        raise InvalidRequestError(_MISFIT_MESSAGE)

    def _ensure(self, pipe: Any, lora: ActiveLora, protect: set[str]) -> _Resident:
        resident = self._resident.get(lora.key)
        if resident is not None:
            self._resident.move_to_end(lora.key)
            return resident
        self._evict(pipe, protect)
        prepared = prepare_lora(lora.state_dict, self.target, lora.metadata)
        for layer in prepared.deltas:
            self._live(layer.target)
        resident = _Resident(_adapter_name(lora.key), prepared.peft_components, prepared.deltas)
        if prepared.peft:
            if resident.name in _loaded_adapters(pipe):  # left by an earlier LoraSet on the same modules
                self._delete_adapters(pipe, [resident.name])
            self._load_peft(pipe, resident.name, prepared.peft)
        self._resident[lora.key] = resident
        log.info(
            "loaded LoRA %s (%d LoRA layers, %d LyCORIS layers)",
            lora.key[:12],
            len(prepared.peft),
            len(prepared.deltas),
        )
        return resident

    def _load_peft(self, pipe: Any, name: str, layers: Sequence[PeftLayer]) -> None:
        state: dict[str, torch.Tensor] = {}
        for layer in layers:
            path, weight = self._live(layer.target)
            # Text encoders get diffusers' own spelling: its loader cannot tell what a text-encoder dict with
            # PEFT names is when it holds no attention layer (an MLP-only LoRA).
            down, up = ("lora_A", "lora_B") if layer.target.component == "unet" else _TEXT_SUFFIXES
            prefix = f"{layer.target.component}.{path}"
            state[f"{prefix}.{down}.weight"] = layer.lora_a.to(weight.device, weight.dtype, copy=True)
            state[f"{prefix}.{up}.weight"] = layer.lora_b.to(weight.device, weight.dtype, copy=True)
        self._peft_enabled = True  # a new adapter starts switched on: deactivate must switch it off
        try:
            with warnings.catch_warnings():
                # peft warns whenever a second adapter joins a model; several resident LoRAs are the design.
                warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
                pipe.load_lora_weights(state, adapter_name=name)
        except BaseException:
            if name in _loaded_adapters(pipe):
                self._delete_adapters(pipe, [name])
            raise

    def _evict(self, pipe: Any, protect: set[str]) -> None:
        while len(self._resident) >= self.max_resident:
            victim = next((key for key in self._resident if key not in protect), None)
            if victim is None:
                return
            resident = self._resident.pop(victim)
            if resident.components:
                self._delete_adapters(pipe, [resident.name])
            log.debug("evicted LoRA %s", victim[:12])

    def _set_peft(
        self, pipe: Any, residents: Mapping[str, _Resident], weights: Mapping[str, dict[str, float]]
    ) -> None:
        names: list[str] = []
        adapter_weights: list[dict[str, float]] = []
        for key, resident in residents.items():
            if resident.components:
                names.append(resident.name)
                adapter_weights.append({c: weights[key][c] for c in resident.components})
        if names:
            pipe.enable_lora()
            self._peft_enabled = True
            pipe.set_adapters(names, adapter_weights=adapter_weights)

    def _apply_deltas(
        self, residents: Mapping[str, _Resident], weights: Mapping[str, dict[str, float]]
    ) -> None:
        with torch.no_grad():
            for key, resident in residents.items():
                for layer in resident.deltas:
                    weight = weights[key][layer.target.component]
                    if weight == 0:
                        continue
                    path, param = self._live(layer.target)
                    self._saved.setdefault((layer.target.component, path), (param, param.data))
                    param.data = param.data + layer.delta(param.device, weight).to(param.dtype)
