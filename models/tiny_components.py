"""Random-weight tiny components of the offline model family (see :mod:`models.tiny`).

Every factory seeds torch's global generator first, like diffusers' own tests, so a component is the same
tensor for tensor on every build. Shapes follow the real models (CLIP vocabulary, 8x VAE, SDXL's text_time
conditioning, the x4 upscaler's 7-channel UNet) at a tiny width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.families import SD_NOISE_SCHEDULE

__all__ = [
    "ESRGAN_BLOCKS",
    "ESRGAN_FEATURES",
    "TEXT_HIDDEN",
    "controlnet_from_unet",
    "esrgan_state_dict",
    "sd15_scheduler",
    "sd15_unet",
    "sdxl_scheduler",
    "sdxl_unet",
    "text_encoder",
    "text_encoder_with_projection",
    "upscaler_schedulers",
    "upscaler_unet",
    "upscaler_vae",
    "vae",
]

TEXT_HIDDEN = 32
CLIP_VOCAB = 49408
ESRGAN_FEATURES = 16
ESRGAN_BLOCKS = 2
_ESRGAN_GROWTH = 32  # spandrel's RRDBNet hard-codes the growth channels (gc) to 32

_SD_BETAS = SD_NOISE_SCHEDULE


def _text_config(hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def text_encoder(seed: int) -> CLIPTextModel:
    """CLIP text encoder like SD 1.x's (quick_gelu), hidden 32, 2 layers, 4 heads."""
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config("quick_gelu"))


def text_encoder_with_projection(seed: int) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder (OpenCLIP-like, gelu) with a 32-wide text projection."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config("gelu"))


def vae(seed: int, *, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A 4-block AutoencoderKL: 4 latent channels, scale factor 8 (what ControlNet's embedding expects)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def sd15_unet(seed: int, *, in_channels: int = 4) -> UNet2DConditionModel:
    """SD 1.x-like UNet (in_channels 9 for inpainting), cross-attention in the lower block only."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def controlnet_from_unet(unet: UNet2DConditionModel, seed: int) -> ControlNetModel:
    """ControlNet copied from ``unet`` (sd15 or sdxl); its condition embedding downsamples 8x, like the VAE.

    A fresh ControlNet's "zero convolutions" make it a no-op; here they get ordinary random weights, as a
    trained one would have, so the control image really changes the output.
    """
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    zero_convs = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    for conv in zero_convs:
        conv.reset_parameters()
    return controlnet


def sdxl_unet(seed: int) -> UNet2DConditionModel:
    """SDXL-like UNet: text_time added conditioning, cross-attention over both encoders (32 + 32)."""
    time_embed_dim = 8
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 time ids (original size, crop top-left, target size) + text_encoder_2's pooled projection
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=32,
    )


def upscaler_unet(seed: int) -> UNet2DConditionModel:
    """x4-upscaler-like UNet: 4 latent + 3 image channels in, the noise level as one of 1000 class labels.

    It runs at the input's full size (a 64x64 image is a 64x64 latent), so it is narrower than the others,
    the first block has no attention and the second one head (CPU attention is slow with small heads):
    each of these makes 64->256 several times faster.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=1,  # diffusers reads this as the number of heads: one head of width 32
        use_linear_projection=True,
        class_embed_type=None,
        num_class_embeds=1000,
        norm_num_groups=16,
    )


def upscaler_vae(seed: int) -> AutoencoderKL:
    """3-block AutoencoderKL (scale factor 4) with the x4 upscaler's scaling factor 0.08333."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.08333,
    )


def sd15_scheduler() -> PNDMScheduler:
    """SD 1.5's own scheduler config (PNDM, PLMS steps)."""
    return PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler config (Euler, leading spacing)."""
    return EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading", interpolation_type="linear")


def upscaler_schedulers() -> tuple[DDIMScheduler, DDPMScheduler]:
    """The x4 upscaler's (scheduler, low_res_scheduler): v-prediction DDIM, and DDPM to noise the input."""
    betas: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "scaled_linear",
    }
    scheduler = DDIMScheduler(
        **betas, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return scheduler, DDPMScheduler(**betas, clip_sample=False, variance_type="fixed_small")


def _conv(
    state: dict[str, torch.Tensor],
    name: str,
    cin: int,
    cout: int,
    gen: torch.Generator,
    *,
    identity: bool = False,
    gain: float = 0.1,
) -> None:
    """Add a 3x3 conv: near-identity on the shared channels, or kaiming init times ``gain`` (basicsr: 0.1)."""
    if identity:
        weight = torch.randn(cout, cin, 3, 3, generator=gen) * 1e-3
        for i in range(min(cin, cout)):
            weight[i, i, 1, 1] += 1.0
    else:
        weight = torch.randn(cout, cin, 3, 3, generator=gen) * (gain * math.sqrt(2.0 / (cin * 9)))
    state[f"{name}.weight"] = weight.contiguous()
    state[f"{name}.bias"] = torch.zeros(cout)


def esrgan_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A tiny x4 RRDBNet in Real-ESRGAN's (basicsr) key layout: 16 features, 2 RRDB blocks, growth 32.

    The trunk convolutions are near-identity and the residual blocks small, so the network behaves roughly
    like a 4x nearest-neighbour upscale of an image in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    nf, gc = ESRGAN_FEATURES, _ESRGAN_GROWTH
    state: dict[str, torch.Tensor] = {}
    _conv(state, "conv_first", 3, nf, gen, identity=True)
    for block in range(ESRGAN_BLOCKS):
        for rdb in (1, 2, 3):
            prefix = f"body.{block}.rdb{rdb}"
            for i in range(1, 5):
                _conv(state, f"{prefix}.conv{i}", nf + (i - 1) * gc, gc, gen)
            _conv(state, f"{prefix}.conv5", nf + 4 * gc, nf, gen)
    _conv(state, "conv_body", nf, nf, gen, gain=0.01)  # keeps the trunk's residual small
    for name in ("conv_up1", "conv_up2", "conv_hr"):
        _conv(state, name, nf, nf, gen, identity=True)
    _conv(state, "conv_last", nf, 3, gen, identity=True)
    return state
