"""ControlNet stage of the shapes training script: a scribble ControlNet made from the base UNet
(:meth:`~diffusers.ControlNetModel.from_unet`), trained with the base UNet, VAE and text encoder frozen, and
exported as a diffusers ControlNetModel folder (``DIR/controlnet``, fp16).

The control image is the scene's scribble as white-on-black RGB in [0, 1] (what
:class:`~diffusers.StableDiffusionControlNetPipeline` feeds); its conditioning embedding downsamples 64×64
three times (stride 2) to the 8×8 latent grid.

Evaluate with ``python -m models.shapes.train_controlnet DIR/controlnet --base PIPE [--n 50]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel

from models.shapes._common import RunOptions, StageResult
from models.shapes._loop import Clock
from models.shapes.train_inpaint import base_dir, prepare

__all__ = ["CONDITIONING_CHANNELS", "evaluate_controlnet", "export_controlnet", "train_controlnet"]

log = logging.getLogger(__name__)

#: The conditioning embedding's channels: 4 levels, so 3 stride-2 downsamples (64×64 -> 8×8).
CONDITIONING_CHANNELS = (16, 32, 64, 128)
_WARMUP, _EMA, _WEIGHT_DECAY = 100, 0.995, 0.01


def export_controlnet(
    out: Path, model: ControlNetModel, shadow: list[torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Save ``out/controlnet``: ``model`` given the (EMA) weights ``shadow``, fp16; replaces atomically."""
    final, tmp = out / "controlnet", out / "controlnet.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export = ControlNetModel.from_config(model.config)
    with torch.no_grad():
        for p, s in zip(export.parameters(), shadow, strict=True):
            p.copy_(s)
    export.half().save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    log.info("controlnet: exported %s", final)
    return final


def train_controlnet(opts: RunOptions, clock: Clock, device: torch.device) -> StageResult:
    """Train (or continue) the scribble ControlNet until the step target or the time limit, then export."""
    run, base, data = prepare(opts, "controlnet", device)
    torch.manual_seed(opts.seed)
    controlnet = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS, conditioning_channels=3
    ).to(device)
    run.setup({"controlnet": controlnet.train()}, _EMA, _WEIGHT_DECAY)

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(len(data["images"]), (run.batch,), generator=run.sampler).to(device)
        z0 = base.latents(data["images"][idx].float() / 127.5 - 1.0)
        cond = (data["scribbles"][idx].float() / 255.0).expand(-1, 3, -1, -1)
        zt, t, eps = base.noisy(z0, run.noise)
        hidden = base.encode_text(data["input_ids"][idx], run.noise)
        down, mid = controlnet(zt, t, hidden, controlnet_cond=cond, return_dict=False)
        pred: torch.Tensor = base.unet(
            zt, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        return base.loss(pred, eps, t)

    step = run.train(clock, min(_WARMUP, run.total // 10 + 1), loss_fn)
    export_controlnet(
        opts.out, controlnet, run.ema.shadow, run.meta(step, clock) | {"base": str(base_dir(opts))}
    )
    return StageResult(
        "controlnet", run.start, step, run.total, run.progress.loss, step >= run.total, clock.elapsed
    )


def evaluate_controlnet(
    controlnet_dir: Path, base: Path, n: int = 50, steps: int = 20, guidance: float = 3.0
) -> dict[str, float]:
    """Draw ``n`` one-shape prompts (colour + kind) from their scribbles, with the ControlNet and with its
    conditioning scale at 0; returns the mean IoU of the prompted colour's region with the scribbled shape's
    filled mask, and how often the scorer reads the prompted colour and kind, for both."""
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    from models.shapes.scenes import eval_prompts, scribble, shape_mask
    from models.shapes.scorer import iou, region_mask_for_colour, score_image

    controlnet = ControlNetModel.from_pretrained(
        controlnet_dir, dtype=torch.float32, local_files_only=True
    )
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=controlnet, dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(321)
    scores: dict[str, list[float]] = {}
    for i, (_, scene) in enumerate(eval_prompts(n, seed=9)):
        spec = scene.shapes[0]
        prompt = f"a {spec.colour} {spec.kind}"  # no position or size: those come from the scribble
        control = Image.fromarray(scribble(scene, rng)).convert("RGB")
        target = shape_mask(spec)
        for name, scale in (("control", 1.0), ("no_control", 0.0)):
            image = pipe(
                prompt,
                image=control,
                height=64,
                width=64,
                num_inference_steps=steps,
                guidance_scale=guidance,
                controlnet_conditioning_scale=scale,
                generator=torch.Generator().manual_seed(i),
            ).images[0]
            found = score_image(image).shapes
            scores.setdefault(f"{name}_iou", []).append(
                iou(region_mask_for_colour(image, spec.colour), target)
            )
            scores.setdefault(f"{name}_colour", []).append(bool(found) and found[0].colour == spec.colour)
            scores.setdefault(f"{name}_shape", []).append(bool(found) and found[0].shape == spec.kind)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m models.shapes.train_controlnet CONTROLNET --base PIPE [--n N]``: print the scores."""
    p = argparse.ArgumentParser(
        prog="python -m models.shapes.train_controlnet", description=evaluate_controlnet.__doc__
    )
    p.add_argument("controlnet", type=Path)
    p.add_argument("--base", type=Path, required=True, help="the base txt2img pipeline folder")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    ns = p.parse_args(argv)
    report = evaluate_controlnet(ns.controlnet, ns.base, ns.n, ns.steps, ns.guidance)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
