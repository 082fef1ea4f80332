"""What one job asks for (:class:`JobSpec`) and the checks it must pass before anything is stored."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from pipelines.samplers import DEFAULT_SAMPLER, check_sampler
from storage.errors import InvalidRequestError

__all__ = [
    "LIMITS",
    "JobKind",
    "JobSpec",
    "Limits",
    "check_spec",
    "resolve_seed",
]

MAX_SEED = 2**32 - 1


class JobKind(StrEnum):
    txt2img = "txt2img"


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
    user_id: int | None = None
    guild_id: int | None = None
    channel_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"Unknown job option(s): {', '.join(sorted(unknown))}.")
        values = dict(data)
        if "kind" in values:
            values["kind"] = JobKind(values["kind"])
        return cls(**values)

    def seeds(self) -> list[int]:
        """One seed per image: the webui's rule, ``seed + i`` for image ``i`` of a batch."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch)]


def resolve_seed(seed: int, rng: random.Random | None = None) -> int:
    """``-1`` becomes a random seed (always recorded); any other value is kept."""
    if seed == -1:
        return (rng or random.SystemRandom()).randint(0, MAX_SEED)
    return seed


def _check_int(name: str, value: object, low: int, high: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be a whole number between {low} and {high}.")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, not {value}.{hint}")


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
    if not isinstance(spec.prompt, str) or not spec.prompt.strip():
        raise InvalidRequestError("The prompt is empty; describe what you want to see.")
    for name, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"The {name} is {len(text):,} characters long; keep it under {limits.max_prompt_chars:,}."
            )
        if "\x00" in text:
            raise InvalidRequestError(f"The {name} contains a NUL character; remove it and try again.")


def check_spec(spec: JobSpec, limits: Limits = LIMITS) -> JobSpec:
    """Check every field a user can set; return the spec with its sampler name made canonical.

    Raises:
        InvalidRequestError: with one sentence naming the first bad field and its allowed range.
    """
    _check_text(spec, limits)
    _check_size(spec, limits)
    _check_int("Steps", spec.steps, 1, limits.max_steps)
    _check_int("Batch size", spec.batch, 1, limits.max_batch)
    _check_int("Clip skip", spec.clip_skip, 1, limits.max_clip_skip)
    _check_int("Seed", spec.seed, -1, MAX_SEED, " Use -1 for a random seed.")
    if (
        isinstance(spec.cfg, bool)
        or not isinstance(spec.cfg, int | float)
        or not 0 <= spec.cfg <= limits.max_cfg
    ):
        raise InvalidRequestError(f"CFG scale must be a number between 0 and {limits.max_cfg:g}.")
    return replace(spec, sampler=check_sampler(spec.sampler), cfg=float(spec.cfg))
