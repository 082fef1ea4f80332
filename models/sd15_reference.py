"""A Stable Diffusion 1.5-shaped pipeline with random weights, for checking real adapter files offline.

Real LoRAs, embeddings and hypernetworks name SD 1.5's layers and carry its widths (320/640/1280 UNet
channels, 768-wide cross-attention, the ViT-L/14 text encoder), so only a model with exactly those shapes can
apply them. The weights here are random (seeded); an 8×8 latent (64×64 pixels) keeps one step cheap on a CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from models.families import SD_NOISE_SCHEDULE
from models.tokenizer import load_clip_tokenizer

__all__ = [
    "ensure_sd15_reference",
    "sd15_reference_pipeline",
    "sd15_text_encoder",
    "sd15_unet",
    "sd15_vae",
]

log = logging.getLogger(__name__)


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's UNet (runwayml/stable-diffusion-v1-5 ``unet/config.json``), randomly initialised."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_vae(seed: int = 0) -> AutoencoderKL:
    """SD 1.5's VAE (``vae/config.json``), randomly initialised."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_text_encoder(seed: int = 0) -> CLIPTextModel:
    """The ViT-L/14 text encoder SD 1.5 uses (12 layers, width 768), randomly initialised."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def sd15_reference_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The whole SD 1.5-shaped pipeline on the CPU in float32, with the real CLIP tokenizer."""
    pipe = StableDiffusionPipeline(
        vae=sd15_vae(seed),
        text_encoder=sd15_text_encoder(seed),
        tokenizer=load_clip_tokenizer(),
        unet=sd15_unet(seed),
        scheduler=PNDMScheduler(**SD_NOISE_SCHEDULE, skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Bump when the saved reference model must be rebuilt.
REFERENCE_VERSION = "1"


def ensure_sd15_reference(folder: Path, seed: int = 0) -> Path:
    """Save the reference pipeline as a diffusers folder (fp16 weights, ~2 GB) unless it is there already.

    Engines load it like any configured model (``models = {"sd15-reference": folder}``), so the whole
    product path — upload, prompt tags, worker, PNG info — can run real SD 1.5 adapter files.
    """
    marker = folder / "dreamcord-reference.txt"
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == REFERENCE_VERSION:
        return folder
    pipe = sd15_reference_pipeline(seed)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    marker.write_text(REFERENCE_VERSION + "\n", encoding="utf-8")
    log.info("saved the SD 1.5-shaped reference model to %s", folder)
    return folder
