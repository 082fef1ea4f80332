"""Shared parts of the shapes training script: model configs and builders, schedulers, run options."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from models.families import SD_NOISE_SCHEDULE

__all__ = [
    "REAL",
    "SD_SCHEDULE",
    "TINY",
    "TOKEN_LENGTH",
    "ModelConfig",
    "StageResult",
    "RunOptions",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "inference_scheduler",
    "lr_at",
    "noise_scheduler",
    "resolve_device",
]

log = logging.getLogger(__name__)

CLIP_VOCAB = 49408
TOKEN_LENGTH = 77
#: SD 1.x training schedule: 1000 steps, scaled_linear 0.00085-0.012, epsilon.
SD_SCHEDULE = SD_NOISE_SCHEDULE


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the three trained components (the VAE needs 4 levels for its 8x scale factor)."""

    vae_channels: tuple[int, ...] = (32, 64, 64, 96)
    vae_groups: int = 16
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (48, 96, 96)
    unet_heads: tuple[int, ...] = (2, 4, 4)
    unet_groups: int = 16


#: The real configuration: 18.3 MB of fp16 weights (VAE 1.99 M, text encoder 3.27 M, UNet 3.90 M parameters);
#: the saved pipeline, tokenizer files included, stays under 20 MB.
REAL = ModelConfig()
#: A tiny configuration for tests (the text encoder's 49,408-token table is most of it).
TINY = ModelConfig((8, 8, 16, 16), 8, 16, 1, 2, (16, 32), (1, 2), 8)


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """AutoencoderKL with 4 latent channels and an 8x scale factor (64x64 -> 8x8)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=cfg.vae_groups,
        sample_size=64,
    )


def build_text_encoder(cfg: ModelConfig) -> CLIPTextModel:
    """CLIP text encoder over the real 49,408-token vocabulary, 77 positions, quick_gelu like SD 1.x."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB,
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=TOKEN_LENGTH,
            projection_dim=cfg.text_hidden,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """UNet on 8x8x4 latents with (cross-)attention at every level, so it sees the whole field."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        attention_head_dim=cfg.unet_heads,  # diffusers reads this as the number of heads
        cross_attention_dim=cfg.text_hidden,
        norm_num_groups=cfg.unet_groups,
    )


def noise_scheduler() -> DDPMScheduler:
    """The training noise schedule (as SD 1.x)."""
    return DDPMScheduler(**SD_SCHEDULE, clip_sample=False)


def inference_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler saved with the pipeline: DPM-Solver++ 2M on the training schedule."""
    return DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)


@dataclass
class RunOptions:
    """Command-line options of one run (see ``python -m models.shapes.train --help``)."""

    stage: str
    out: Path
    minutes: float | None = None
    steps: int | None = None
    batch: int | None = None
    device: str = "auto"
    seed: int = 0
    pool: int | None = None
    tiny: bool = False
    lr: float | None = None
    log_every: int = 50
    save_minutes: float = 3.0
    workers: int | None = None
    eval_n: int = 200
    compile: bool | None = None  # None: on for CUDA
    base: Path | None = None  # inpaint/controlnet stages: the base txt2img pipeline folder
    command: str = ""
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))

    @property
    def config(self) -> ModelConfig:
        return TINY if self.tiny else REAL

    def use_compile(self, device: torch.device) -> bool:
        """Whether to torch.compile the models: ``--compile``/``--no-compile``, else on CUDA only."""
        return self.compile if self.compile is not None else device.type == "cuda"

    @property
    def record(self) -> dict[str, str]:
        """This run, for a stage's list of commands: the command line and its start time (UTC)."""
        return {"command": self.command, "started": self.started}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but no CUDA device is available")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class StageResult:
    """What one run of a stage did: steps ``start_step`` -> ``step`` of ``total_steps``, the smoothed loss."""

    stage: str
    start_step: int
    step: int
    total_steps: int
    loss: float
    finished: bool
    seconds: float
