"""Inpainting stage of the shapes training script: a 9-channel UNet fine-tuned from the base txt2img UNet,
exported as a diffusers StableDiffusionInpaintPipeline folder (``DIR/inpaint-pipeline``, fp16).

The UNet sees what :class:`~diffusers.StableDiffusionInpaintPipeline` feeds it: 4 noisy latents, the mask
(1 = repaint, nearest-downsampled to the 8×8 latent grid) and the VAE latents of the masked image (the image
in [-1, 1] with the masked pixels set to 0). The 5 extra input channels of ``conv_in`` start at zero, so the
initial model is the base model. The masks are one shape of the scene (grown a little) or random rectangles
and ellipses, half and half; the caption is the whole scene's. The VAE and text encoder stay frozen.

Evaluate with ``python -m models.shapes.train_inpaint DIR/inpaint-pipeline [--n 50]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from models.shapes._common import TOKEN_LENGTH, RunOptions, StageResult, noise_scheduler
from models.shapes._data import ModesPool, load_modes_pool
from models.shapes._loop import Clock, StageRun
from models.tokenizer import load_clip_tokenizer

__all__ = ["Base", "base_dir", "evaluate_inpaint", "load_base", "random_masks", "train_inpaint"]

log = logging.getLogger(__name__)

EMPTY_CAPTION_P = 0.1
SNR_GAMMA = 5.0
_WARMUP, _EMA, _WEIGHT_DECAY = 100, 0.995, 0.01
#: (steps, batch, peak learning rate) and the pool size, by device type.
DEFAULTS = {"cuda": (6000, 512, 5e-4), "cpu": (1500, 32, 3e-4)}
POOL = {"cuda": 100_000, "cpu": 8_000}
_DEFAULT_BASE = Path(__file__).resolve().parent / "model"


def base_dir(opts: RunOptions) -> Path:
    """The base txt2img pipeline folder: ``--base``, else ``models/shapes/model``."""
    base = opts.base or _DEFAULT_BASE
    if not (base / "model_index.json").is_file():
        raise SystemExit(f"no base pipeline in {base}: pass --base")
    return base


@dataclass
class Base:
    """The frozen parts of the base pipeline (fp32, on the training device) and the noise schedule."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    alphas: torch.Tensor
    snr_weight: torch.Tensor
    empty_ids: torch.Tensor

    @property
    def scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Hidden states of the captions ``ids``, a random ``EMPTY_CAPTION_P`` of them made empty."""
        drop = torch.rand(len(ids), generator=generator, device=ids.device) < EMPTY_CAPTION_P
        ids = torch.where(drop[:, None], self.empty_ids[None], ids).long()
        hidden: torch.Tensor = self.text_encoder(ids).last_hidden_state
        return hidden

    @torch.no_grad()
    def latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of images in [-1, 1]: sampled with ``generator`` (as the pipelines do), else
        the posterior mean."""
        dist = self.vae.encode(images).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        scaled: torch.Tensor = z * self.scale
        return scaled

    def noisy(
        self, z0: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, noise) for a DDPM training step."""
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        t = torch.randint(0, len(self.alphas), (len(z0),), generator=generator, device=z0.device)
        a = self.alphas[t][:, None, None, None]
        return a.sqrt() * z0 + (1 - a).sqrt() * eps, t, eps

    def loss(self, pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-weighted epsilon loss."""
        return (self.snr_weight[t] * (pred.float() - eps).square().mean(dim=(1, 2, 3))).mean()


def load_base(path: Path, device: torch.device) -> Base:
    """Load the base pipeline's VAE, text encoder and UNet in fp32, frozen, in eval mode."""
    vae = AutoencoderKL.from_pretrained(path / "vae", dtype=torch.float32, local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(
        path / "text_encoder", dtype=torch.float32, local_files_only=True
    )
    unet = UNet2DConditionModel.from_pretrained(
        path / "unet", dtype=torch.float32, local_files_only=True
    )
    for m in (vae, text_encoder, unet):
        m.to(device).eval().requires_grad_(False)
    alphas: torch.Tensor = noise_scheduler().alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    ids = load_clip_tokenizer()("", padding="max_length", max_length=TOKEN_LENGTH, return_tensors="np")
    empty = torch.from_numpy(np.asarray(ids["input_ids"][0], dtype=np.int64)).to(device)
    return Base(vae, text_encoder, unet, alphas, snr.clamp(max=SNR_GAMMA) / snr, empty)


def random_masks(n: int, generator: torch.Generator, size: int = 64) -> torch.Tensor:
    """``n`` random masks (float n×1×size×size, 1 = repaint): a rectangle or an ellipse each, 8-40 px."""
    ys = torch.arange(size).float()[:, None] + 0.5
    xs = torch.arange(size).float()[None, :] + 0.5
    r = torch.rand(n, 6, generator=generator)
    w, h = 8 + 32 * r[:, 0], 8 + 32 * r[:, 1]
    cx, cy = w / 2 + (size - w) * r[:, 2], h / 2 + (size - h) * r[:, 3]
    dx = (xs[None] - cx[:, None, None]) / (w[:, None, None] / 2)
    dy = (ys[None] - cy[:, None, None]) / (h[:, None, None] / 2)
    rect = (dx.abs() <= 1) & (dy.abs() <= 1)
    ellipse = dx.square() + dy.square() <= 1
    use_rect = (r[:, 4] < 0.5)[:, None, None]
    return torch.where(use_rect, rect, ellipse).float()[:, None]


def _inpaint_unet(base: UNet2DConditionModel) -> UNet2DConditionModel:
    """A 9-input-channel copy of ``base``; the 5 extra ``conv_in`` input channels zero-initialised."""
    unet = UNet2DConditionModel.from_config({**base.config, "in_channels": 9})
    state = base.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], 5, *weight.shape[2:])], 1)
    unet.load_state_dict(state)
    return unet


def export_inpaint_pipeline(
    out: Path, base: Path, unet: UNet2DConditionModel, shadow: list[torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Save ``out/inpaint-pipeline``: the base's VAE, text encoder, tokenizer and scheduler folders as they
    are, and ``unet`` given the (EMA) weights ``shadow`` in fp16; replaces an earlier export atomically."""
    final, tmp = out / "inpaint-pipeline", out / "inpaint-pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(base / name, tmp / name)
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    model = UNet2DConditionModel.from_config(unet.config)
    with torch.no_grad():
        for p, s in zip(model.parameters(), shadow, strict=True):
            p.copy_(s)
    model.half().save_pretrained(tmp / "unet", safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    log.info("inpaint: exported %s", final)
    return final


def _pool_tensors(pool: ModesPool, device: torch.device) -> dict[str, torch.Tensor]:
    images = torch.from_numpy(pool.images).permute(0, 3, 1, 2).contiguous()
    return {
        "images": images.to(device),
        "masks": torch.from_numpy(pool.masks[:, None]).to(device),
        "scribbles": torch.from_numpy(pool.scribbles[:, None]).to(device),
        "input_ids": torch.from_numpy(pool.input_ids).to(device),
    }


def prepare(
    opts: RunOptions, stage: str, device: torch.device
) -> tuple[StageRun, Base, dict[str, torch.Tensor]]:
    """The stage's run state, the frozen base and the data pool as (uint8) tensors."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    run = StageRun(opts, stage, device, DEFAULTS[kind])
    pool = load_modes_pool(opts.out, opts.seed, opts.pool or POOL[kind], opts.workers)
    run.pool = len(pool)
    return run, load_base(base_dir(opts), device), _pool_tensors(pool, device)


def train_inpaint(opts: RunOptions, clock: Clock, device: torch.device) -> StageResult:
    """Fine-tune (or continue) the 9-channel UNet until the step target or the time limit; export."""
    run, base, data = prepare(opts, "inpaint", device)
    torch.manual_seed(opts.seed)
    unet = _inpaint_unet(base.unet).to(device).train()
    run.setup({"unet": unet}, _EMA, _WEIGHT_DECAY)

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(len(data["images"]), (run.batch,), generator=run.sampler).to(device)
        x = data["images"][idx].float() / 127.5 - 1.0
        shape_mask = data["masks"][idx].float() / 255.0
        use_shape = (torch.rand(run.batch, generator=run.sampler) < 0.5).to(device)[:, None, None, None]
        mask = torch.where(use_shape, shape_mask, random_masks(run.batch, run.sampler).to(device))
        z0 = base.latents(x)
        masked = base.latents(x * (mask < 0.5), run.noise)
        mask8 = torch.nn.functional.interpolate(mask, size=z0.shape[-2:])  # nearest, as the pipeline
        zt, t, eps = base.noisy(z0, run.noise)
        hidden = base.encode_text(data["input_ids"][idx], run.noise)
        pred: torch.Tensor = unet(torch.cat([zt, mask8, masked], 1), t, hidden).sample
        return base.loss(pred, eps, t)

    step = run.train(clock, min(_WARMUP, run.total // 10 + 1), loss_fn)
    export_inpaint_pipeline(opts.out, base_dir(opts), unet, run.ema.shadow, run.meta(step, clock))
    return StageResult(
        "inpaint", run.start, step, run.total, run.progress.loss, step >= run.total, clock.elapsed
    )


def evaluate_inpaint(pipe_dir: Path, n: int = 50, steps: int = 20, guidance: float = 3.0) -> dict[str, float]:
    """Repaint the shape of ``n`` one-shape scenes as another colour and kind; returns how often the scorer
    reads the requested colour / kind / both inside the mask, and the mean absolute change (0..1) outside
    the mask (a 9-channel UNet's pipeline does not paste the original back: this is the VAE and model's)."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from models.shapes.scenes import COLOURS, MASK_DILATION, SHAPE_KINDS, Scene, eval_prompts, render
    from models.shapes.scenes import shape_mask as spec_mask
    from models.shapes.scorer import score_image

    pipe = StableDiffusionInpaintPipeline.from_pretrained(pipe_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(123)
    hits = {"colour": 0, "shape": 0, "both": 0}
    outside: list[float] = []
    for i, (_, scene) in enumerate(eval_prompts(n, seed=5)):
        old = scene.shapes[0]
        colour = str(rng.choice([c for c in COLOURS if c not in (old.colour, *scene.background)]))
        kind = str(rng.choice([k for k in SHAPE_KINDS if k != old.kind]))
        new = Scene(
            (type(old)(kind, colour, old.position, old.size, old.centre_xy, old.radius),), scene.background
        )
        mask = spec_mask(old, dilation=MASK_DILATION) | spec_mask(new.shapes[0], dilation=MASK_DILATION)
        image = render(scene)
        out = pipe(
            f"a {colour} {kind}",  # colour + kind only: where and how big comes from the mask
            image=Image.fromarray(image),
            mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(i),
        ).images[0]
        result = np.asarray(out).astype(np.float32)
        diff = np.abs(result - image.astype(np.float32)).mean(axis=2) / 255.0
        outside.append(float(diff[~mask].mean()))
        readings = [
            s for s in score_image(result.astype(np.uint8)).shapes if (s.mask & mask).sum() > s.area / 2
        ]
        if readings:
            hits["colour"] += readings[0].colour == colour
            hits["shape"] += readings[0].shape == kind
            hits["both"] += readings[0].colour == colour and readings[0].shape == kind
    report = {k: v / n for k, v in hits.items()}
    return report | {"outside_change": float(np.mean(outside))}


def main(argv: list[str] | None = None) -> int:
    """``python -m models.shapes.train_inpaint PIPE [--n N] [--steps S] [--guidance G]``: print scores."""
    p = argparse.ArgumentParser(
        prog="python -m models.shapes.train_inpaint", description=evaluate_inpaint.__doc__
    )
    p.add_argument("pipeline", type=Path)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    ns = p.parse_args(argv)
    report = evaluate_inpaint(ns.pipeline, ns.n, ns.steps, ns.guidance)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
