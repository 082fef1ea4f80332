"""VAE stage of the shapes training script: AutoencoderKL on the scene pool, then its latent scale and a
reconstruction check by the scorer.

The loss is MSE + L1 with foreground pixels (far from both background colours) weighted ``1 + FG_WEIGHT``,
since the shapes' colour and outline must survive reconstruction, plus a small KL term. The EMA weights
are exported to ``DIR/vae`` with ``scaling_factor = 1 / std`` of the latents (posterior means).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from models.shapes._common import RunOptions, StageResult, build_vae
from models.shapes._data import load_pool, pool_size
from models.shapes._loop import Clock, Ema, StageRun
from models.shapes.scenes import SceneDataset
from models.shapes.scorer import accuracy, score_image

__all__ = ["FG_WEIGHT", "KL_WEIGHT", "latent_std", "reconstruction_report", "train_vae"]

log = logging.getLogger(__name__)

FG_WEIGHT = 10.0
KL_WEIGHT = 1e-7  # on the per-sample KL sum (256 latent values)
_FG_DISTANCE = 24 / 127.5  # max channel distance (in [-1, 1] units) from both background colours
_WARMUP, _EMA, _WEIGHT_DECAY = 300, 0.999, 0.0
#: (steps, batch, peak learning rate) and the pool size, by device type.
DEFAULTS = {"cuda": (7000, 256, 6e-4), "cpu": (3000, 16, 6e-4)}
POOL = {"cuda": 200_000, "cpu": 20_000}


def _weighted_loss(x: torch.Tensor, recon: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Foreground-weighted MSE + L1 (x, recon: B×3×H×W in [-1, 1]; bg: B×2×3 in [-1, 1])."""
    far = (x[:, None] - bg[..., None, None]).abs().amax(dim=2)  # B×2×H×W
    weight = 1.0 + FG_WEIGHT * (far.amin(dim=1) > _FG_DISTANCE).float()
    err = recon - x
    per_pixel = (err.square() + err.abs()).mean(dim=1)
    return (weight * per_pixel).sum() / weight.sum()


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: np.ndarray, device: torch.device, batch: int = 512) -> float:
    """Standard deviation of the posterior means of ``images`` (N×64×64×3 uint8)."""
    means = []
    for s in range(0, len(images), batch):
        x = _to_unit(torch.from_numpy(images[s : s + batch]).to(device))
        means.append(vae.encode(x).latent_dist.mean.float())
    return float(torch.cat(means).std())


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKL, device: torch.device, n: int, seed: int) -> dict[str, Any]:
    """Scorer on ``n`` held-aside scenes, original vs reconstruction (posterior mean, decoded).

    Returns PSNR, the scorer's accuracy against the scenes for both, and ``agreement``: the fraction of
    scenes where the scorer reads the same colour / shape / position / size / background on both.
    """
    dataset = SceneDataset(seed + 1, n, holdout="include", empty_caption_p=0.0)
    items = [dataset[i] for i in range(n)]
    images = np.stack([it["image"] for it in items])
    recons = []
    for s in range(0, n, 256):
        x = _to_unit(torch.from_numpy(images[s : s + 256]).to(device))
        r = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        recons.append(
            ((r.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        )
    recon = np.concatenate(recons)
    mse = float(np.mean((recon.astype(np.float64) - images) ** 2))
    scenes = [it["scene"] for it in items]
    orig_r, recon_r = [score_image(im) for im in images], [score_image(im) for im in recon]
    agree = dict.fromkeys(("colour", "shape", "position", "size", "background"), 0)
    for a, b in zip(orig_r, recon_r, strict=True):
        agree["background"] += a.background_colours == b.background_colours and a.split == b.split
        if a.shapes and b.shapes:
            for key in ("colour", "shape", "position", "size"):
                agree[key] += getattr(a.shapes[0], key) == getattr(b.shapes[0], key)
    return {
        "n": n,
        "psnr": 10 * np.log10(255.0**2 / max(mse, 1e-9)),
        "agreement": {k: v / n for k, v in agree.items()},
        "accuracy_original": accuracy(orig_r, scenes),
        "accuracy_reconstruction": accuracy(recon_r, scenes),
    }


def _finish(
    ema: Ema, opts: RunOptions, images: np.ndarray, device: torch.device, meta: dict[str, Any]
) -> None:
    """Export the EMA weights with their latent scale to ``DIR/vae``, with ``training.json`` (the training
    metadata ``meta`` and the reconstruction check), and log the check."""
    final = build_vae(opts.config).to(device)
    ema.copy_to(list(final.parameters()))
    final.eval()
    std = latent_std(final, images[:4096], device)
    final.register_to_config(scaling_factor=1.0 / std)
    final.save_pretrained(opts.out / "vae", safe_serialization=True)
    report = reconstruction_report(final, device, opts.eval_n, opts.seed)
    info = meta | {"scaling_factor": 1.0 / std, "reconstruction": report}
    (opts.out / "vae" / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("vae: latent std %.4f -> scaling_factor %.4f; PSNR %.2f dB", std, 1.0 / std, report["psnr"])
    log.info("vae: scorer agreement original vs reconstruction %s", report["agreement"])
    log.info("vae: scorer accuracy original %s", report["accuracy_original"])
    log.info("vae: scorer accuracy reconstruction %s", report["accuracy_reconstruction"])


def _already_trained(opts: RunOptions, run: StageRun) -> dict[str, Any] | None:
    """The exported VAE's training metadata if there is nothing to do: its checkpoint reached the step
    target, or ``DIR/vae`` was put there without a checkpoint (e.g. copied from another run)."""
    path = opts.out / "vae" / "training.json"
    if not path.is_file() or not (opts.out / "vae" / "config.json").is_file():
        return None
    if run.ckpt is None or run.start >= run.total:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    return None


def train_vae(opts: RunOptions, clock: Clock, device: torch.device) -> StageResult:
    """Train (or continue training) the VAE until its step target or the time limit; export it when done."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    run = StageRun(opts, "vae", device, DEFAULTS[kind])
    done = _already_trained(opts, run)
    if done is not None:
        log.info("vae: already trained (%d steps, in %s); nothing to do", done["step"], opts.out / "vae")
        return StageResult("vae", done["step"], done["step"], done["step"], done["loss"], True, 0.0)

    pool = load_pool(opts.out, opts.seed, pool_size(opts, POOL[kind]), opts.workers)
    run.pool = len(pool)
    torch.manual_seed(opts.seed)
    vae = build_vae(opts.config).to(device).train()
    run.setup({"model": vae}, _EMA, _WEIGHT_DECAY)
    if opts.use_compile(device):
        vae.encoder.compile()  # in place, so checkpoint keys stay; encode()/decode() bypass vae.forward
        vae.decoder.compile()
    images = torch.from_numpy(pool.images).to(device)
    backgrounds = torch.from_numpy(pool.backgrounds).to(device).float() / 127.5 - 1.0
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(len(pool), (run.batch,), generator=run.sampler).to(device)
        x = _to_unit(images[idx])
        with amp:
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=run.noise)).sample
        kl: torch.Tensor = posterior.kl().float().mean()
        return _weighted_loss(x, recon.float(), backgrounds[idx]) + KL_WEIGHT * kl

    step = run.train(clock, _WARMUP, loss_fn)
    if step >= run.total:
        _finish(run.ema, opts, pool.images, device, run.meta(step, clock))
    return StageResult("vae", run.start, step, run.total, run.progress.loss, step >= run.total, clock.elapsed)
