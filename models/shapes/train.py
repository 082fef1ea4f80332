"""Train the shapes model family's latent diffusion model, resumably, and save a diffusers pipeline.

Usage::

    python -m models.shapes.train --stage vae|unet|all|inpaint|controlnet --out DIR [--minutes M]
        [--steps N] [--batch B] [--device auto|cpu|cuda] [--seed S] [--pool P] [--tiny] [--base PIPE]

``--stage vae`` trains the AutoencoderKL (:mod:`models.shapes.train_vae`) and exports it to ``DIR/vae``;
``--stage unet`` trains the CLIP text encoder and the UNet on its cached latents
(:mod:`models.shapes.train_unet`) and exports ``DIR/pipeline``, a StableDiffusionPipeline folder in fp16;
``--stage all`` does both in turn. ``--stage inpaint`` (:mod:`models.shapes.train_inpaint`) and
``--stage controlnet`` (:mod:`models.shapes.train_controlnet`) fine-tune from the ``--base`` pipeline and
export ``DIR/inpaint-pipeline`` and ``DIR/controlnet``.
``--steps`` is a stage's total step target (it sets the learning-rate schedule); ``--minutes`` stops
cleanly at a time limit with a checkpoint in ``DIR/ckpt/<stage>.pt``, and rerunning the same command
continues from it.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from models.shapes._common import RunOptions, StageResult, resolve_device
from models.shapes._loop import Clock

__all__ = ["main", "parse_args", "run"]

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> RunOptions:
    """Parse the command line into :class:`RunOptions`."""
    p = argparse.ArgumentParser(prog="python -m models.shapes.train", description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("vae", "unet", "all", "inpaint", "controlnet"), required=True)
    p.add_argument(
        "--base",
        type=Path,
        help="inpaint/controlnet: the base txt2img pipeline (default: models/shapes/model)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (data, checkpoints, exports)")
    p.add_argument("--minutes", type=float, help="stop cleanly (with a checkpoint) after this wall time")
    p.add_argument("--steps", type=int, help="total steps of the stage (default: by device)")
    p.add_argument("--batch", type=int, help="batch size (default: by device)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pool", type=int, help="scenes in the data pool (default: the cached pool, else by device)"
    )
    p.add_argument("--tiny", action="store_true", help="tiny models (tests)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: by stage)")
    p.add_argument("--log-every", type=int, default=50, help="log a progress line every N steps")
    p.add_argument("--save-minutes", type=float, default=3.0, help="checkpoint every M minutes")
    p.add_argument("--workers", type=int, help="processes drawing the data pool (default: up to 16 cores)")
    p.add_argument("--eval-n", type=int, default=200, help="scenes for the VAE's reconstruction check")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the models (default: on CUDA only; +50 %% UNet steps/s on an H100)",
    )
    ns = p.parse_args(argv)
    if ns.steps is not None and ns.steps < 1 or ns.batch is not None and ns.batch < 1:
        p.error("--steps and --batch must be positive")
    return RunOptions(**vars(ns), command=shlex.join(["python", "-m", "models.shapes.train", *argv]))


def run(opts: RunOptions) -> list[StageResult]:
    """Run the stage(s) of ``opts`` under one clock; returns what each stage did."""
    from models.shapes.train_unet import train_unet  # lazy: keeps --help fast
    from models.shapes.train_vae import train_vae

    device = resolve_device(opts.device)
    clock = Clock(opts.minutes, opts.save_minutes)
    if opts.stage in ("inpaint", "controlnet"):
        from models.shapes.train_controlnet import train_controlnet
        from models.shapes.train_inpaint import train_inpaint

        return [(train_inpaint if opts.stage == "inpaint" else train_controlnet)(opts, clock, device)]
    results = []
    if opts.stage in ("vae", "all"):
        results.append(train_vae(opts, clock, device))
        if not results[-1].finished:
            return results
    if opts.stage in ("unet", "all"):
        results.append(train_unet(opts, clock, device))
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    for r in run(opts):
        log.info(
            "%s: steps %d -> %d of %d, loss %.5f, %s in %.0f s",
            r.stage,
            r.start_step,
            r.step,
            r.total_steps,
            r.loss,
            "finished" if r.finished else "not finished",
            r.seconds,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
