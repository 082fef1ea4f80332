"""The offline tiny model family: every folder reloads offline into the right class and really runs."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import spandrel
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models import tiny
from models.tiny import (
    TINY_NAMES,
    build_tiny_models,
    ensure_tiny_models,
    is_current,
    tiny_esrgan_path,
    tiny_path,
)

SD_BETAS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _load(cls: type, folder: Path) -> DiffusionPipeline:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def sd15(tiny_models: Path) -> StableDiffusionPipeline:
    return _load(StableDiffusionPipeline, tiny_path(tiny_models, "sd15"))


@pytest.fixture
def init_image() -> Image.Image:
    xs = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(
        np.stack([np.tile(xs, (64, 1)), np.tile(xs[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
    )


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one thread: tiny models gain nothing from more, and several threads on a busy machine (other
    processes on the same cores) make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_layout_and_stamp(tiny_models: Path) -> None:
    assert is_current(tiny_models)
    assert (tiny_models / "VERSION").read_text() == f"dreamcord tiny models v{tiny.TINY_MODELS_VERSION}\n"
    for name in TINY_NAMES:
        assert tiny_path(tiny_models, name).is_dir()
    assert not list(tiny_models.glob(".build-*"))
    with pytest.raises(KeyError):
        tiny_path(tiny_models, "sd21")
    unique = {f.stat().st_ino: f.stat().st_size for f in tiny_models.rglob("*") if f.is_file()}
    assert sum(unique.values()) < 40 * 2**20  # hard links keep the shared weights and tokenizer once


def test_generic_loader_picks_the_pipeline_classes(tiny_models: Path) -> None:
    expected = {
        "sd15": StableDiffusionPipeline,
        "sd15-inpaint": StableDiffusionInpaintPipeline,
        "sdxl": StableDiffusionXLPipeline,
        "upscaler-x4": StableDiffusionUpscalePipeline,
    }
    for name, cls in expected.items():
        assert (
            type(DiffusionPipeline.from_pretrained(tiny_path(tiny_models, name), local_files_only=True))
            is cls
        )


def test_sd15_components(sd15: StableDiffusionPipeline) -> None:
    assert sd15.safety_checker is None and sd15.feature_extractor is None
    assert sd15.config.requires_safety_checker is False
    assert isinstance(sd15.tokenizer, CLIPTokenizer) and len(sd15.tokenizer) == 49408
    assert sd15.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert sd15.tokenizer.pad_token_id == 49407 and sd15.tokenizer.model_max_length == 77
    te = sd15.text_encoder.config
    assert isinstance(sd15.text_encoder, CLIPTextModel)
    assert (te.vocab_size, te.hidden_size, te.num_hidden_layers, te.num_attention_heads) == (49408, 32, 2, 4)
    assert te.max_position_embeddings == 77
    assert sd15.vae_scale_factor == 8 and len(sd15.vae.config.block_out_channels) == 4
    assert sd15.unet.config.cross_attention_dim == 32 and sd15.unet.config.in_channels == 4
    assert isinstance(sd15.scheduler, PNDMScheduler)
    assert {k: sd15.scheduler.config[k] for k in SD_BETAS} == SD_BETAS
    assert sd15.scheduler.config.prediction_type == "epsilon"


def test_sd15_txt2img(sd15: StableDiffusionPipeline) -> None:
    def run(seed: int) -> StableDiffusionPipelineOutput:
        return sd15("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=_gen(seed))

    first, again, other = run(0), run(0), run(1)
    assert first.images[0].size == (64, 64) and first.nsfw_content_detected is None
    assert np.array_equal(_arr(first.images[0]), _arr(again.images[0]))
    assert not np.array_equal(_arr(first.images[0]), _arr(other.images[0]))
    default_size = sd15(prompt="x", num_inference_steps=2, generator=_gen()).images[0].size
    assert default_size == (64, 64)  # unet sample_size 8 x VAE factor 8


def test_sd15_20_steps_is_fast(sd15: StableDiffusionPipeline) -> None:
    sd15("warm up", num_inference_steps=2, height=64, width=64, generator=_gen())
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        sd15("a photo of a cat", num_inference_steps=20, height=64, width=64, generator=_gen())
        timings.append(time.perf_counter() - start)
    assert min(timings) < 3.0, timings  # about 0.3-0.5 s on one idle core


def test_inpaint(tiny_models: Path, init_image: Image.Image) -> None:
    pipe = _load(StableDiffusionInpaintPipeline, tiny_path(tiny_models, "sd15-inpaint"))
    assert pipe.unet.config.in_channels == 9 and pipe.safety_checker is None
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = pipe(
        "a cat",
        image=init_image,
        mask_image=mask,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=_gen(),
    )
    assert out.images[0].size == (64, 64)


def test_controlnet(tiny_models: Path, sd15: StableDiffusionPipeline, init_image: Image.Image) -> None:
    controlnet = ControlNetModel.from_pretrained(
        tiny_path(tiny_models, "sd15-controlnet"), local_files_only=True
    )
    assert controlnet.config.cross_attention_dim == sd15.unet.config.cross_attention_dim
    with torch.no_grad():  # the condition embedding must land on the 8x latent grid
        embedded = controlnet.controlnet_cond_embedding(torch.zeros(1, 3, 64, 64))
    assert embedded.shape == (1, sd15.unet.config.block_out_channels[0], 8, 8)
    pipe = StableDiffusionControlNetPipeline(
        **sd15.components, controlnet=controlnet, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)

    def run(image: Image.Image) -> Image.Image:
        return pipe(
            "a cat", image=image, num_inference_steps=2, height=64, width=64, generator=_gen()
        ).images[0]

    out = run(init_image)
    assert out.size == (64, 64)
    assert not np.array_equal(_arr(out), _arr(run(Image.new("RGB", (64, 64)))))  # the control image matters


def test_sdxl(tiny_models: Path) -> None:
    pipe = _load(StableDiffusionXLPipeline, tiny_path(tiny_models, "sdxl"))
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer_2.pad_token_id == 0 and len(pipe.tokenizer_2) == 49408
    unet = pipe.unet.config
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == hidden
    projection = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + projection
    assert pipe.config.force_zeros_for_empty_prompt is True and pipe.vae_scale_factor == 8
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert {k: pipe.scheduler.config[k] for k in SD_BETAS} == SD_BETAS
    out = pipe("a cat", num_inference_steps=2, height=64, width=64, generator=_gen())
    assert out.images[0].size == (64, 64)


def test_upscaler(tiny_models: Path, init_image: Image.Image) -> None:
    pipe = _load(StableDiffusionUpscalePipeline, tiny_path(tiny_models, "upscaler-x4"))
    unet = pipe.unet.config
    assert (unet.in_channels, unet.out_channels, unet.num_class_embeds) == (7, 4, 1000)
    assert unet.class_embed_type is None and unet.down_block_types[0] == "DownBlock2D"
    assert pipe.vae.config.scaling_factor == 0.08333 and pipe.vae_scale_factor == 4
    assert isinstance(pipe.low_res_scheduler, DDPMScheduler) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.config.max_noise_level == 350
    out = pipe("a cat", image=init_image.resize((32, 32)), num_inference_steps=2, generator=_gen())
    assert out.images[0].size == (128, 128)


def test_vae_alt_swaps_into_sd15(tiny_models: Path, sd15: StableDiffusionPipeline) -> None:
    alt = AutoencoderKL.from_pretrained(tiny_path(tiny_models, "vae-alt"), local_files_only=True)
    assert alt.config.latent_channels == sd15.vae.config.latent_channels
    assert len(alt.config.block_out_channels) == len(sd15.vae.config.block_out_channels)
    assert not torch.equal(alt.decoder.conv_out.weight, sd15.vae.decoder.conv_out.weight)
    original = sd15.vae
    try:
        sd15.vae = alt
        swapped = sd15("a cat", num_inference_steps=2, height=64, width=64, generator=_gen()).images[0]
    finally:
        sd15.vae = original
    plain = sd15("a cat", num_inference_steps=2, height=64, width=64, generator=_gen()).images[0]
    assert swapped.size == (64, 64) and not np.array_equal(_arr(swapped), _arr(plain))


def test_esrgan_loads_in_spandrel(tiny_models: Path) -> None:
    descriptor = spandrel.ModelLoader().load_from_file(str(tiny_esrgan_path(tiny_models)))
    assert isinstance(descriptor, spandrel.ImageModelDescriptor)
    assert descriptor.architecture.id == "ESRGAN" and descriptor.scale == 4
    assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
    x = torch.rand(1, 3, 16, 16, generator=_gen())
    with torch.no_grad():
        y = descriptor.model.eval()(x)
    assert y.shape == (1, 3, 64, 64)
    nearest = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")
    assert (y - nearest).abs().max() < 0.1  # near-identity trunk: roughly a nearest-neighbour upscale


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def test_rebuild_is_byte_identical(tiny_models: Path, tmp_path: Path) -> None:
    build_tiny_models(tmp_path)
    rebuilt, cached = _digests(tmp_path), _digests(tiny_models)
    assert len(rebuilt) == 17 and rebuilt == cached
    assert (tmp_path / "sd15/text_encoder/model.safetensors").samefile(
        tmp_path / "sdxl/text_encoder/model.safetensors"
    )


def test_ensure_builds_once_under_a_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_build = tiny.build_tiny_models

    def counting_build(root: Path) -> None:
        calls.append(root)
        real_build(root)

    monkeypatch.setattr(tiny, "build_tiny_models", counting_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_models(tmp_path))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path, tmp_path] and calls == [tmp_path] and is_current(tmp_path)
    stamp = (tmp_path / "sd15" / "unet").stat().st_mtime_ns
    assert ensure_tiny_models(tmp_path) == tmp_path and len(calls) == 1  # current: nothing rebuilt
    (tmp_path / "VERSION").write_text("old\n")
    (tmp_path / ".build-killed").mkdir()  # a killed builder's staging folder is cleared
    ensure_tiny_models(tmp_path)
    assert len(calls) == 2 and is_current(tmp_path)
    assert (tmp_path / "sd15" / "unet").stat().st_mtime_ns != stamp
    assert not list(tmp_path.glob(".build-*"))


def test_interrupted_build_leaves_no_half_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dest: Path) -> None:
        dest.mkdir()
        (dest / "half-written").write_bytes(b"x")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(tiny._BUILDERS, "vae-alt", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_tiny_models(tmp_path)
    assert not is_current(tmp_path) and not (tmp_path / "VERSION").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing was moved into place, staging removed
