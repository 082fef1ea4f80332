"""Score a shapes pipeline: generate the evaluation prompts and read the images back with the scorer.

Usage::

    python -m models.shapes.evaluate DIR/pipeline [--n 100] [--guidance 3] [--steps 20] [--sweep] [--json]
        [--update-card]

Images are drawn at 64×64 with DPM-Solver++ 2M for :func:`models.shapes.scenes.eval_prompts` (complete
captions of single shapes on plain backgrounds; held-out (shape, colour) combinations included and also
reported apart), in a few batched pipeline calls with one seeded generator per image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from models.shapes._card import update_metrics
from models.shapes.scenes import eval_prompts, is_held_out
from models.shapes.scorer import accuracy, score_image

__all__ = ["SWEEP", "evaluate", "generate", "load_pipeline", "main", "metrics_markdown"]

log = logging.getLogger(__name__)

SWEEP = (2.0, 3.0, 5.0, 7.5)
_KEYS = ("colour", "shape", "position", "size", "background", "count")


def load_pipeline(path: Path | str, device: str = "cpu") -> StableDiffusionPipeline:
    """Load a saved pipeline offline (fp32) with a DPM-Solver++ 2M scheduler and no progress bars."""
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    *,
    guidance: float,
    steps: int,
    seed: int = 0,
    batch: int = 50,
) -> np.ndarray:
    """One 64×64 image per prompt (uint8 N×64×64×3); image ``i`` uses a CPU generator seeded ``seed + i``."""
    images = []
    for s in range(0, len(prompts), batch):
        chunk = list(prompts[s : s + batch])
        generators = [torch.Generator("cpu").manual_seed(seed + s + i) for i in range(len(chunk))]
        out = pipe(
            chunk,
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        )
        images.append((np.asarray(out.images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images)


def evaluate(
    pipe: StableDiffusionPipeline,
    n: int = 100,
    *,
    guidance: float = 3.0,
    steps: int = 20,
    seed: int = 0,
    batch: int = 50,
) -> dict[str, Any]:
    """Accuracy of the scorer's reading of generated images against the prompts' scenes.

    Returns ``guidance``, ``accuracy`` (colour, shape, position, size, background, count: fractions in
    [0, 1]), ``held_out`` (the same over prompts with a held-out combination, with their count ``n``) and
    ``seconds`` (generation and scoring).
    """
    started = time.monotonic()
    pairs = eval_prompts(n)
    images = generate(pipe, [p for p, _ in pairs], guidance=guidance, steps=steps, seed=seed, batch=batch)
    readings = [score_image(im) for im in images]
    scenes = [scene for _, scene in pairs]
    held = [i for i, scene in enumerate(scenes) if is_held_out(scene)]
    held_acc = accuracy([readings[i] for i in held], [scenes[i] for i in held]) if held else None
    result = {
        "guidance": guidance,
        "accuracy": accuracy(readings, scenes),
        "held_out": {"n": len(held), "accuracy": held_acc},
        "seconds": round(time.monotonic() - started, 2),
    }
    log.info("guidance %.1f: %s (%.1f s)", guidance, result["accuracy"], result["seconds"])
    return result


def metrics_markdown(report: dict[str, Any]) -> str:
    """A markdown table of an :func:`main` report (the main run and any sweep), for the model card."""
    runs = [report, *report.get("sweep", [])]
    head = "| guidance | " + " | ".join(_KEYS) + " | held-out colour | held-out shape |"
    lines = [
        f"Scorer accuracy on {report['n']} evaluation prompts (`eval_prompts`), {report['steps']} "
        f"DPM-Solver++ steps, 64×64, seeds {report['seed']}.., `python -m models.shapes.evaluate`:",
        "",
        head,
        "|" + " --- |" * (len(_KEYS) + 3),
    ]
    for run in runs:
        held = run["held_out"]["accuracy"] or {}
        cells = [f"{run['accuracy'][k]:.0%}" for k in _KEYS]
        cells += [f"{held[k]:.0%}" if k in held else "–" for k in ("colour", "shape")]
        lines.append(f"| {run['guidance']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.shapes.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("pipeline", type=Path)
    p.add_argument("--n", type=int, default=100, help="evaluation prompts")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=50, help="images per pipeline call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sweep", action="store_true", help=f"also try guidance {', '.join(map(str, SWEEP))}")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--update-card", action="store_true", help="write the table into the pipeline's README.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: prints the report (JSON with ``--json``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = _parse(sys.argv[1:] if argv is None else argv)
    pipe = load_pipeline(args.pipeline, args.device)
    kwargs = {"n": args.n, "steps": args.steps, "seed": args.seed, "batch": args.batch}
    report: dict[str, Any] = {
        "pipeline": str(args.pipeline),
        "n": args.n,
        "steps": args.steps,
        "seed": args.seed,
    }
    report |= evaluate(pipe, guidance=args.guidance, **kwargs)
    if args.sweep:
        report["sweep"] = [evaluate(pipe, guidance=g, **kwargs) for g in SWEEP if g != args.guidance]
    table = metrics_markdown(report)
    if args.update_card:
        update_metrics(args.pipeline / "README.md", table)
    sys.stdout.write((json.dumps(report, indent=2) if args.json else table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
