"""``dreamcord generate`` (every mode) and ``dreamcord preprocess``: options -> spec and files -> engine."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipelines.jobs import ControlUnit, JobKind, JobSpec
from storage.errors import BotError, InvalidRequestError

__all__ = ["add_generate", "add_preprocess", "parse_control"]

_MODES = [k.value for k in JobKind]


class FileError(BotError):
    """An input file named on the command line cannot be read."""


def _add_mode_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image-conditioned modes")
    g.add_argument("--mode", choices=_MODES, default="txt2img")
    g.add_argument(
        "--init", type=Path, help="init image (img2img, inpaint, erase, upscale; optional for controlnet)"
    )
    g.add_argument(
        "--mask", type=Path, help="mask image, white = repaint (default: the init's transparent areas)"
    )
    g.add_argument("--strength", type=float, default=None, help="denoising strength 0-1 (default 0.75)")
    g.add_argument("--resize-mode", choices=["crop", "fit", "fill"], default=None)
    g.add_argument("--mask-blur", type=int, default=None, help="pixels (default 4)")
    g.add_argument("--only-masked", action="store_true", help="inpaint the masked area at full resolution")
    g.add_argument("--padding", type=int, default=None, help="only-masked padding in pixels (default 32)")
    g.add_argument("--erase-method", choices=["telea", "ns"], default=None)
    g.add_argument("--erase-denoise", type=float, default=None, help="diffusion pass after erase, 0 = none")
    g.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="TYPE:PATH[:WEIGHT[:START:END]]",
        help="a ControlNet unit (repeat for several): scribble, canny, depth, pose, lineart or none",
    )
    g.add_argument(
        "--control-model", action="append", default=[], help="ControlNet name per --control, in order"
    )
    g.add_argument("--canny-low", type=int, default=100)
    g.add_argument("--canny-high", type=int, default=200)
    g.add_argument("--upscaler", default=None, help="upscale mode: an upscaler name (default: the first one)")
    g.add_argument("--scale", type=float, default=None, help="upscale factor, 1-4 (default 4)")
    g.add_argument(
        "--noise-level", type=int, default=None, help="x4 latent upscaler noise level (default 20)"
    )
    g.add_argument("--hires", type=float, default=None, metavar="SCALE", help="txt2img hires fix: upscale by")
    g.add_argument("--hires-steps", type=int, default=None, help="hires pass steps (0 = as many as --steps)")
    g.add_argument("--hires-upscaler", default=None, help="Latent (default), Lanczos or an upscaler name")
    g.add_argument("--denoise", type=float, default=None, help="hires pass denoising strength (default 0.7)")


def add_generate(sub: Any, handler: Any) -> None:
    p = sub.add_parser("generate", help="generate images (txt2img and every other mode)")
    p.add_argument("--prompt", default="", help="what to draw (optional for erase and upscale)")
    p.add_argument("--negative", default="")
    p.add_argument("--model", default=None, help="a model name from `dreamcord models list`")
    p.add_argument("--width", type=int, default=0, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale, 0-30")
    p.add_argument("--sampler", default="DPM++ 2M Karras", help="a webui sampler name, e.g. 'Euler a'")
    p.add_argument("--seed", type=int, default=-1, help="-1 for a random seed (always recorded)")
    p.add_argument("--batch", type=int, default=1, help="images, 1-4")
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--vae", default=None, help="a VAE asset's name (default: the model's own)")
    p.add_argument("--user", type=int, default=None, help="generate as this Discord user (their assets)")
    p.add_argument("--guild", type=int, default=None, help="in this guild (its shared assets)")
    _add_mode_options(p)
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNGs (default ./out)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--no-wait", action="store_true", help="only queue the job (for `dreamcord worker` or the bot to run)"
    )
    p.set_defaults(func=handler)


def add_preprocess(sub: Any, handler: Any) -> None:
    p = sub.add_parser("preprocess", help="write the control map a ControlNet unit would see")
    p.add_argument("type", help="scribble, canny, depth, pose, lineart or none")
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--low", type=int, default=100, help="canny low threshold")
    p.add_argument("--high", type=int, default=200, help="canny high threshold")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handler)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FileError(f"Cannot read the {what} {path}: {exc.strerror or exc}.") from exc


def _float(text: str, what: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(f"The {what} in --control {spec!r} is not a number.") from None


def parse_control(text: str) -> tuple[ControlUnit, Path]:
    """``TYPE:PATH[:WEIGHT[:START:END]]`` -> a unit (image not yet stored) and the image path.

    Numbers are taken from the end, so a path may itself contain ``:``.
    """
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise InvalidRequestError(f"--control {text!r} should look like TYPE:PATH[:WEIGHT[:START:END]].")
    parts = rest.split(":")
    numbers: list[str] = []
    while len(parts) > 1 and len(numbers) < 3 and parts[-1].replace(".", "", 1).isdigit():
        numbers.insert(0, parts.pop())
    if len(numbers) == 2:
        raise InvalidRequestError(f"--control {text!r}: give a weight, or a weight with both start and end.")
    values = [_float(n, name, text) for n, name in zip(numbers, ("weight", "start", "end"), strict=False)]
    unit = ControlUnit(type=kind.strip().lower(), weight=values[0] if values else 1.0)
    if len(values) == 3:
        unit = ControlUnit(type=unit.type, weight=values[0], start=values[1], end=values[2])
    return unit, Path(":".join(parts))


def _mode_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given, so the spec's own defaults stay the one source of defaults."""
    names = {
        "strength": "strength",
        "resize_mode": "resize_mode",
        "mask_blur": "mask_blur",
        "padding": "masked_padding",
        "erase_method": "erase_method",
        "erase_denoise": "erase_denoise",
        "upscaler": "upscaler",
        "scale": "scale",
        "noise_level": "noise_level",
        "hires": "hires_scale",
        "hires_steps": "hires_steps",
        "hires_upscaler": "hires_upscaler",
        "denoise": "hires_denoise",
    }
    values = {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}
    if args.only_masked:
        values["only_masked"] = True
    return values


def build_request(args: argparse.Namespace) -> tuple[JobSpec, Any]:
    """The spec and the input files the options describe (files are read, not yet checked)."""
    from pipelines.inputs import JobInputs

    units: list[ControlUnit] = []
    control_bytes: list[bytes] = []
    if len(args.control_model) > len(args.control):
        raise InvalidRequestError("There are more --control-model names than --control units.")
    for index, text in enumerate(args.control):
        unit, path = parse_control(text)
        model = args.control_model[index] if index < len(args.control_model) else None
        units.append(
            ControlUnit(
                unit.type, None, unit.weight, unit.start, unit.end, model, args.canny_low, args.canny_high
            )
        )
        control_bytes.append(_read(path, f"control image {index + 1}") or b"")
    spec = JobSpec(
        prompt=args.prompt,
        negative_prompt=args.negative,
        kind=JobKind(args.mode),
        model=args.model,
        width=args.width,
        height=args.height,
        steps=args.steps,
        cfg=args.cfg,
        sampler=args.sampler,
        seed=args.seed,
        batch=args.batch,
        clip_skip=args.clip_skip,
        vae=args.vae,
        user_id=args.user,
        guild_id=args.guild,
        controls=tuple(units),
        **_mode_fields(args),
    )
    inputs = JobInputs(
        init=_read(args.init, "init image"), mask=_read(args.mask, "mask"), controls=tuple(control_bytes)
    )
    return spec, inputs


async def _generate(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from pipelines.engine import Engine
    from pipelines.settings import load_settings

    spec, inputs = build_request(args)
    if args.no_wait:
        async with Engine(load_settings(), start_worker=False) as engine:
            submitted, notes = await engine.submit(spec, inputs)
        return {
            "job": {"id": submitted.job_id},
            "position": submitted.position,
            "eta_s": submitted.eta_s,
            "notes": notes,
        }
    async with Engine(load_settings()) as engine:
        engine.prepare(spec, inputs)  # bad input fails here, before any notice or work
        if args.model is None and engine.registry.using_builtin_default and spec.kind != JobKind.upscale:
            name = engine.registry.default_name
            print(f"No model is configured; using the built-in {name} model.", file=sys.stderr)
        result = await engine.generate(spec, on_step=progress, inputs=inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    images = []
    for image in result.images:
        target = args.out / f"job{result.job_id}-{image.index}-{image.seed}.png"
        shutil.copyfile(image.path, target)
        images.append({"path": str(target), "seed": image.seed, "width": image.width, "height": image.height})
    previews = []
    for index, preview in enumerate(result.previews):
        target = args.out / f"job{result.job_id}-preview{index}.png"
        shutil.copyfile(preview.path, target)
        previews.append({"label": preview.label, "path": str(target)})
    return {
        "job": {"id": result.job_id, **result.spec.to_dict()},
        "images": images,
        "previews": previews,
        "notes": result.notes,
        "seconds": result.seconds,
    }


def run_generate(args: argparse.Namespace, progress: Any) -> int:
    payload = asyncio.run(_generate(args, progress))
    if args.json:
        print(json.dumps(payload))
        return 0
    if args.no_wait:
        print(f"Queued as job {payload['job']['id']}, position {payload['position']}.")
        return 0
    for note in payload["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for image in payload["images"]:
        print(f"{image['path']}  seed {image['seed']}  {image['width']}x{image['height']}")
    for preview in payload["previews"]:
        print(f"{preview['path']}  ({preview['label']})")
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    from pipelines.preprocess import preprocess_file

    out = preprocess_file(args.type, args.image, args.out, args.low, args.high)
    if args.json:
        print(json.dumps({"type": args.type, "path": str(out)}))
    else:
        print(f"{args.type} map written to {out}")
    return 0
