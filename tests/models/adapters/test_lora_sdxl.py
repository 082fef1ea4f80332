"""Tests for LoRAs on SDXL pipelines (models.adapters.lora.LoraSet), without an SDXL-sized model.

The tiny SDXL family has none of SDXL's widths, so these tests put two-layer text encoders with SDXL's real
widths (CLIP-L 768, OpenCLIP-G 1280 with its projection) into an SDXL pipeline around the tiny UNet: enough
for text-encoder LoRAs named the way kohya names SDXL's encoders (``lora_te1_``, ``lora_te2_``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.adapters.lora import ActiveLora, LoraSet, inspect_lora
from models.families import Family
from models.tiny import tiny_path
from storage.errors import InvalidRequestError
from tests.models.adapters.test_lora import SDXL_KOHYA_LAYERS, kohya_state_dict, sd15_kohya_layers

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TE1_Q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
TE2_FC2 = "lora_te2_text_model_encoder_layers_1_mlp_fc2"
TE2_PROJECTION = "lora_te2_text_projection"
TE2_LOKR = "lora_te2_text_model_encoder_layers_0_mlp_fc1"


@pytest.fixture(scope="module")
def lora_tiny_sdxl(tiny_models: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path(tiny_models, "sdxl"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_real_encoders(tiny: StableDiffusionXLPipeline) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline with fresh two-layer text encoders of SDXL's real widths."""
    torch.manual_seed(0)
    common = {"vocab_size": 49408, "max_position_embeddings": 77, "num_hidden_layers": 2}
    te1 = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, **common)
    )
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, **common
        )
    )
    return StableDiffusionXLPipeline(
        vae=tiny.vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tiny.tokenizer,
        tokenizer_2=tiny.tokenizer_2,
        unet=tiny.unet,
        scheduler=tiny.scheduler,
    )


@pytest.fixture(scope="module")
def lora_sdxl_encoders(lora_tiny_sdxl: StableDiffusionXLPipeline) -> StableDiffusionXLPipeline:
    return _with_real_encoders(lora_tiny_sdxl)


def _encode(pipe: StableDiffusionXLPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a photo of a cat", device="cpu", do_classifier_free_guidance=False
        )
    return embeds, pooled


def _sdxl_text_lora() -> dict[str, torch.Tensor]:
    """LoRA pairs on both encoders and the projection, plus one LoKr layer on the second encoder.

    The second encoder's LoRA pairs are MLP-only, which diffusers' text-encoder loader cannot read in PEFT
    spelling.
    """
    sd = kohya_state_dict(
        {TE1_Q: (768, 768, None), TE2_FC2: (5120, 1280, None), TE2_PROJECTION: (1280, 1280, None)}, rank=4
    )
    gen = torch.Generator().manual_seed(5)
    sd.update(
        {
            f"{TE2_LOKR}.lokr_w1": torch.randn(80, 40, generator=gen) * 0.1,  # 5120 = 80 x 64, 1280 = 40 x 32
            f"{TE2_LOKR}.lokr_w2_a": torch.randn(64, 4, generator=gen) * 0.1,
            f"{TE2_LOKR}.lokr_w2_b": torch.randn(4, 32, generator=gen) * 0.1,
            f"{TE2_LOKR}.alpha": torch.tensor(2.0),
        }
    )
    return sd


def test_sdxl_text_encoder_lora_reaches_both_encoders_and_comes_off_exactly(
    lora_sdxl_encoders: StableDiffusionXLPipeline,
) -> None:
    pipe = lora_sdxl_encoders
    sd = _sdxl_text_lora()
    info = inspect_lora(sd)
    assert info is not None
    assert (info.format, info.family, info.details["parts"]) == (
        "lycoris-lokr",
        Family.sdxl,
        ["text_encoder", "text_encoder_2"],
    )
    fc1 = pipe.text_encoder_2.text_model.encoder.layers[0].mlp.fc1.weight
    fc1_before = fc1.detach().clone()
    projection_before = pipe.text_encoder_2.text_projection.weight.detach().clone()
    embeds, pooled = _encode(pipe)
    lora_set = LoraSet(pipe)
    assert lora_set.family == Family.sdxl
    lora_set.activate(pipe, [ActiveLora(key="xl", state_dict=sd, info=info, weight=1.0)])
    try:
        w1 = sd[f"{TE2_LOKR}.lokr_w1"]
        w2 = sd[f"{TE2_LOKR}.lokr_w2_a"] @ sd[f"{TE2_LOKR}.lokr_w2_b"]
        live = pipe.text_encoder_2.text_model.encoder.layers[0].mlp.fc1
        assert torch.allclose(
            live.base_layer.weight if hasattr(live, "base_layer") else live.weight,
            fc1_before + torch.kron(w1, w2) * 2.0 / 4,
            atol=1e-6,
        )
        # the projection's LoRA pair goes in as a delta weight (alpha 2 / rank 4)
        up, down = sd[f"{TE2_PROJECTION}.lora_up.weight"], sd[f"{TE2_PROJECTION}.lora_down.weight"]
        projection = pipe.text_encoder_2.text_projection
        assert torch.allclose(projection.weight, projection_before + 0.5 * up @ down, atol=1e-6)
        lora_embeds, lora_pooled = _encode(pipe)
        adapters = pipe.get_list_adapters()
        assert adapters["text_encoder"] == ["lora_xl"] and adapters["text_encoder_2"] == ["lora_xl"]
    finally:
        lora_set.deactivate(pipe)
    # CLIP-L fills the first 768 channels of the prompt embeds, OpenCLIP-G the other 1280 and the pooled one
    assert not torch.allclose(lora_embeds[..., :768], embeds[..., :768], atol=1e-5)
    assert not torch.allclose(lora_embeds[..., 768:], embeds[..., 768:], atol=1e-5)
    assert not torch.allclose(lora_pooled, pooled, atol=1e-5)
    after_embeds, after_pooled = _encode(pipe)
    assert torch.equal(after_embeds, embeds) and torch.equal(after_pooled, pooled)
    assert torch.equal(fc1, fc1_before)
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, projection_before)
    lora_set.clear(pipe)


def test_sdxl_pipeline_refuses_sd15_loras_and_loras_that_do_not_fit_it(
    lora_tiny_sdxl: StableDiffusionXLPipeline,
) -> None:
    pipe = lora_tiny_sdxl
    lora_set = LoraSet(pipe)
    sd15 = kohya_state_dict(sd15_kohya_layers())
    sd15_info = inspect_lora(sd15)
    assert sd15_info is not None
    with pytest.raises(InvalidRequestError) as refused:
        lora_set.activate(pipe, [ActiveLora(key="sd15", state_dict=sd15, info=sd15_info)])
    assert str(refused.value) == "This LoRA is for SD 1.5; this server's model is SDXL."
    xl = kohya_state_dict(SDXL_KOHYA_LAYERS)  # SDXL's real widths; the tiny model's are not
    xl_info = inspect_lora(xl)
    assert xl_info is not None
    with pytest.raises(InvalidRequestError) as refused:
        lora_set.activate(pipe, [ActiveLora(key="xl", state_dict=xl, info=xl_info)])
    assert (
        str(refused.value)
        == "This LoRA does not fit the layers of this server's model; upload a LoRA made for it."
    )
    assert lora_set.resident == () and lora_set.active == ()


def test_a_failed_activation_switches_off_the_lora_it_had_just_loaded(
    lora_tiny_sdxl: StableDiffusionXLPipeline,
) -> None:
    pipe = _with_real_encoders(lora_tiny_sdxl)  # fresh encoders: no LoRA layer was ever switched off in them
    embeds, pooled = _encode(pipe)
    good = kohya_state_dict({TE1_Q: (768, 768, None), TE2_FC2: (5120, 1280, None)})
    good_info = inspect_lora(good)
    assert good_info is not None
    broken = {
        k: v for k, v in good.items() if not k.endswith("lora_up.weight")
    }  # recognised as the same file
    lora_set = LoraSet(pipe)
    with pytest.raises(InvalidRequestError):
        lora_set.activate(
            pipe,
            [
                ActiveLora(key="good", state_dict=good, info=good_info),
                ActiveLora(key="broken", state_dict=broken, info=good_info),
            ],
        )
    assert lora_set.resident == ("good",) and lora_set.active == ()
    after_embeds, after_pooled = _encode(pipe)
    assert torch.equal(after_embeds, embeds) and torch.equal(after_pooled, pooled)
