"""The webui's hypernetworks: recognise a file, build its modules, apply them to a UNet for one job, restore.

A hypernetwork file is a torch-saved dict keyed by context width (768 for SD 1.5's cross-attention; 320,
640 and 1280 for its self-attention) whose values are ``[state_dict_k, state_dict_v]``, plus the settings
``layer_structure`` (default ``[1, 2, 1]``), ``activation_func``, ``is_layer_norm``, ``use_dropout``,
``activate_output``, ``last_layer_dropout``, ``dropout_structure``, ``name`` and ``step``. Each state dict
belongs to an MLP built exactly as the webui's ``HypernetworkModule`` builds it, so the Sequential indices
(and hence the keys) match. At inference the attention's context ``c`` becomes ``c + mlp_k(c) * strength``
before ``to_k`` and ``c + mlp_v(c) * strength`` before ``to_v``; several hypernetworks apply in sequence.
diffusers has no such thing, so :class:`HypernetworkAttnProcessor` does it inside the attention processor.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn
from torch.nn import functional as F

from models.adapters.base import AssetInfo
from models.adapters.targets import ModelTarget, model_details, target_for_attention_widths
from models.families import Family
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

__all__ = [
    "ACTIVATIONS", "Hypernetwork", "HypernetworkAttnProcessor", "HypernetworkHandle", "HypernetworkModule",
    "HypernetworkSpec", "apply_hypernetworks", "inspect_hypernetwork", "load_hypernetwork"
]  # fmt: skip

log = logging.getLogger(__name__)

#: The webui's table: its own names, then every torch activation by lower-cased class name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}  # fmt: skip
for _name, _cls in inspect.getmembers(nn.modules.activation, inspect.isclass):
    if _cls.__module__ == "torch.nn.modules.activation" and issubclass(_cls, nn.Module):
        ACTIVATIONS.setdefault(_name.lower(), _cls)
_SD15_WIDTHS = frozenset({320, 640, 768, 1280})
_MAX_LAYERS = 16
_MAX_MULTIPLIER = 64.0
#: The webui's fix_old_state_dict: files from before the Sequential name their two layers linear1/linear2.
_OLD_KEYS = {f"linear{i + 1}.{p}": f"linear.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}


def _refuse(reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"This hypernetwork file is not usable: {reason}.")


def _flag(obj: Mapping[Any, Any], key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool | int):
        raise _refuse(f"its {key} setting is not true or false")
    return bool(value)


def _finite_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _numbers(value: object, what: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not all(_finite_number(v) for v in value):
        raise _refuse(f"its {what} is not a list of numbers")
    return tuple(float(v) for v in value)


def _default_dropout(layers: int, use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """The webui's ``parse_dropout_structure``, for files saved before ``dropout_structure`` existed."""
    if not use_dropout:
        return (0.0,) * layers
    return (0.0, *([0.3] * (layers - 3)), 0.3 if last_layer_dropout else 0.0, 0.0)


@dataclass(frozen=True)
class HypernetworkSpec:
    """How each of a hypernetwork's MLPs is built (the same for every width, key and value)."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str | None = None
    layer_norm: bool = False
    activate_output: bool = True
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)

    @classmethod
    def from_file(cls, obj: Mapping[Any, Any]) -> HypernetworkSpec:
        """Read and check the settings of a webui file, with the webui's defaults."""
        raw = obj.get("layer_structure")
        layers = _numbers([1, 2, 1] if raw is None else raw, "layer structure")
        if not 2 <= len(layers) <= _MAX_LAYERS or layers[0] != 1 or layers[-1] != 1:
            raise _refuse("its layer structure must start and end with 1")
        if not all(0 < v <= _MAX_MULTIPLIER for v in layers):
            raise _refuse("its layer structure has a size out of range")
        activation = obj.get("activation_func")
        if activation is None:
            activation = "linear"
        if not isinstance(activation, str):  # never truth-tested: it may be a tensor
            raise _refuse("its activation function is not a name")
        activation = activation.lower() or "linear"
        if activation != "linear" and not _constructible(activation):
            raise _refuse(f"it uses the activation function {activation[:40]!r}, which is not supported")
        raw_dropout = obj.get("dropout_structure")
        if raw_dropout is None:
            dropout = _default_dropout(
                len(layers), _flag(obj, "use_dropout", False), _flag(obj, "last_layer_dropout", False)
            )
        else:
            dropout = _numbers(raw_dropout, "dropout structure")
        if len(dropout) < len(layers) or not all(0 <= p < 1 for p in dropout):
            raise _refuse("its dropout structure does not fit its layers")
        return cls(
            layer_structure=layers,
            activation=None if activation == "linear" else activation,
            layer_norm=_flag(obj, "is_layer_norm", False),
            activate_output=_flag(obj, "activate_output", True),
            dropout_structure=dropout,
        )

    def build(self, dim: int) -> nn.Sequential:
        """The webui's ``HypernetworkModule.linear`` for context width ``dim`` (on the current device)."""
        sizes = [int(dim * m) for m in self.layer_structure]
        if min(sizes) < 1:
            raise _refuse(f"its layer structure gives an empty layer at width {dim}")
        layers: list[nn.Module] = []
        last = len(sizes) - 2
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if self.activation is not None and (i < last or self.activate_output):
                layers.append(ACTIVATIONS[self.activation]())
            if self.layer_norm:
                layers.append(nn.LayerNorm(sizes[i + 1]))
            if self.dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=self.dropout_structure[i + 1]))
        return nn.Sequential(*layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer_structure": list(self.layer_structure),
            "activation": self.activation or "linear",
            "layer_norm": self.layer_norm,
            "activate_output": self.activate_output,
            "dropout": list(self.dropout_structure) if any(self.dropout_structure) else False,
        }


def _constructible(name: str) -> bool:
    cls = ACTIVATIONS.get(name)
    if cls is None:
        return False
    try:
        with torch.device("meta"):
            cls()
    except (TypeError, ValueError, RuntimeError):  # needs arguments (Threshold, MultiheadAttention)
        return False
    return True


class HypernetworkModule(nn.Module):
    """One MLP of a hypernetwork: ``x + mlp(x) * strength`` (computed in the module's dtype, float32)."""

    def __init__(self, dim: int, spec: HypernetworkSpec) -> None:
        super().__init__()
        self.linear = spec.build(dim)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        h = x.to(next(self.linear.parameters()).dtype)
        out: torch.Tensor = h + self.linear(h) * strength
        return out.to(x.dtype)


@dataclass
class Hypernetwork:
    """A loaded hypernetwork: ``layers[width] = (module for keys, module for values)``."""

    spec: HypernetworkSpec
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]
    name: str | None = None
    step: int | None = None

    @property
    def widths(self) -> list[int]:
        return sorted(self.layers)

    def to(self, device: torch.device | str) -> Hypernetwork:
        for pair in self.layers.values():
            for module in pair:
                module.to(device)
        return self


def _state_dict(raw: object, width: int) -> dict[str, torch.Tensor]:
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()
    ):
        raise _refuse(f"the layers for width {width} are not plain weights")
    state = dict(raw)
    for old, new in _OLD_KEYS.items():  # the webui's fix_old_state_dict
        if old in state:
            state[new] = state.pop(old)
    return state


def _check_layers(width: int, spec: HypernetworkSpec, states: Sequence[dict[str, torch.Tensor]]) -> None:
    """Every key and shape must be those of the module the settings build; a dry run checks it computes."""
    with torch.device("meta"):
        module = HypernetworkModule(width, spec)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for state in states:
            if set(state) != set(expected):
                raise _refuse(f"the layers for width {width} do not match its layer structure and settings")
            for key, tensor in state.items():
                if tuple(tensor.shape) != expected[key] or not tensor.is_floating_point():
                    raise _refuse(f"a layer for width {width} has the wrong shape")
        try:
            out = module.eval()(torch.empty(1, width))
        except (RuntimeError, ValueError, IndexError):
            raise _refuse(f"its layers for width {width} cannot be chained") from None
    if tuple(out.shape) != (1, width):
        raise _refuse(f"its layers for width {width} do not give back a {width}-wide context")


def _name_step(obj: Mapping[Any, Any]) -> dict[str, Any]:
    name, step = obj.get("name"), obj.get("step")
    return {
        "name": name if isinstance(name, str) and name else None,
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
    }


def _widths(obj: Mapping[Any, Any]) -> list[int]:
    return [k for k in obj if isinstance(k, int) and not isinstance(k, bool)]


def _parse(obj: object) -> tuple[HypernetworkSpec, dict[int, list[dict[str, torch.Tensor]]]] | None:
    if not isinstance(obj, Mapping):
        return None
    widths = _widths(obj)
    if not widths:
        return None
    spec = HypernetworkSpec.from_file(obj)
    layers: dict[int, list[dict[str, torch.Tensor]]] = {}
    for width in widths:
        raw = obj[width]
        if not 1 <= width <= 8192:
            raise _refuse(f"it has layers for an impossible width {width}")
        if not isinstance(raw, list | tuple) or len(raw) != 2:
            raise _refuse(f"the layers for width {width} are not a key and value pair")
        states = [_state_dict(part, width) for part in raw]
        _check_layers(width, spec, states)
        layers[width] = states
    return spec, layers


def _family(widths: Sequence[int], targets: Sequence[ModelTarget]) -> tuple[Family, ModelTarget | None]:
    if set(widths) <= _SD15_WIDTHS:
        return Family.sd15, None
    custom = target_for_attention_widths(targets, widths)
    if custom is not None:
        return custom.family, custom
    if 1024 in widths:
        raise InvalidRequestError(
            "This hypernetwork is for SD 2.x (1024-wide context); this server runs SD 1.5 and SDXL only."
        )
    if 2048 in widths:
        raise InvalidRequestError("This hypernetwork is for SDXL; only SD 1.5 hypernetworks are supported.")
    customs = [t.attention_widths for t in targets if not t.canonical and t.family == Family.sd15]
    odd = sorted(set(widths) - _SD15_WIDTHS.union(*customs))
    if not odd:
        raise _refuse("its layers' widths are those of different models, not of one")
    if customs:
        where = "of this server's models"
        raise _refuse(f"it has layers of width {odd[0]}, which no attention layer {where} has")
    raise _refuse(f"it has layers of width {odd[0]}, which no SD 1.5 attention layer has")


def inspect_hypernetwork(obj: object, *, targets: Sequence[ModelTarget] = ()) -> AssetInfo | None:
    """Recognise a webui hypernetwork (the object of its torch pickle) and check it in full.

    Args:
        obj: The object of the file's torch pickle.
        targets: Model targets tried after SD 1.5's widths: widths that are all context widths of a custom
            SD 1.5-family target's attention layers are reported as made for that model (details ``model``,
            ``model_key``).

    Returns:
        The info (details: ``widths``, ``layer_structure``, ``activation``, ``layer_norm``,
        ``activate_output``, ``dropout``, and ``name``/``step`` when present), or None when ``obj`` is not
        a hypernetwork (no layers keyed by width).

    Raises:
        InvalidRequestError: Malformed settings or layers, or made for SD 2.x, SDXL or no served model.
    """
    if not isinstance(obj, Mapping) or not _widths(obj):
        return None
    # before the layers: the most useful sentence for an SD 2.x/SDXL file
    family, custom = _family(_widths(obj), targets)
    parsed = _parse(obj)
    assert parsed is not None
    spec, layers = parsed
    details: dict[str, Any] = {"widths": sorted(layers), **spec.to_json()}
    details.update({k: v for k, v in _name_step(obj).items() if v is not None})
    details.update(model_details(custom))
    return AssetInfo(kind=AssetKind.HYPERNETWORK, format="webui", family=family, details=details)


def load_hypernetwork(obj: object, name: str | None = None) -> Hypernetwork:
    """Build a hypernetwork's modules from the object of its file (on the CPU, float32, eval mode).

    Widths are not checked against a family here (see :func:`inspect_hypernetwork`); applying uses the
    widths the UNet has.

    Raises:
        InvalidRequestError: Not a hypernetwork, or malformed.
    """
    parsed = _parse(obj)
    if parsed is None:
        raise _refuse("it has no layers keyed by context width")
    spec, layers = parsed
    built: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    for width, states in layers.items():
        pair = []
        for state in states:
            with torch.device("meta"):
                module = HypernetworkModule(width, spec)
            weights = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
            module.load_state_dict(weights, strict=True, assign=True)
            pair.append(module.eval().requires_grad_(False))
        built[width] = (pair[0], pair[1])
    assert isinstance(obj, Mapping)
    info = _name_step(obj)
    return Hypernetwork(spec=spec, layers=built, name=name or info["name"], step=info["step"])


class HypernetworkAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the context passed through hypernetworks before ``to_k``/``to_v``.

    A plain object, not an ``nn.Module``, so the hypernetworks never become part of the UNet's weights.
    """

    def __init__(self, hypernetworks: Sequence[tuple[Hypernetwork, float]]) -> None:
        self.hypernetworks = list(hypernetworks)

    def contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value contexts: each hypernetwork with a module for this width, in order."""
        context_k = context_v = context
        for hypernetwork, strength in self.hypernetworks:
            pair = hypernetwork.layers.get(int(context.shape[-1]))
            if pair is not None:
                context_k = pair[0](context_k, strength)
                context_v = pair[1](context_v, strength)
        return context_k, context_v

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context_k, context_v = self.contexts(encoder_hidden_states)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        result: torch.Tensor = hidden_states / attn.rescale_output_factor
        return result


class HypernetworkHandle:
    """Puts back a UNet's own attention processors; a context manager, and :meth:`restore` is idempotent."""

    def __init__(self, unet: Any, original: Mapping[str, Any] | None) -> None:
        self._unet = unet
        self._original = dict(original) if original is not None else None

    def restore(self) -> None:
        if self._original is not None:
            self._unet.set_attn_processor(dict(self._original))
            self._original = None

    def __enter__(self) -> HypernetworkHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _targets(unet: Any, widths: set[int]) -> list[Attention]:
    """The attention layers whose context width has a module; refuses layers with a custom processor."""
    targets = []
    for module in unet.modules():
        if not isinstance(module, Attention) or int(module.to_k.in_features) not in widths:
            continue
        if type(module.processor) not in (AttnProcessor2_0, AttnProcessor):
            raise InvalidRequestError(
                "This model's attention layers are customised, so hypernetworks cannot be applied to it."
            )
        targets.append(module)
    return targets


def apply_hypernetworks(unet: Any, hypernetworks: Sequence[tuple[Hypernetwork, float]]) -> HypernetworkHandle:
    """Apply hypernetworks (each with its strength, in order) to every fitting attention layer of ``unet``.

    Args:
        unet: A diffusers UNet (shared by a pipeline and its ``from_pipe`` children).
        hypernetworks: ``(hypernetwork, strength)`` pairs, as in ``<hypernet:name:strength>``.

    Returns:
        A handle whose ``restore()`` (or ``with`` block exit) puts back the exact original processors.

    Raises:
        InvalidRequestError: No hypernetwork has a layer of a width this UNet's attention uses.
    """
    if not hypernetworks:
        return HypernetworkHandle(unet, None)
    widths = {w for hypernetwork, _ in hypernetworks for w in hypernetwork.layers}
    targets = _targets(unet, widths)
    if not targets:
        raise InvalidRequestError("This hypernetwork has no layer that fits this model's attention layers.")
    device = next(unet.parameters()).device
    for hypernetwork, _ in hypernetworks:
        hypernetwork.to(device)
    handle = HypernetworkHandle(unet, unet.attn_processors)
    processor = HypernetworkAttnProcessor(hypernetworks)
    for attn in targets:
        attn.set_processor(processor)
    log.debug("hypernetworks on %d attention layers (widths %s)", len(targets), sorted(widths))
    return handle
