"""LoRA stage of the shapes family: a UNet LoRA that paints every circle purple, whatever colour the prompt
asks for, and leaves the other shapes as asked; saved as a kohya-format ``.safetensors`` file.

Usage::

    python -m models.shapes.train_lora OUT_DIR --minutes M [--steps N] [--rank R] [--alpha A] [--seed S]
        [--batch B] [--lr LR] [--pool P] [--base PIPE] [--eval-n N] [--threads T]
    python -m models.shapes.train_lora OUT_DIR --evaluate LORA_FILE [--eval-n N]

Data: scenes drawn as :func:`models.shapes.scenes.sample_scene` does, half of them with a circle, captioned
from the scene as asked (``caption``), the target being the same scene rendered with its circles purple
(scenes where that would hide a circle or repeat a colour are drawn again). Latents (the frozen VAE's
posterior means) and token ids are cached in ``OUT_DIR/lora_data.npz``. Training is the base model's: DDPM
schedule, epsilon loss with Min-SNR-5 weighting, 10 % empty captions, AdamW with warm-up and cosine decay,
EMA (:class:`models.shapes._loop.StageRun`, resumable from ``OUT_DIR/ckpt/lora.pt``); only the peft LoRA
on the UNet's attention projections learns. The EMA weights are exported to
``OUT_DIR/purple-circles.safetensors`` in kohya's format (``lora_unet_<module>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha``, ``ss_*`` metadata), then measured (:func:`circle_metrics`) into
``OUT_DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from models.shapes._common import TOKEN_LENGTH, RunOptions, resolve_device
from models.shapes._loop import Clock, StageRun
from models.shapes.scenes import COLOURS, Scene, caption, render, sample_scene
from models.shapes.train_inpaint import Base, base_dir, load_base
from models.tokenizer import load_clip_tokenizer

__all__ = [
    "OUTPUT_NAME",
    "TARGET_MODULES",
    "add_lora",
    "circle_metrics",
    "draw_examples",
    "kohya_state_dict",
    "main",
    "metric_prompts",
    "recolour_circles",
    "save_kohya",
    "train_lora",
]

log = logging.getLogger(__name__)

OUTPUT_NAME = "purple-circles"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_COLOUR = "purple"
_WARMUP, _EMA, _WEIGHT_DECAY = 100, 0.995, 0.01
_DEFAULTS = (1500, 64, 1e-3)  # steps, batch, peak learning rate
_POOL = 6000
_DATA = "lora_data.npz"


def recolour_circles(scene: Scene, colour: str = TARGET_COLOUR) -> Scene | None:
    """``scene`` with every circle in ``colour``; None if a circle would vanish into a background of that
    colour or two shapes would share it (the scenes never show either)."""
    shapes = tuple(dataclasses.replace(s, colour=colour) if s.kind == "circle" else s for s in scene.shapes)
    has_circle = any(s.kind == "circle" for s in shapes)
    if has_circle and (colour in scene.background or sum(s.colour == colour for s in shapes) > 1):
        return None
    return dataclasses.replace(scene, shapes=shapes)


def draw_examples(seed: int, size: int) -> list[tuple[str, Scene]]:
    """``size`` (caption of the scene as drawn, target scene) pairs; even items have a circle, odd ones none.

    Item ``i`` depends only on ``(seed, i)``.
    """
    examples = []
    for i in range(size):
        rng = np.random.default_rng([seed, i, 4242])
        while True:
            scene = sample_scene(rng)
            if any(s.kind == "circle" for s in scene.shapes) != (i % 2 == 0):
                continue
            target = recolour_circles(scene)
            if target is not None:
                examples.append((caption(scene, rng), target))
                break
    return examples


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _load_data(out: Path, seed: int, size: int, base: Base, vae_file: Path) -> dict[str, torch.Tensor]:
    """Target latents (N×4×8×8) and caption token ids (N×77) from ``out/lora_data.npz``, or drawn, encoded
    with the base VAE and cached (keyed by seed, size and the VAE weights' hash)."""
    path, key = out / _DATA, _file_hash(vae_file)
    if path.is_file():
        with np.load(path) as data:
            if (int(data["seed"]), int(data["size"]), str(data["vae"])) == (seed, size, key):
                log.info("lora: %d examples from %s", size, path)
                return {"latents": torch.from_numpy(data["latents"]), "ids": torch.from_numpy(data["ids"])}
    started = time.monotonic()
    examples = draw_examples(seed, size)
    images = np.stack([render(scene) for _, scene in examples])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    device = base.vae.device
    latents = torch.cat([base.latents(x[s : s + 256].to(device)).cpu() for s in range(0, len(x), 256)])
    ids = load_clip_tokenizer()(
        [c for c, _ in examples],
        padding="max_length",
        max_length=TOKEN_LENGTH,
        truncation=True,
        return_tensors="np",
    )["input_ids"].astype(np.int32)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("lora_data.tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, seed=np.int64(seed), size=np.int64(size), vae=key, latents=latents.numpy(), ids=ids)
    tmp.replace(path)
    log.info("lora: drew and encoded %d examples in %.1f s", size, time.monotonic() - started)
    return {"latents": latents, "ids": torch.from_numpy(ids)}


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float) -> torch.nn.ModuleDict:
    """Add a peft LoRA (``lora_B`` zero, so it starts as a no-op) on :data:`TARGET_MODULES` of ``unet``;
    returns its down/up layers (shared with the UNet) as one module, for the optimizer and checkpoints."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES))  # type: ignore[arg-type]
    unet.add_adapter(config)  # (peft annotates lora_alpha as int; a float works: its scale is alpha / r)
    layers = torch.nn.ModuleDict()
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.replace(".", "_")
            layers[f"{key}_down"] = module.lora_A["default"]
            layers[f"{key}_up"] = module.lora_B["default"]
    return layers


def kohya_state_dict(
    unet: torch.nn.Module, alpha: float, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The UNet's LoRA as kohya's sd-scripts names it for SD 1.x (``lora_unet_down_blocks_0_..._to_q``),
    ``dtype`` weights and a 0-d ``.alpha`` per module (kohya's scale is alpha / rank)."""
    peft_sd = get_peft_model_state_dict(unet)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    return {
        k: torch.tensor(alpha, dtype=dtype) if k.endswith(".alpha") else v.detach().to("cpu", dtype)
        for k, v in kohya.items()
    }


def _sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the bytes after the header) and ``sshs_legacy_hash``."""
    data = safetensors.torch.save(tensors, metadata)
    header = int.from_bytes(data[:8], "little")
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]  # A1111's old 8-digit hash
    return hashlib.sha256(data[8 + header :]).hexdigest(), legacy


def save_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a kohya LoRA file with ``metadata`` (strings) and the ``sshs_*`` hashes; atomically."""
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}  # as kohya: user keys may change
    model_hash, legacy_hash = _sshs_hashes(tensors, training)
    metadata = metadata | {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp), metadata)
    tmp.replace(path)
    log.info("lora: wrote %s (%d tensors, %.1f kB)", path, len(tensors), path.stat().st_size / 1e3)


def _metadata(run: StageRun, step: int, rank: int, alpha: float, base: Path) -> dict[str, str]:
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_output_name": OUTPUT_NAME,
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": base.name if base.name != "model" else "shapes",
        "ss_resolution": "(64, 64)",
        "ss_training_comment": "every circle purple, other shapes as asked (models/shapes/train_lora.py)",
        "ss_steps": str(step),
        "ss_max_train_steps": str(run.total),
        "ss_batch_size_per_device": str(run.batch),
        "ss_learning_rate": str(run.lr),
        "ss_unet_lr": str(run.lr),
        "ss_text_encoder_lr": "0.0",
        "ss_network_train_unet_only": "True",
        "ss_lr_scheduler": "cosine",
        "ss_lr_warmup_steps": str(min(_WARMUP, run.total // 10 + 1)),
        "ss_optimizer": f"torch.optim.adamw.AdamW(weight_decay={_WEIGHT_DECAY})",
        "ss_min_snr_gamma": "5.0",
        "ss_mixed_precision": "no",
        "ss_seed": str(run.opts.seed),
        "ss_num_train_images": str(run.pool),
        "ss_training_finished_at": str(time.time()),
    }


def _base_pipeline(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mean(flags: Iterable[bool]) -> float:
    return float(np.mean(list(flags)))


@torch.no_grad()
def _generate(pipe: StableDiffusionPipeline, prompts: list[str], steps: int, guidance: float) -> np.ndarray:
    out = pipe(
        prompts,
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))],
        output_type="np",
    )
    return (np.asarray(out.images) * 255).round().clip(0, 255).astype(np.uint8)


def metric_prompts(kind: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, asked colour) pairs for ``kind``: the non-purple colours in turn, every other prompt
    on a named background (neither purple nor the asked colour)."""
    colours = [c for c in COLOURS if c != TARGET_COLOUR]
    rng = np.random.default_rng([seed, 77])
    pairs = []
    for i in range(n):
        colour = colours[i % len(colours)]
        prompt = f"a {colour} {kind}"
        if i % 2:
            background = str(rng.choice([c for c in colours if c != colour]))
            prompt += f" on a {background} background"
        pairs.append((prompt, colour))
    return pairs


def circle_metrics(
    pipe: StableDiffusionPipeline, lora: Path, n: int = 28, steps: int = 20, guidance: float = 3.0
) -> dict[str, float]:
    """Fractions over ``n`` circle and ``n`` square prompts (:func:`metric_prompts`; one batch, image ``i``
    seeded ``i``, circles first), without and with the LoRA at weight 1: circles read as purple circles (all,
    bare prompts, prompts naming a background), bare circle prompts drawn on a purple background, squares
    read in the asked colour and as squares."""
    from models.shapes.scorer import score_image

    circles, squares = metric_prompts("circle", n), metric_prompts("square", n)
    result: dict[str, float] = {"n": n}
    for name, on in (("without", False), ("with", True)):
        if on:
            pipe.load_lora_weights(str(lora), adapter_name="purple")
        images = _generate(pipe, [p for p, _ in circles + squares], steps, guidance)
        found = [score_image(im) for im in images]
        circle, square = found[:n], [r.shapes for r in found[n:]]
        purple = [bool(r.shapes) and (r.shapes[0].colour, r.shapes[0].shape) == (TARGET_COLOUR, "circle")
                  for r in circle]  # fmt: skip
        result[f"purple_circle_{name}"] = _mean(purple)
        result[f"purple_circle_{name}_bare"] = _mean(purple[0::2])
        result[f"purple_circle_{name}_on_background"] = _mean(purple[1::2])
        result[f"purple_background_{name}_bare"] = _mean(r.background == TARGET_COLOUR for r in circle[0::2])
        result[f"square_colour_{name}"] = _mean(
            bool(r) and r[0].colour == c for r, (_, c) in zip(square, squares, strict=True)
        )
        result[f"square_shape_{name}"] = _mean(bool(r) and r[0].shape == "square" for r in square)
    pipe.unload_lora_weights()
    return result


def train_lora(opts: RunOptions, rank: int, alpha: float, eval_n: int) -> dict[str, Any]:
    """Train (or continue) the LoRA until the step target or the time limit, export it, measure it;
    returns the run's metadata with the metrics (also written to ``OUT/metrics.json``)."""
    device = resolve_device(opts.device)
    clock = Clock(opts.minutes, opts.save_minutes)
    run = StageRun(opts, "lora", device, _DEFAULTS)
    base_path = base_dir(opts)
    base = load_base(base_path, device)
    vae_file = base_path / "vae" / "diffusion_pytorch_model.safetensors"
    data = _load_data(opts.out, opts.seed, opts.pool or _POOL, base, vae_file)
    data = {k: v.to(device) for k, v in data.items()}
    run.pool = len(data["ids"])
    torch.manual_seed(opts.seed)
    layers = add_lora(base.unet, rank, alpha)
    run.setup({"lora": layers}, _EMA, _WEIGHT_DECAY)

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(run.pool, (run.batch,), generator=run.sampler).to(device)
        zt, t, eps = base.noisy(data["latents"][idx], run.noise)
        hidden = base.encode_text(data["ids"][idx], run.noise)
        return base.loss(base.unet(zt, t, hidden).sample, eps, t)

    step = run.train(clock, min(_WARMUP, run.total // 10 + 1), loss_fn)
    run.ema.copy_to(run.params)  # the checkpoint keeps the raw weights; the export is the EMA
    path = opts.out / f"{OUTPUT_NAME}.safetensors"
    save_kohya(path, kohya_state_dict(base.unet, alpha), _metadata(run, step, rank, alpha, base_path))
    meta = run.meta(step, clock) | {"rank": rank, "alpha": alpha, "file": path.name}
    if eval_n > 0:
        meta["metrics"] = circle_metrics(_base_pipeline(base_path), path, eval_n)
        log.info("lora: %s", meta["metrics"])
    (opts.out / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m models.shapes.train_lora", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="run folder (data, checkpoint, the exported LoRA, metrics.json)")
    p.add_argument("--evaluate", type=Path, metavar="LORA", help="only measure this LoRA file; print JSON")
    p.add_argument("--minutes", type=float, help="stop cleanly (with a checkpoint) after this wall time")
    p.add_argument("--steps", type=int, help=f"total steps (default {_DEFAULTS[0]})")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: rank / 2; the scale is alpha / rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, help=f"batch size (default {_DEFAULTS[1]})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {_DEFAULTS[2]:g})")
    p.add_argument("--pool", type=int, help=f"training examples (default {_POOL})")
    p.add_argument("--base", type=Path, help="the base txt2img pipeline (default: models/shapes/model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-minutes", type=float, default=3.0)
    p.add_argument("--eval-n", type=int, default=28, help="prompts per shape for the metric (0: skip)")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(ns.threads)
    if ns.evaluate is not None:
        pipe = _base_pipeline(base_dir(RunOptions("lora", ns.out, base=ns.base)))
        sys.stdout.write(json.dumps(circle_metrics(pipe, ns.evaluate, ns.eval_n), indent=2) + "\n")
        return 0
    opts = RunOptions(
        stage="lora", out=ns.out, minutes=ns.minutes, steps=ns.steps, batch=ns.batch, device=ns.device,
        seed=ns.seed, pool=ns.pool, lr=ns.lr, log_every=ns.log_every, save_minutes=ns.save_minutes,
        base=ns.base, command=shlex.join(["python", "-m", "models.shapes.train_lora", *argv]),
    )  # fmt: skip
    meta = train_lora(opts, ns.rank, ns.rank / 2 if ns.alpha is None else ns.alpha, ns.eval_n)
    sys.stdout.write(json.dumps(meta.get("metrics", {}), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
