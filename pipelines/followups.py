"""New jobs made from a finished one: reroll, variations, upscale, remix, use as init.

The result buttons of a job carry only its id; after a restart the bot reads the stored spec back and
builds the next job here (no Discord in this module). The new job belongs to whoever pressed the
button: its adapters are resolved again for that user, so a private LoRA of someone else is refused.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, TypedDict, Unpack

from pipelines.jobs import JobKind, JobSpec
from pipelines.prompts import extract_networks
from storage.errors import InvalidRequestError

__all__ = [
    "STRENGTHS",
    "Who",
    "for_user",
    "spec_from_parameters",
    "remix_spec",
    "reroll_spec",
    "upscale_spec",
    "variation_spec",
]


class Who(TypedDict):
    """Who asks for the new job, and where."""

    user_id: int | None
    guild_id: int | None
    channel_id: int | None


#: Denoising strength of a subtle and a strong variation (img2img of the chosen image).
STRENGTHS = {"subtle": 0.35, "strong": 0.65}
#: The webui's "Size: 512x768", ASCII digits only (`str.isdigit` takes "²"; 5,000 digits fail `int()`).
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})", re.ASCII)


def for_user(spec: JobSpec, user_id: int | None, guild_id: int | None, channel_id: int | None) -> JobSpec:
    """The spec as a new request of another user: a fresh seed, adapters to resolve again."""
    return replace(spec, user_id=user_id, guild_id=guild_id, channel_id=channel_id, adapters=(), seed=-1)


def reroll_spec(spec: JobSpec, **who: Unpack[Who]) -> JobSpec:
    """The same request with a new seed."""
    return for_user(spec, **who)


def _from_image(spec: JobSpec, kind: JobKind, **changes: Any) -> JobSpec:
    """A job on one result image (the caller passes the image as the job's init input)."""
    base = for_user(spec, **_who(changes))
    return replace(
        base,
        kind=kind,
        init_image=None,
        mask_image=None,
        controls=(),
        hires_scale=0.0,
        width=0,
        height=0,
        batch=1,
        **changes,
    )


def _who(changes: dict[str, Any]) -> dict[str, Any]:
    return {key: changes.pop(key) for key in ("user_id", "guild_id", "channel_id")}


def variation_spec(spec: JobSpec, strength_name: str, **who: Unpack[Who]) -> JobSpec:
    """img2img of one result image (the init input) with the same prompt, subtly or strongly."""
    if strength_name not in STRENGTHS:
        raise InvalidRequestError(f"There is no {strength_name!r} variation; use subtle or strong.")
    return _from_image(spec, JobKind.img2img, strength=STRENGTHS[strength_name], **dict(who))


def upscale_spec(
    spec: JobSpec, *, scale: float = 2.0, upscaler: str | None = None, **who: Unpack[Who]
) -> JobSpec:
    """One result image (the init input) enlarged by the default (or a named) upscaler.

    The prompts stay (the x4 upscaler reads them) without their ``<lora:…>``/``<hypernet:…>`` tags, and
    the VAE goes: an upscale applies no adapters, so a job that used some can still be upscaled.
    """
    return _from_image(
        spec,
        JobKind.upscale,
        scale=scale,
        upscaler=upscaler,
        prompt=_without_networks(spec.prompt),
        negative_prompt=_without_networks(spec.negative_prompt),
        vae=None,
        **dict(who),
    )


def _without_networks(text: str) -> str:
    """``text`` without extra-network tags, spaces tidied (a tag the parser refuses stays: it is refused
    with its own sentence when the job is checked)."""
    try:
        stripped = extract_networks(text)[0]
    except InvalidRequestError:
        return text
    return " ".join(stripped.split())


def remix_spec(spec: JobSpec, changes: dict[str, str], **who: Unpack[Who]) -> JobSpec:
    """The request with fields edited in the Remix form (text values, checked here)."""
    values: dict[str, Any] = {}
    if "prompt" in changes:
        values["prompt"] = changes["prompt"]
    if "negative" in changes:
        values["negative_prompt"] = changes["negative"]
    for name, field, kind in (("steps", "steps", int), ("cfg", "cfg", float), ("seed", "seed", int)):
        text = changes.get(name, "").strip()
        if not text:
            continue
        try:
            values[field] = kind(text)
        except ValueError:
            raise InvalidRequestError(f"{name.capitalize()} must be a number, not {text!r}.") from None
    remixed = for_user(spec, **who)
    if "seed" in values:
        remixed = replace(remixed, seed=values.pop("seed"))
    return replace(remixed, **values)


def spec_from_parameters(
    prompt: str, negative: str, parameters: dict[str, str], **who: Unpack[Who]
) -> JobSpec:
    """A txt2img request from another tool's parameters (``/pnginfo`` → "Remix with these").

    Settings this bot cannot use (an unknown sampler, an odd size) fall back to the defaults; the form
    that follows lets the user check them.
    """
    from pipelines.samplers import SAMPLERS

    values: dict[str, Any] = {}
    for label, field_name, kind in (
        ("Steps", "steps", int),
        ("CFG scale", "cfg", float),
        ("Seed", "seed", int),
    ):
        try:
            values[field_name] = kind(parameters[label])
        except (KeyError, ValueError):
            continue
    if parameters.get("Sampler") in SAMPLERS:
        values["sampler"] = parameters["Sampler"]
    size = _SIZE.fullmatch(parameters.get("Size", ""))
    if size and int(size[1]) % 8 == 0 and int(size[2]) % 8 == 0:
        values["width"], values["height"] = int(size[1]), int(size[2])
    return JobSpec(prompt=prompt, negative_prompt=negative, **values, **who)
