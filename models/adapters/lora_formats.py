"""Recognise a LoRA file from its tensor names and shapes alone: the layout, the family and every layer.

Layouts (``AssetInfo.format``): ``kohya`` (``lora_unet_*.lora_down.weight``), ``diffusers``
(``unet.*.lora_A.weight``), ``diffusers-old`` (attention-processor keys ``*.to_q_lora.down.weight`` /
``*.lora.down.weight``), ``peft`` (``base_model.model.*.lora_A.weight``), ``cloneofsimo`` (``unet:3:down``),
``lycoris-lokr`` and ``lycoris-loha`` (kohya names with ``lokr_*`` / ``hada_*`` factors). A header is enough:
only names and shapes are read, plus alpha values where tensors are given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from models.adapters.lora_layers import (
    TEXT_COMPONENTS,
    LayerTable,
    LayerTarget,
    layer_table,
    layer_table_for,
)
from models.adapters.targets import ModelTarget
from models.families import Family

__all__ = [
    "LayerDims",
    "ParsedLora",
    "RawLayer",
    "ShapeError",
    "layer_dims",
    "parse_lora_keys",
    "resolve_for",
    "resolve_layers",
]

Shape = tuple[int, ...]

_KOHYA_RE = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_([^.]+)\.(.+)$")
_KOHYA_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
_LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_KOHYA_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "lora_mid.weight": "mid",
    "dora_scale": "dora",
    **{role: role for role in _LOKR_ROLES + _LOHA_ROLES},
}
_TUCKER_CORES = ("mid", "hada_t1", "lokr_t2")
_CLONEOFSIMO_RE = re.compile(r"^(unet|text_encoder|text_encoder_2):(\d+):(up|down)$")
_TOKEN_RE = re.compile(r"^<[^<>]+>$")
_PEFT_RE = re.compile(r"^(.+)\.lora_(A|B)\.weight$")
_DORA_RE = re.compile(r"^(.+)\.lora_magnitude_vector(?:\.weight)?$")
_PROCESSOR_RE = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_RE = re.compile(r"^(.+)\.lora(?:_linear_layer)?\.(down|up)\.weight$")
_ALPHA_RE = re.compile(r"^(.+)\.alpha$")
_PROCESSOR_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_MODULES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_COMPONENT_PREFIXES = (
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
)
#: Layer types a role betrays that we recognise but cannot apply.
_UNSUPPORTED = {
    "mid": "LoCon files with Tucker-decomposed layers",
    "lokr_t2": "LyCORIS LoKr files with Tucker-decomposed layers",
    "hada_t1": "LyCORIS LoHa files with Tucker-decomposed layers",
    "hada_t2": "LyCORIS LoHa files with Tucker-decomposed layers",
    "dora": "DoRA files",
    "other": "LyCORIS files of this type",
}


class ShapeError(ValueError):
    """A layer's tensors do not form a valid LoRA/LoKr/LoHa layer."""


@dataclass
class RawLayer:
    """One adapted layer as the file names it.

    Attributes:
        component: ``unet``, ``text_encoder``, ``text_encoder_2``; ``None`` for a text encoder not named.
        name: The kohya name, the diffusers module path, or the cloneofsimo index.
        keys: Role (``down``, ``up``, ``alpha``, ``lokr_w1_a``, ``hada_w2_b``...) to the tensor's key.
    """

    component: str | None
    name: str
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def algo(self) -> str:
        if any(role.startswith("lokr_") for role in self.keys):
            return "lokr"
        if any(role.startswith("hada_") for role in self.keys):
            return "loha"
        return "lora"

    @property
    def unsupported(self) -> str | None:
        """Why this layer cannot be applied, or ``None``."""
        for role in self.keys:
            label = _UNSUPPORTED.get(role.split(":")[0])
            if label is not None:
                return label
        return None


@dataclass
class ParsedLora:
    """A state dict's keys sorted into layers.

    Attributes:
        style: ``kohya`` (kohya names, LyCORIS included), ``diffusers`` or ``cloneofsimo``.
        format: The layout label, before LyCORIS algorithms are told apart.
        layers: Layer id to layer.
        tokens: Textual-inversion tokens bundled in the file (cloneofsimo ``<s1>``, kohya ``bundle_emb``).
        foreign: Keys that belong to no LoRA layer.
    """

    style: str
    format: str
    layers: dict[tuple[str | None, str], RawLayer]
    tokens: list[str]
    foreign: list[str]


@dataclass(frozen=True)
class LayerDims:
    """What a layer's tensors imply about the layer they adapt.

    Attributes:
        out: Output width.
        flat_in: Input width times kernel area.
        rank: The decomposition rank (``None`` for full LoKr factors).
        kernel: The kernel the tensors carry, if any (a 4-D LoRA down weight or LoKr factor).
    """

    out: int
    flat_in: int
    rank: int | None
    kernel: tuple[int, int] | None = None

    def fits(self, target: LayerTarget) -> bool:
        if self.out != target.out_features or self.flat_in != target.flat_in:
            return False
        return self.kernel is None or self.kernel == (target.kernel or (1, 1))


def _parse_kohya(key: str) -> tuple[tuple[str | None, str], str] | None:
    match = _KOHYA_RE.match(key)
    if match is None:
        return None
    prefix, rest, suffix = match.groups()
    role = _KOHYA_ROLES.get(suffix, f"other:{suffix}")
    return (_KOHYA_COMPONENT[prefix], f"{prefix}_{rest}"), role


def _split_component(path: str) -> tuple[str | None, str, bool]:
    """(component, module path, whether a PEFT ``base_model.model.`` prefix was there)."""
    peft = path.startswith("base_model.model.")
    path = path.removeprefix("base_model.model.")
    component: str | None = None
    for prefix, name in _COMPONENT_PREFIXES:
        if path.startswith(prefix):
            component, path = name, path[len(prefix) :]
            break
    if path.startswith(("text_model.", "encoder.layers.", "text_projection")):
        return (component if component in TEXT_COMPONENTS else None), path.removeprefix("text_model."), peft
    return component or "unet", path, peft


def _parse_diffusers(key: str) -> tuple[tuple[str | None, str], str, str] | None:
    """((component, module), role, format) of a diffusers/PEFT-style key."""
    fmt = "diffusers"
    if match := _PEFT_RE.match(key):
        path, role = match.group(1), "down" if match.group(2) == "A" else "up"
    elif match := _DORA_RE.match(key):
        path, role = match.group(1), "dora"
    elif match := _PROCESSOR_RE.match(key):
        base, which, role = match.groups()
        names = _TEXT_PROCESSOR_MODULES if base.endswith("self_attn") else _PROCESSOR_MODULES
        path, fmt = f"{base}.{names[which]}", "diffusers-old"
    elif match := _OLD_RE.match(key):
        path, role, fmt = match.group(1), match.group(2), "diffusers-old"
    elif match := _ALPHA_RE.match(key):
        path, role = match.group(1), "alpha"
    else:
        return None
    component, module, peft = _split_component(path)
    return (component, module), role, "peft" if peft else fmt


def _parse_one(key: str) -> tuple[str, str, tuple[str | None, str], str] | None:
    """(style, format, layer id, role) of one key, or ``None``."""
    if match := _CLONEOFSIMO_RE.match(key):
        return "cloneofsimo", "cloneofsimo", (match.group(1), match.group(2)), match.group(3)
    if kohya := _parse_kohya(key):
        return "kohya", "kohya", kohya[0], kohya[1]
    if diffusers := _parse_diffusers(key):
        return "diffusers", diffusers[2], diffusers[0], diffusers[1]
    return None


def _token_of(key: str, style: str) -> str | None:
    if style == "cloneofsimo" and _TOKEN_RE.match(key):
        return key
    if style == "kohya" and key.startswith("bundle_emb."):
        return key.split(".")[1]
    return None


def parse_lora_keys(keys: list[str]) -> ParsedLora | None:
    """Sort tensor names into LoRA layers; ``None`` when no name belongs to any LoRA layout."""
    parsed = {key: result for key in keys if (result := _parse_one(key)) is not None}
    if not parsed or not any(
        role in ("down", "up") or role.startswith(("lokr_w", "hada_w")) for _, _, _, role in parsed.values()
    ):
        return None
    styles = [style for style, _, _, _ in parsed.values()]
    style = max(set(styles), key=styles.count)
    formats = [fmt for s, fmt, _, _ in parsed.values() if s == style and fmt != "diffusers"]
    fmt = max(set(formats), key=formats.count) if formats else style
    layers: dict[tuple[str | None, str], RawLayer] = {}
    tokens: list[str] = []
    foreign: list[str] = []
    for key in keys:
        result = parsed.get(key)
        if result is None or result[0] != style:
            token = _token_of(key, style)
            if token is None:
                foreign.append(key)
            elif token not in tokens:
                tokens.append(token)
            continue
        layer_id, role = result[2], result[3]
        layers.setdefault(layer_id, RawLayer(layer_id[0], layer_id[1])).keys[role] = key
    return ParsedLora(style, fmt, layers, tokens, foreign)


def _matrix(
    shapes: Mapping[str, Shape], layer: RawLayer, full: str, a: str, b: str
) -> tuple[Shape, int | None]:
    """The (out, flat-in[, kh, kw]) shape of a factor stored whole or as ``a @ b``, and its rank."""
    if full in layer.keys:
        shape = shapes[layer.keys[full]]
        if len(shape) not in (2, 4):
            raise ShapeError(full)
        return shape, None
    if a not in layer.keys or b not in layer.keys:
        raise ShapeError(f"{a}/{b} missing")
    shape_a, shape_b = shapes[layer.keys[a]], shapes[layer.keys[b]]
    if len(shape_a) != 2 or len(shape_b) < 2 or shape_a[1] != shape_b[0]:
        raise ShapeError(f"{a}/{b} do not chain")
    return (shape_a[0], math.prod(shape_b[1:])), shape_b[0]


def _lora_dims(shapes: Mapping[str, Shape], layer: RawLayer) -> LayerDims:
    if "down" not in layer.keys or "up" not in layer.keys:
        raise ShapeError("down/up missing")
    down, up = shapes[layer.keys["down"]], shapes[layer.keys["up"]]
    if len(down) not in (2, 4) or len(up) not in (2, 4) or up[1] != down[0] or up[2:] not in ((), (1, 1)):
        raise ShapeError("down/up do not chain")
    kernel = (down[2], down[3]) if len(down) == 4 else None
    return LayerDims(out=up[0], flat_in=math.prod(down[1:]), rank=down[0], kernel=kernel)


def _lokr_dims(shapes: Mapping[str, Shape], layer: RawLayer) -> LayerDims:
    w1, rank_1 = _matrix(shapes, layer, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
    w2, rank_2 = _matrix(shapes, layer, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    if len(w1) != 2:
        raise ShapeError("lokr_w1 must be a matrix")
    kernel = (w2[2], w2[3]) if len(w2) == 4 else None
    rank = rank_2 if rank_2 is not None else rank_1
    return LayerDims(out=w1[0] * w2[0], flat_in=w1[1] * math.prod(w2[1:]), rank=rank, kernel=kernel)


def _loha_dims(shapes: Mapping[str, Shape], layer: RawLayer) -> LayerDims:
    w1, rank = _matrix(shapes, layer, "", "hada_w1_a", "hada_w1_b")
    w2, _ = _matrix(shapes, layer, "", "hada_w2_a", "hada_w2_b")
    if w1 != w2:
        raise ShapeError("hada_w1 and hada_w2 differ in shape")
    return LayerDims(out=w1[0], flat_in=w1[1], rank=rank)


def layer_dims(shapes: Mapping[str, Shape], layer: RawLayer) -> LayerDims:
    """The widths a layer's tensors imply.

    Raises:
        ShapeError: The tensors are missing or do not chain.
    """
    measure = {"lokr": _lokr_dims, "loha": _loha_dims}.get(layer.algo, _lora_dims)
    dims = measure(shapes, layer)
    core_key = next((layer.keys[role] for role in _TUCKER_CORES if role in layer.keys), None)
    if core_key is None:
        return dims
    core = shapes[core_key]  # a Tucker core (rank, rank, kh, kw) carries the convolution's kernel
    if len(core) != 4:
        raise ShapeError("a Tucker core must have four dimensions")
    return LayerDims(dims.out, dims.flat_in * core[2] * core[3], dims.rank, (core[2], core[3]))


def _cloneofsimo_orders(table: LayerTable, component: str, count: int) -> list[list[str]]:
    """Candidate module lists for cloneofsimo indices: old diffusers order first, then today's."""
    if component != "unet":
        layers = table.text_layers.get(component, 0)
        attention = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"]
        per_layer = attention if count == 4 * layers else [*attention, "mlp.fc1", "mlp.fc2"]
        return [[f"encoder.layers.{i}.{m}" for i in range(layers) for m in per_layer]]
    attn1 = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    attn2 = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    ff = ["ff.net.0.proj"]
    orders = [attn1 + ff + attn2, attn1 + attn2 + ff, attn1 + attn2]
    return [[f"{block}.{m}" for block in table.attention_blocks for m in order] for order in orders]


def _resolve_cloneofsimo(
    parsed: ParsedLora, dims: Mapping[tuple[str | None, str], LayerDims], table: LayerTable
) -> dict[tuple[str | None, str], LayerTarget] | None:
    resolved: dict[tuple[str | None, str], LayerTarget] = {}
    for component in {layer_id[0] for layer_id in parsed.layers}:
        ids = [layer_id for layer_id in parsed.layers if layer_id[0] == component]
        for order in _cloneofsimo_orders(table, str(component), len(ids)):
            if len(order) != len(ids):
                continue
            targets = {i: table.modules.get((str(component), order[int(i[1])])) for i in ids}
            if all(t is not None and dims[i].fits(t) for i, t in targets.items()):
                resolved.update({i: t for i, t in targets.items() if t is not None})
                break
        else:
            return None
    return resolved


def _resolve_one(layer: RawLayer, style: str, table: LayerTable, dims: LayerDims) -> LayerTarget | None:
    if style == "kohya":
        candidates = [table.aliases.get(layer.name)]
    elif layer.component is None:
        candidates = [table.modules.get((c, layer.name)) for c in TEXT_COMPONENTS]
    else:
        candidates = [table.modules.get((layer.component, layer.name))]
    return next((t for t in candidates if t is not None and dims.fits(t)), None)


def resolve_layers(
    parsed: ParsedLora, dims: Mapping[tuple[str | None, str], LayerDims], table: LayerTable
) -> dict[tuple[str | None, str], LayerTarget] | None:
    """Every layer's target in one family's model, or ``None`` if any layer fits none."""
    if parsed.style == "cloneofsimo":
        return _resolve_cloneofsimo(parsed, dims, table)
    resolved: dict[tuple[str | None, str], LayerTarget] = {}
    for layer_id, layer in parsed.layers.items():
        target = _resolve_one(layer, parsed.style, table, dims[layer_id])
        if target is None:
            return None
        resolved[layer_id] = target
    return resolved


def resolve_for(
    parsed: ParsedLora, shapes: Mapping[str, Shape], target: Family | ModelTarget | LayerTable
) -> dict[tuple[str | None, str], LayerTarget] | None:
    """Every layer's target in a model from shapes alone; ``None`` when it does not fit.

    ``target`` is a family (its canonical shapes), a model target or a layer table.
    """
    try:
        dims = {layer_id: layer_dims(shapes, layer) for layer_id, layer in parsed.layers.items()}
    except ShapeError:
        return None
    if isinstance(target, ModelTarget):
        table = layer_table_for(target)
    elif isinstance(target, LayerTable):
        table = target
    else:
        table = layer_table(Family(target))
    return resolve_layers(parsed, dims, table)
