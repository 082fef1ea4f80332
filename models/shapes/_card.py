"""The shapes pipeline's model card (``README.md``): written at export, its metrics block filled by
``python -m models.shapes.evaluate --update-card``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from models.shapes.scenes import HELD_OUT

__all__ = ["METRICS_END", "METRICS_START", "update_metrics", "write_model_card"]

log = logging.getLogger(__name__)

METRICS_START = "<!-- metrics:start -->"
METRICS_END = "<!-- metrics:end -->"
_NO_METRICS = "Not measured yet: run `python -m models.shapes.evaluate DIR/pipeline --sweep --update-card`."


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _stage_row(name: str, meta: dict[str, Any] | None) -> str:
    if meta is None:
        return f"| {name} | (no checkpoint) | | | | |"
    return (
        f"| {name} | {meta['step']} / {meta['total_steps']} | {meta['batch']} "
        f"| {_minutes(meta['wall_seconds'])} | {meta['device']} | {meta['loss']:.5f} |"
    )


def _components(pipe_dir: Path) -> list[str]:
    rows = []
    for name in ("vae", "text_encoder", "unet"):
        config = json.loads((pipe_dir / name / "config.json").read_text(encoding="utf-8"))
        weights = sum(f.stat().st_size for f in (pipe_dir / name).glob("*.safetensors"))
        keys = {
            "vae": (
                "block_out_channels",
                "layers_per_block",
                "latent_channels",
                "norm_num_groups",
                "scaling_factor",
            ),
            "text_encoder": (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
                "max_position_embeddings",
            ),
            "unet": (
                "block_out_channels",
                "down_block_types",
                "layers_per_block",
                "attention_head_dim",
                "cross_attention_dim",
                "sample_size",
            ),
        }[name]
        desc = ", ".join(f"{k}={config[k]}" for k in keys)
        rows.append(
            f"| {name} | `{config.get('_class_name') or config['architectures'][0]}` | {desc} "
            f"| {weights / 1e6:.2f} MB |"
        )
    return rows


def _vae_lines(m: dict[str, Any] | None) -> list[str]:
    if m is None:
        return []
    fmt = ", ".join(f"{k} {v:.0%}" for k, v in m["agreement"].items())
    acc = ", ".join(f"{k} {v:.0%}" for k, v in m["accuracy_reconstruction"].items())
    return [
        f"VAE reconstruction on {m['n']} scenes: PSNR {m['psnr']:.1f} dB; the scorer reads the same on the "
        f"original and the reconstruction: {fmt}; scorer accuracy on the reconstructions: {acc}.",
        "",
    ]


def write_model_card(pipe_dir: Path, out: Path, unet_meta: dict[str, Any]) -> None:
    """Write ``pipe_dir/README.md`` from the run folder ``out`` (``vae/training.json``) and the UNet
    stage's metadata (step, total_steps, batch, lr, loss, device, wall_seconds, seed, pool, commands)."""
    path = out / "vae" / "training.json"
    vae_meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    size = sum(f.stat().st_size for f in pipe_dir.rglob("*") if f.is_file())
    held = ", ".join(f"{c} {s}" for s, c in sorted(HELD_OUT))
    runs = {
        (r["started"], r["command"])
        for r in [*(vae_meta["commands"] if vae_meta else []), *unet_meta["commands"]]
    }
    commands = [f"{command}  # {started} UTC" for started, command in sorted(runs)]
    lines = [
        "# shapes: a tiny text-to-image latent diffusion model",
        "",
        "Trained from scratch with `models/shapes/train.py` on procedurally drawn 64×64 scenes "
        "(`models/shapes/scenes.py`): one or two flat shapes (circle, square, triangle, star, ring, "
        "cross) in 8 colours, 9 positions and 2 sizes on a plain or two-tone background, with varied "
        "captions.",
        "",
        "## Data",
        "",
        f"- {unet_meta['pool']} scenes drawn once (seed {unet_meta['seed']}); these (shape, colour) "
        f"combinations never appear in training: {held}.",
        "- 10 % of the captions are replaced by the empty caption at training time (classifier-free "
        "guidance).",
        "",
        "## Components (fp16 safetensors; load as fp32 or fp16)",
        "",
        "| component | class | config | weights |",
        "| --- | --- | --- | --- |",
        *_components(pipe_dir),
        "| scheduler | `DPMSolverMultistepScheduler` | trained as DDPM: 1000 steps, scaled_linear "
        "0.00085–0.012, epsilon | |",
        "| tokenizer | `CLIPTokenizer` | the real CLIP BPE vocabulary (49,408 tokens), 77 tokens | |",
        "",
        f"The whole folder is {size / 1e6:.1f} MB.",
        "",
        "## Training",
        "",
        "| stage | steps | batch | wall time | device | final loss |",
        "| --- | --- | --- | --- | --- | --- |",
        _stage_row("VAE (MSE + L1, foreground ×11, KL 1e-7, EMA)", vae_meta),
        _stage_row("text encoder + UNet (Min-SNR-5, AdamW, cosine, EMA)", unet_meta),
        "",
        *_vae_lines(None if vae_meta is None else vae_meta["reconstruction"]),
        "Commands run (each resumes the last checkpoint):",
        "",
        "```",
        *commands,
        "```",
        "",
        "## Metrics",
        "",
        METRICS_START,
        _NO_METRICS,
        METRICS_END,
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)",
        'image = pipe("a small red star at the top left on a blue background", guidance_scale=3).images[0]',
        "```",
        "",
    ]
    (pipe_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def update_metrics(readme: Path, markdown: str) -> None:
    """Replace the metrics block of a model card (between the markers) with ``markdown``."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(METRICS_START), text.find(METRICS_END)
    if start < 0 or end < start:
        text = f"{text.rstrip()}\n\n## Metrics\n\n{METRICS_START}\n{METRICS_END}\n"
        start, end = text.find(METRICS_START), text.find(METRICS_END)
    readme.write_text(
        f"{text[: start + len(METRICS_START)]}\n{markdown.strip()}\n{text[end:]}", encoding="utf-8"
    )
    log.info("updated the metrics in %s", readme)
