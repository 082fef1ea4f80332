"""What one job asks for (:class:`JobSpec`) and the checks it must pass before anything is stored."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from pipelines.prompt_chunks import check_prompt
from pipelines.samplers import DEFAULT_SAMPLER, check_sampler
from storage.errors import InvalidRequestError, echo

__all__ = [
    "CONTROL_TYPES",
    "LIMITS",
    "MAX_SEED",
    "AdapterRef",
    "ControlUnit",
    "JobKind",
    "JobSpec",
    "Limits",
    "check_spec",
    "resolve_seed",
]

MAX_SEED = 2**32 - 1


class JobKind(StrEnum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    erase = "erase"
    controlnet = "controlnet"
    upscale = "upscale"


#: Control types: how a control image becomes the map a ControlNet reads ("none": it already is one).
CONTROL_TYPES = ("scribble", "canny", "depth", "pose", "lineart", "none")
ERASE_METHODS = ("telea", "ns")
RESIZE_MODES = ("crop", "fit", "fill")
#: Modes that work without a prompt (erase fills from the surroundings; an upscale prompt only guides).
PROMPT_OPTIONAL = frozenset({JobKind.erase, JobKind.upscale})


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit: a control image, its type, and how strongly and when it steers."""

    type: str
    image: str | None = None  # sha256 of the stored control image; the engine sets it
    weight: float = 1.0
    start: float = 0.0  # guidance start, a fraction of the steps
    end: float = 1.0  # guidance end
    model: str | None = None  # a ControlNet name; None: the default for the type and the model's family
    low: int = 100  # canny thresholds
    high: int = 200

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlUnit:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"Unknown ControlNet option(s): {', '.join(sorted(unknown))}.")
        return cls(**data)


@dataclass(frozen=True)
class AdapterRef:
    """A user's adapter resolved for one job: which stored file, under which name, how strongly.

    ``kind`` is an asset kind (``lora``, ``embedding``, ``hypernetwork``, ``vae``); the engine fills these
    from the prompt's tags, the embedding names it uses and the ``vae`` option, so a stored job names the
    exact bytes it ran with.
    """

    kind: str
    name: str
    sha256: str
    short_hash: str
    format: str = ""
    weight: float = 1.0
    te_weight: float | None = None  # a LoRA's text-encoder multiplier when it differs from ``weight``
    unet_weight: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterRef:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"Unknown adapter option(s): {', '.join(sorted(unknown))}.")
        return cls(**data)


@dataclass(frozen=True)
class Limits:
    """Bounds every request is checked against (admins may tighten them later, per guild)."""

    min_size: int = 64
    max_size: int = 2048
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_batch: int = 4
    max_cfg: float = 30.0
    max_prompt_chars: int = 4000
    max_clip_skip: int = 12
    max_controls: int = 3
    max_upscale_pixels: int = 4096 * 4096
    max_adapters: int = 8  # LoRAs, hypernetworks and embeddings in one job
    max_network_weight: float = 5.0


LIMITS = Limits()


@dataclass(frozen=True)
class JobSpec:
    """A generation request, as stored in the ``jobs.spec`` JSON. Field names follow the webui's terms.

    ``width``/``height``/``steps`` of 0 and ``seed`` of -1 mean "use the default" / "random"; the engine
    resolves them before the job is stored, so a stored spec is always complete and reproducible.
    """

    prompt: str
    negative_prompt: str = ""
    kind: JobKind = JobKind.txt2img
    model: str | None = None
    width: int = 0
    height: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    seed: int = -1
    batch: int = 1
    clip_skip: int = 1
    # image-conditioned modes: inputs are stored content-addressed, referenced here by sha256
    init_image: str | None = None
    mask_image: str | None = None
    strength: float = 0.75  # denoising strength (img2img, inpaint, ControlNet with an init image)
    resize_mode: str = "crop"
    mask_blur: int = 4
    only_masked: bool = False  # the webui's "inpaint area: only masked"
    masked_padding: int = 32
    erase_method: str = "telea"
    erase_denoise: float = 0.0  # strength of an optional diffusion pass over the erased area
    controls: tuple[ControlUnit, ...] = ()
    upscaler: str | None = None  # upscale mode: an upscaler name; None: the default one
    scale: float = 4.0
    noise_level: int = 20  # the x4 latent upscaler's noise level
    hires_scale: float = 0.0  # txt2img hires fix: 0 is off
    hires_steps: int = 0  # 0: as many as ``steps``
    hires_upscaler: str = "Latent"
    hires_denoise: float = 0.7
    vae: str | None = None  # a VAE asset's name; None: the model's own
    adapters: tuple[AdapterRef, ...] = ()  # resolved by the engine from the prompts and ``vae``
    user_id: int | None = None
    guild_id: int | None = None
    channel_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        data["controls"] = [asdict(unit) for unit in self.controls]
        data["adapters"] = [asdict(ref) for ref in self.adapters]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"Unknown job option(s): {', '.join(sorted(unknown))}.")
        values = dict(data)
        if "kind" in values:
            try:
                values["kind"] = JobKind(values["kind"])
            except ValueError:
                kinds = ", ".join(k.value for k in JobKind)
                raise InvalidRequestError(
                    f"There is no mode called {echo(str(values['kind']))!r}; use one of {kinds}."
                ) from None
        if "controls" in values:
            values["controls"] = tuple(
                u if isinstance(u, ControlUnit) else ControlUnit.from_dict(u) for u in values["controls"]
            )
        if "adapters" in values:
            values["adapters"] = tuple(
                a if isinstance(a, AdapterRef) else AdapterRef.from_dict(a) for a in values["adapters"]
            )
        return cls(**values)

    def adapters_of(self, kind: str) -> tuple[AdapterRef, ...]:
        """The resolved adapters of one kind, in prompt order."""
        return tuple(ref for ref in self.adapters if ref.kind == kind)

    @property
    def output_size(self) -> tuple[int, int]:
        """Width and height of the images this job returns (hires fix and upscale enlarge)."""
        if self.kind == JobKind.txt2img and self.hires_scale:
            return _round8(self.width * self.hires_scale), _round8(self.height * self.hires_scale)
        if self.kind == JobKind.upscale:
            return round(self.width * self.scale), round(self.height * self.scale)
        return self.width, self.height

    def seeds(self) -> list[int]:
        """One seed per image: the webui's rule, ``seed + i`` for image ``i`` of a batch."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch)]


def _round8(value: float) -> int:
    return max(8, int(value) // 8 * 8)


def resolve_seed(seed: int, rng: random.Random | None = None) -> int:
    """``-1`` becomes a random seed (always recorded); any other value is kept."""
    if seed == -1:
        return (rng or random.SystemRandom()).randint(0, MAX_SEED)
    return seed


def _check_int(name: str, value: object, low: int, high: int, low_label: str = "") -> None:
    bounds = f"between {low_label or low} and {high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be a whole number {bounds}.")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be {bounds}, not {value}.")


def _check_size(spec: JobSpec, limits: Limits) -> None:
    for name, value in (("Width", spec.width), ("Height", spec.height)):
        _check_int(name, value, limits.min_size, limits.max_size)
        if value % 8:
            lower, upper = value - value % 8, value - value % 8 + 8
            raise InvalidRequestError(
                f"{name} must be a multiple of 8; {value} is not — try {lower} or {upper}."
            )
    if spec.width * spec.height > limits.max_pixels:
        raise InvalidRequestError(
            f"{spec.width}×{spec.height} is too many pixels; "
            f"keep width × height at most {limits.max_pixels:,}."
        )


def _check_text(spec: JobSpec, limits: Limits) -> None:
    if not isinstance(spec.prompt, str) or not isinstance(spec.negative_prompt, str):
        raise InvalidRequestError("The prompt must be text.")
    if spec.kind not in PROMPT_OPTIONAL and not spec.prompt.strip():
        raise InvalidRequestError("The prompt is empty; describe what you want to see.")
    for name, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"The {name} is {len(text):,} characters long; keep it under {limits.max_prompt_chars:,}."
            )
        if "\x00" in text:
            raise InvalidRequestError(f"The {name} contains a NUL character; remove it and try again.")


def _check_fraction(name: str, value: object, low: float = 0.0, high: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequestError(f"{name} must be a number between {low:g} and {high:g}.")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidRequestError(
            f"There is no {name} called {echo(str(value))!r}; use one of {', '.join(choices)}."
        )


def _check_control(index: int, unit: ControlUnit) -> None:
    label = f"ControlNet unit {index + 1}"
    _check_choice("control type", unit.type, CONTROL_TYPES)
    _check_fraction(f"{label}: the weight", unit.weight, 0.0, 2.0)
    _check_fraction(f"{label}: the guidance start", unit.start)
    _check_fraction(f"{label}: the guidance end", unit.end)
    if unit.start >= unit.end:
        raise InvalidRequestError(f"{label}: the guidance start must come before its end.")
    _check_int(f"{label}: the low threshold", unit.low, 1, 254)
    _check_int(f"{label}: the high threshold", unit.high, unit.low + 1, 255)


def _check_modes(spec: JobSpec, limits: Limits) -> None:
    """The options of the image-conditioned modes, hires fix and upscaling."""
    _check_fraction("Denoising strength", spec.strength, 0.01, 1.0)
    _check_choice("resize mode", spec.resize_mode, RESIZE_MODES)
    _check_int("Mask blur", spec.mask_blur, 0, 64)
    _check_int("Masked padding", spec.masked_padding, 0, 256)
    _check_choice("erase method", spec.erase_method, ERASE_METHODS)
    _check_fraction("The erase diffusion strength", spec.erase_denoise)
    if spec.controls and spec.kind != JobKind.controlnet:
        raise InvalidRequestError("Control images need the controlnet mode; choose it or drop them.")
    if spec.kind == JobKind.controlnet and not spec.controls:
        raise InvalidRequestError("The controlnet mode needs at least one control image.")
    if len(spec.controls) > limits.max_controls:
        raise InvalidRequestError(f"Use at most {limits.max_controls} ControlNet units at once.")
    for index, unit in enumerate(spec.controls):
        _check_control(index, unit)
    _check_fraction("Upscale factor", spec.scale, 1.0, 4.0)
    _check_int("Noise level", spec.noise_level, 0, 350)
    if spec.hires_scale and spec.kind != JobKind.txt2img:
        raise InvalidRequestError("Hires fix applies to text-to-image only; drop it for this mode.")
    if spec.hires_scale:
        _check_fraction("Hires upscale", spec.hires_scale, 1.0, 4.0)
        _check_int("Hires steps", spec.hires_steps, 0, limits.max_steps)
        _check_fraction("Hires denoising strength", spec.hires_denoise, 0.01, 1.0)
        width, height = spec.output_size
        if max(width, height) > limits.max_size or width * height > limits.max_pixels:
            raise InvalidRequestError(
                f"Hires fix would make {width}×{height}; lower the hires upscale or the size."
            )


def _check_upscale_size(spec: JobSpec, limits: Limits) -> None:
    width, height = spec.output_size
    if width * height > limits.max_upscale_pixels:
        raise InvalidRequestError(
            f"Upscaling {spec.width}×{spec.height} by {spec.scale:g} makes {width}×{height}; "
            f"keep the result under {limits.max_upscale_pixels // 1_000_000} megapixels."
        )


def check_spec(spec: JobSpec, limits: Limits = LIMITS) -> JobSpec:
    """Check every field a user can set; return the spec with its sampler name made canonical.

    Raises:
        InvalidRequestError: with one sentence naming the first bad field and its allowed range.
    """
    _check_text(spec, limits)
    if spec.kind == JobKind.upscale:
        _check_upscale_size(spec, limits)
    else:
        _check_size(spec, limits)
    _check_modes(spec, limits)
    _check_int("Steps", spec.steps, 1, limits.max_steps)
    _check_int("Batch size", spec.batch, 1, limits.max_batch)
    _check_int("Clip skip", spec.clip_skip, 1, limits.max_clip_skip)
    _check_int("Seed", spec.seed, -1, MAX_SEED, "-1 (random)")
    if (
        isinstance(spec.cfg, bool)
        or not isinstance(spec.cfg, int | float)
        or not 0 <= spec.cfg <= limits.max_cfg
    ):
        raise InvalidRequestError(f"CFG scale must be a number between 0 and {limits.max_cfg:g}.")
    for name, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)):
        check_prompt(text, spec.steps, name)  # after the steps: prompt editing runs over them
    return replace(spec, sampler=check_sampler(spec.sampler), cfg=float(spec.cfg))
