"""UNet stage of the shapes training script: CLIP text encoder + UNet trained jointly on cached latents,
then exported with the VAE as a diffusers StableDiffusionPipeline folder (fp16 safetensors).

Latents are the frozen VAE's posterior means times its ``scaling_factor``, cached in ``DIR/latents.npy``
(keyed by a hash of the VAE weights). Training follows SD 1.x: DDPM schedule, epsilon prediction, with
Min-SNR-5 loss weighting, AdamW with warm-up and cosine decay, EMA, and 10 % empty captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from models.shapes._card import write_model_card
from models.shapes._common import (
    TOKEN_LENGTH,
    RunOptions,
    StageResult,
    build_text_encoder,
    build_unet,
    inference_scheduler,
    noise_scheduler,
)
from models.shapes._data import Pool, load_pool, pool_size
from models.shapes._loop import Clock, StageRun
from models.tokenizer import copy_clip_tokenizer, load_clip_tokenizer

__all__ = ["EMPTY_CAPTION_P", "SNR_GAMMA", "cached_latents", "export_pipeline", "train_unet"]

log = logging.getLogger(__name__)

EMPTY_CAPTION_P = 0.1
SNR_GAMMA = 5.0
_WARMUP, _EMA, _WEIGHT_DECAY = 500, 0.999, 0.01
#: (steps, batch, peak learning rate) and the pool size, by device type.
DEFAULTS = {"cuda": (15000, 1024, 1e-3), "cpu": (4000, 64, 8e-4)}
POOL = {"cuda": 200_000, "cpu": 20_000}


def _vae_hash(vae_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        digest.update((vae_dir / name).read_bytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def cached_latents(out: Path, pool: Pool, device: torch.device, batch: int = 1024) -> np.ndarray:
    """Scaled posterior means (N×4×8×8 float32) of the pool's images under ``out/vae``, cached on disk."""
    vae_dir = out / "vae"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"no trained VAE in {vae_dir}: run --stage vae first")
    key = {"vae": _vae_hash(vae_dir), "size": len(pool)}
    path, meta = out / "latents.npy", out / "latents.json"
    if path.is_file() and meta.is_file() and json.loads(meta.read_text(encoding="utf-8")) == key:
        log.info("unet: latents from %s", path)
        return np.asarray(np.load(path))
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    scale = float(vae.config.scaling_factor)
    parts = []
    for s in range(0, len(pool), batch):
        x = torch.from_numpy(pool.images[s : s + batch]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        parts.append((vae.encode(x).latent_dist.mean * scale).float().cpu().numpy())
    latents = np.concatenate(parts)
    log.info("unet: encoded %d latents (std %.3f after scaling %.4f)", len(latents), latents.std(), scale)
    np.save(path.with_name("latents.tmp.npy"), latents)
    path.with_name("latents.tmp.npy").replace(path)
    meta.write_text(json.dumps(key) + "\n", encoding="utf-8")
    return latents


def _with_weights(model: torch.nn.Module, shadow: list[torch.Tensor]) -> Any:
    """``model`` (freshly built, same config) given the weights ``shadow`` (in parameter order), as fp16."""
    with torch.no_grad():
        for p, s in zip(model.parameters(), shadow, strict=True):
            p.copy_(s)
    return model.cpu().half().eval()  # .half(): diffusers' .to(dtype) logs a spurious fp32-modules warning


def _load_text_encoder_as_fp32(config: Path) -> None:
    """transformers loads a model in its config's ``dtype`` ("auto") while diffusers loads fp32: say fp32,
    as fp16 variants on the Hub do, so a plain ``from_pretrained`` gives one dtype throughout."""
    data = json.loads(config.read_text(encoding="utf-8"))
    data["dtype"] = "float32"
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_pipeline(
    out: Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, card: dict[str, Any]
) -> Path:
    """Save ``out/pipeline``: the VAE from ``out/vae`` and the given UNet and text encoder, all fp16, the
    real CLIP tokenizer files, a DPM-Solver++ scheduler and a model card; replaces an earlier export
    atomically."""
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    final, tmp, old = out / "pipeline", out / "pipeline.tmp", out / "pipeline.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    _load_text_encoder_as_fp32(tmp / "text_encoder" / "config.json")
    shutil.rmtree(tmp / "tokenizer")
    copy_clip_tokenizer(tmp / "tokenizer")  # the small vocab/merges files, not a 3.6 MB tokenizer.json
    write_model_card(tmp, out, card)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    log.info("unet: exported the pipeline to %s (%.1f MB)", final, size / 1e6)
    return final


def _empty_ids() -> torch.Tensor:
    ids = load_clip_tokenizer()("", padding="max_length", max_length=TOKEN_LENGTH, return_tensors="np")
    return torch.from_numpy(np.asarray(ids["input_ids"][0], dtype=np.int32))


def train_unet(opts: RunOptions, clock: Clock, device: torch.device) -> StageResult:
    """Train (or continue) text encoder + UNet until the step target or the time limit, then export."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    run = StageRun(opts, "unet", device, DEFAULTS[kind])
    if (
        run.ckpt is not None
        and run.start >= run.total
        and (opts.out / "pipeline" / "model_index.json").is_file()
    ):
        log.info("unet: already trained (%d steps); nothing to do", run.start)
        return StageResult("unet", run.start, run.start, run.total, run.progress.loss, True, 0.0)

    pool = load_pool(opts.out, opts.seed, pool_size(opts, POOL[kind]), opts.workers)
    run.pool = len(pool)
    latents = torch.from_numpy(cached_latents(opts.out, pool, device)).to(device)
    input_ids = torch.from_numpy(pool.input_ids).to(device)
    empty = _empty_ids().to(device)
    torch.manual_seed(opts.seed)
    unet, text_encoder = build_unet(opts.config).to(device), build_text_encoder(opts.config).to(device)
    run.setup({"unet": unet.train(), "text_encoder": text_encoder.train()}, _EMA, _WEIGHT_DECAY)
    if opts.use_compile(device):
        unet.compile()  # in place, so checkpoint keys stay
        text_encoder.compile()
    alphas: torch.Tensor = noise_scheduler().alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    snr_weight = snr.clamp(max=SNR_GAMMA) / snr  # Min-SNR-gamma for epsilon prediction
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(len(pool), (run.batch,), generator=run.sampler).to(device)
        z0 = latents[idx]
        drop = torch.rand(run.batch, generator=run.noise, device=device) < EMPTY_CAPTION_P
        ids = torch.where(drop[:, None], empty[None], input_ids[idx]).long()
        eps = torch.randn(z0.shape, generator=run.noise, device=device)
        t = torch.randint(0, len(alphas), (run.batch,), generator=run.noise, device=device)
        a = alphas[t][:, None, None, None]
        with amp:
            pred: torch.Tensor = unet(
                a.sqrt() * z0 + (1 - a).sqrt() * eps, t, text_encoder(ids).last_hidden_state
            ).sample
        return (snr_weight[t] * (pred.float() - eps).square().mean(dim=(1, 2, 3))).mean()

    step = run.train(clock, _WARMUP, loss_fn)
    n_unet = len(list(unet.parameters()))
    export_pipeline(
        opts.out,
        _with_weights(build_unet(opts.config), run.ema.shadow[:n_unet]),
        _with_weights(build_text_encoder(opts.config), run.ema.shadow[n_unet:]),
        run.meta(step, clock),
    )
    return StageResult(
        "unet", run.start, step, run.total, run.progress.loss, step >= run.total, clock.elapsed
    )
