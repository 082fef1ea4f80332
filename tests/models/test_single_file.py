"""Single-file (A1111) checkpoints: export to the LDM layout, detect the family, load back offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.ldm_export import export_to_ldm, save_config_dir, save_single_file
from models.single_file import (
    CONFIGS_DIR,
    CheckpointKind,
    detect_checkpoint,
    detect_family,
    load_single_file,
    read_safetensors_keys,
    resolve_config_dir,
)
from storage.errors import InvalidRequestError

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


# --- helpers ------------------------------------------------------------------------------------------


def _export(pipe: Any, tmp_path: Path, *, keep_tokenizers: bool = False) -> tuple[Path, Path]:
    """Write ``pipe`` as one .safetensors plus a weightless config folder (tokenizers dropped by default)."""
    checkpoint = save_single_file(pipe, tmp_path / "model.safetensors")
    config = save_config_dir(pipe, tmp_path / "config")
    assert not list(config.rglob("*.safetensors")), "the config folder must hold no weights"
    if not keep_tokenizers:  # the loader must then fall back on the repository's CLIP tokenizer
        for name in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(config / name, ignore_errors=True)
    return checkpoint, config


def _assert_same_weights(original: Any, loaded: Any) -> None:
    for name in COMPONENTS:
        if getattr(original, name, None) is None:
            continue
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        different = [key for key in want if not torch.equal(want[key], got[key])]
        assert not different, f"{name}: {different[:5]}"


def _image(pipe: Any, seed: int = 7, **extra: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a red circle on a blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **extra,
    )
    return np.asarray(out.images)


def _one_sentence(message: str) -> None:
    assert message.endswith(".") and ". " not in message and "/" not in message and "\n" not in message


def _tiny(tiny_models: Path, name: str, cls: Any) -> Any:
    return cls.from_pretrained(tiny_models / name, local_files_only=True)


def _meta_pipeline(name: str) -> SimpleNamespace:
    """Real-size components from a shipped config folder, on the meta device (shapes only, no memory)."""
    folder = CONFIGS_DIR / name
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_2 = None
        if (folder / "text_encoder_2").is_dir():
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


# --- round trips on the tiny family -------------------------------------------------------------------


def test_sd15_round_trip_is_exact(tiny_models: Path, tmp_path: Path) -> None:
    pipe = _tiny(tiny_models, "sd15", StableDiffusionPipeline)
    checkpoint, config = _export(pipe, tmp_path)
    assert detect_checkpoint(checkpoint) == CheckpointKind("sd15", inpainting=False)

    loaded = load_single_file(checkpoint, config_dir=config)

    assert type(loaded) is StableDiffusionPipeline and loaded.safety_checker is None
    _assert_same_weights(pipe, loaded)
    assert dict(loaded.scheduler.config) == dict(pipe.scheduler.config)
    prompt = "a red circle"
    assert loaded.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
    want = _image(pipe)
    assert np.abs(_image(loaded) - want).max() < 1e-5
    assert np.abs(_image(pipe, seed=8) - want).max() > 1e-3  # the comparison can tell images apart


def test_sdxl_round_trip_is_exact(tiny_models: Path, tmp_path: Path) -> None:
    pipe = _tiny(tiny_models, "sdxl", StableDiffusionXLPipeline)
    checkpoint, config = _export(pipe, tmp_path)
    keys = read_safetensors_keys(checkpoint)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert detect_checkpoint(checkpoint) == CheckpointKind("sdxl", inpainting=False)

    loaded = load_single_file(checkpoint, config_dir=config)

    assert type(loaded) is StableDiffusionXLPipeline
    _assert_same_weights(pipe, loaded)  # both tiny encoders are 32 wide: each must come from its own slot
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    assert np.abs(_image(loaded) - _image(pipe)).max() < 1e-5


def test_inpainting_round_trip(tiny_models: Path, tmp_path: Path) -> None:
    pipe = _tiny(tiny_models, "sd15-inpaint", StableDiffusionInpaintPipeline)
    checkpoint, config = _export(pipe, tmp_path, keep_tokenizers=True)
    kind = detect_checkpoint(checkpoint)
    assert kind == CheckpointKind("sd15", inpainting=True) and kind.config_name == "sd15-inpaint"

    loaded = load_single_file(checkpoint, config_dir=config)

    assert type(loaded) is StableDiffusionInpaintPipeline and loaded.unet.config.in_channels == 9
    _assert_same_weights(pipe, loaded)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    extra = {"image": image, "mask_image": mask}
    assert np.abs(_image(loaded, **extra) - _image(pipe, **extra)).max() < 1e-5


def test_half_precision_export_loads_as_half(tiny_models: Path, tmp_path: Path) -> None:
    pipe = _tiny(tiny_models, "sd15", StableDiffusionPipeline)
    checkpoint = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    config = save_config_dir(pipe, tmp_path / "config")
    assert {t.dtype for t in load_file(str(checkpoint)).values()} == {torch.float16}

    loaded = load_single_file(checkpoint, config_dir=config, torch_dtype=torch.float16)

    assert loaded.unet.dtype == torch.float16 and loaded.text_encoder.dtype == torch.float16
    pipe.to(torch.float16)
    _assert_same_weights(pipe, loaded)


@pytest.mark.parametrize("old_text_layout", [False, True])
def test_a1111_extras_are_ignored_and_v_pred_marker_sets_the_scheduler(
    tiny_models: Path, tmp_path: Path, old_text_layout: bool
) -> None:
    """Real A1111 files carry position_ids (sometimes damaged), DDPM buffers and EMA counters, some the older
    text-encoder keys without ``text_model.``; v-prediction files carry a ``v_pred`` marker key."""
    pipe = _tiny(tiny_models, "sd15", StableDiffusionPipeline)
    checkpoint, config = _export(pipe, tmp_path)
    state = load_file(str(checkpoint))
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.rand(1, 77) * 76
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["v_pred"] = torch.tensor([])
    if old_text_layout:
        old, new = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
        state = {key.replace(old, new): value for key, value in state.items()}
    save_file(state, str(checkpoint))
    assert detect_checkpoint(checkpoint) == CheckpointKind("sd15", prediction_type="v_prediction")

    loaded = load_single_file(checkpoint, config_dir=config)

    _assert_same_weights(pipe, loaded)
    ids = loaded.text_encoder.embeddings.position_ids
    assert torch.equal(ids, torch.arange(77)[None])  # the damaged copy was not used
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert type(loaded.scheduler) is type(pipe.scheduler)


def test_sidecar_config_folder_beside_the_checkpoint(tiny_models: Path, tmp_path: Path) -> None:
    pipe = _tiny(tiny_models, "sd15", StableDiffusionPipeline)
    checkpoint, config = _export(pipe, tmp_path)
    kind = detect_checkpoint(checkpoint)
    assert resolve_config_dir(checkpoint, kind) == CONFIGS_DIR / "sd15"
    config.rename(tmp_path / "model.config")
    assert resolve_config_dir(checkpoint, kind) == tmp_path / "model.config"
    assert resolve_config_dir(checkpoint, kind, tmp_path / "elsewhere") == tmp_path / "elsewhere"

    loaded = load_single_file(str(checkpoint))  # no config_dir: the sidecar (tiny) config must be used

    _assert_same_weights(pipe, loaded)


# --- broken or foreign files --------------------------------------------------------------------------


def test_missing_and_misshaped_weights_are_refused(tiny_models: Path, tmp_path: Path) -> None:
    pipe = _tiny(tiny_models, "sd15", StableDiffusionPipeline)
    checkpoint, config = _export(pipe, tmp_path)
    state = load_file(str(checkpoint))
    dropped = {
        k: v for k, v in state.items() if not k.startswith("cond_stage_model.transformer.text_model.final")
    }
    save_file(dropped, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InvalidRequestError, match="missing some of its weights") as missing:
        load_single_file(tmp_path / "partial.safetensors", config_dir=config)
    _one_sentence(str(missing.value))

    unet_config = json.loads((config / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [32, 32]
    (config / "unet" / "config.json").write_text(json.dumps(unet_config))
    with pytest.raises(InvalidRequestError, match="do not fit") as misfit:
        load_single_file(checkpoint, config_dir=config)
    _one_sentence(str(misfit.value))


def test_non_sd_files_and_pickles_are_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    for name in ("lora/analog_svd_rank4.safetensors", "embeddings/EasyNegative.safetensors"):
        with pytest.raises(InvalidRequestError, match="not a Stable Diffusion 1.x or SDXL model") as err:
            load_single_file(fixtures_dir / name)
        _one_sentence(str(err.value))

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(InvalidRequestError, match="only load .safetensors") as pickled:
        load_single_file(ckpt)
    _one_sentence(str(pickled.value))

    disguised = tmp_path / "model.safetensors"
    shutil.copyfile(ckpt, disguised)
    with pytest.raises(InvalidRequestError, match="not a readable safetensors") as unreadable:
        detect_checkpoint(disguised)
    _one_sentence(str(unreadable.value))


# --- real-size layouts (meta tensors: shapes only) ----------------------------------------------------

SD15_KEYS = {  # names and shapes as in the published v1-5-pruned-emaonly.safetensors
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias": (768,),
}
SDXL_KEYS = {  # as in the published sd_xl_base_1.0.safetensors
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
}


def _count(keys: Any, prefix: str) -> int:
    return sum(key.startswith(prefix) for key in keys)


SD15_PARTS = {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
SDXL_PARTS = {
    "model.diffusion_model.": 1680,
    "first_stage_model.": 248,
    "conditioner.embedders.0.": 196,  # + position_ids in the published file
    "conditioner.embedders.1.": 389,  # + logit_scale in the published file
}


@pytest.mark.parametrize(
    ("name", "known", "parts"), [("sd15", SD15_KEYS, SD15_PARTS), ("sdxl", SDXL_KEYS, SDXL_PARTS)]
)
def test_real_layout_matches_the_published_checkpoint(
    name: str, known: dict[str, tuple[int, ...]], parts: dict[str, int]
) -> None:
    shapes = _shapes(export_to_ldm(_meta_pipeline(name)))
    assert {key: shapes.get(key) for key in known} == known
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in shapes  # the top level has none
    assert {prefix: _count(shapes, prefix) for prefix in parts} == parts and len(shapes) == sum(
        parts.values()
    )
    assert detect_family(shapes, shapes) == CheckpointKind(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_diffusers_reads_our_export_back_to_the_same_shapes(name: str) -> None:
    """Diffusers' own LDM → diffusers converters must recover every real-size tensor name and shape."""
    pipe = _meta_pipeline(name)
    exported = export_to_ldm(pipe)
    unet = convert_ldm_unet_checkpoint(exported, pipe.unet.config)
    assert _shapes(unet) == _shapes(pipe.unet.state_dict())
    vae = convert_ldm_vae_checkpoint(exported, pipe.vae.config)
    assert _shapes(vae) == _shapes(pipe.vae.state_dict())
    if pipe.text_encoder_2 is not None:
        text_2 = convert_open_clip_checkpoint(
            pipe.text_encoder_2, exported, prefix="conditioner.embedders.1.model."
        )
        assert _shapes(text_2) == _shapes(pipe.text_encoder_2.state_dict())


def test_inpainting_and_foreign_layouts_by_shape() -> None:
    sd15 = _shapes(export_to_ldm(_meta_pipeline("sd15")))
    assert detect_family(sd15, {**sd15, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}) == (
        CheckpointKind("sd15", inpainting=True)
    )
    xl = _shapes(export_to_ldm(_meta_pipeline("sdxl-inpaint")))
    assert detect_family(xl, xl).config_name == "sdxl-inpaint"

    pix2pix = {**sd15, "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}
    sd2 = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.model."): v
        for k, v in sd15.items()
    }
    wrong_context = {
        **sd15,
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    }
    refiner = {k: v for k, v in xl.items() if not k.startswith("conditioner.embedders.0.")}
    unet_only = {k: v for k, v in sd15.items() if k.startswith("model.diffusion_model.")}
    no_unet = {k: v for k, v in sd15.items() if not k.startswith("model.diffusion_model.")}
    for shapes in (pix2pix, sd2, wrong_context, refiner, unet_only, no_unet, {}):
        with pytest.raises(InvalidRequestError) as err:
            detect_family(shapes, shapes)
        _one_sentence(str(err.value))


# --- the shipped config folders -----------------------------------------------------------------------


def test_shipped_sd15_configs() -> None:
    folder = CONFIGS_DIR / "sd15"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["in_channels"] == 4 and unet["attention_head_dim"] == 8 and unet["layers_per_block"] == 2
    assert AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (768, 12, 12)
    assert (text.intermediate_size, text.hidden_act, text.max_position_embeddings) == (3072, "quick_gelu", 77)
    assert (text.vocab_size, text.projection_dim) == (49408, 768)
    config = PNDMScheduler.from_pretrained(folder, subfolder="scheduler").config
    assert (config.num_train_timesteps, config.beta_schedule) == (1000, "scaled_linear")
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert config.skip_prk_steps and not config.set_alpha_to_one and config.steps_offset == 1


def test_shipped_sdxl_configs() -> None:
    folder = CONFIGS_DIR / "sdxl"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"]
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["addition_time_embed_dim"] == 256
    assert unet["projection_class_embeddings_input_dim"] == 2816 and unet["cross_attention_dim"] == 2048
    assert unet["addition_embed_type"] == "text_time" and unet["use_linear_projection"]
    assert AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"] == 0.13025
    text_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    assert (text_2.hidden_size, text_2.num_hidden_layers, text_2.num_attention_heads) == (1280, 32, 20)
    assert (text_2.projection_dim, text_2.hidden_act) == (1280, "gelu")
    assert CLIPTextConfig.from_pretrained(folder / "text_encoder").hidden_size == 768
    config = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler").config
    assert (config.beta_schedule, config.timestep_spacing, config.steps_offset) == (
        "scaled_linear",
        "leading",
        1,
    )


@pytest.mark.parametrize(
    ("base", "variant", "pipeline", "scheduler"),
    [
        ("sd15", "sd15-inpaint", "StableDiffusionInpaintPipeline", DDIMScheduler),
        ("sdxl", "sdxl-inpaint", "StableDiffusionXLInpaintPipeline", EulerDiscreteScheduler),
    ],
)
def test_inpaint_configs_differ_only_in_input_channels(
    base: str, variant: str, pipeline: str, scheduler: Any
) -> None:
    a, b = CONFIGS_DIR / base, CONFIGS_DIR / variant
    assert json.loads((b / "model_index.json").read_text())["_class_name"] == pipeline
    unet_a = json.loads((a / "unet" / "config.json").read_text())
    unet_b = json.loads((b / "unet" / "config.json").read_text())
    assert unet_b.pop("in_channels") == 9 and unet_a.pop("in_channels") == 4 and unet_a == unet_b
    for sub in ("vae/config.json", "text_encoder/config.json"):
        assert (a / sub).read_text() == (b / sub).read_text()
    loaded = scheduler.from_pretrained(b, subfolder="scheduler").config
    assert (loaded.beta_start, loaded.beta_end, loaded.steps_offset) == (0.00085, 0.012, 1)


@pytest.mark.slow
def test_real_size_sd15_round_trip_with_shipped_configs(tmp_path: Path) -> None:
    """Random real-size SD 1.5 (about 1 B parameters) → single file → loaded with the shipped configs."""
    from models.tokenizer import load_clip_tokenizer

    folder = CONFIGS_DIR / "sd15"
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        tokenizer=load_clip_tokenizer(),
        scheduler=PNDMScheduler.from_pretrained(folder, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    checkpoint = save_single_file(pipe, tmp_path / "real.safetensors", dtype=torch.float16)
    pipe.to(torch.float16)

    loaded = load_single_file(checkpoint, torch_dtype=torch.float16)

    _assert_same_weights(pipe, loaded)
    assert dict(loaded.scheduler.config) == dict(pipe.scheduler.config)
