"""The shapes inpainting and ControlNet stages, run for real on CPU from a tiny random base pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors import safe_open

from models.shapes._common import TINY, build_text_encoder, build_unet, build_vae, inference_scheduler
from models.shapes._data import load_modes_pool
from models.shapes.scenes import SceneDataset
from models.shapes.train import parse_args, run
from models.shapes.train_inpaint import _inpaint_unet, random_masks
from models.tokenizer import load_clip_tokenizer

ARGS = ["--tiny", "--pool", "8", "--batch", "2", "--device", "cpu", "--log-every", "1"]


def _ckpt(out: Path, stage: str) -> dict:
    return torch.load(out / "ckpt" / f"{stage}.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=build_vae(TINY),
        text_encoder=build_text_encoder(TINY),
        tokenizer=load_clip_tokenizer(),
        unet=build_unet(TINY),
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("base") / "pipeline"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("modes")
    results = []
    for stage in ("inpaint", "controlnet"):
        results += run(
            parse_args(["--out", str(out), "--base", str(base), "--stage", stage, "--steps", "2", *ARGS])
        )
    return out, results


def test_both_stages_train_and_checkpoint(trained: tuple[Path, list]) -> None:
    out, results = trained
    assert [(r.stage, r.start_step, r.step, r.finished) for r in results] == [
        ("inpaint", 0, 2, True),
        ("controlnet", 0, 2, True),
    ]
    for stage in ("inpaint", "controlnet"):
        ckpt = _ckpt(out, stage)
        assert ckpt["step"] == 2 and math.isfinite(ckpt["loss"])
        assert ckpt["optimizer"]["state"][0]["step"].item() == 2
    assert not list(out.rglob("*.tmp*"))


def test_rerun_resumes_from_its_step(trained: tuple[Path, list], base: Path) -> None:
    out, _ = trained
    (result,) = run(
        parse_args(["--out", str(out), "--base", str(base), "--stage", "controlnet", "--steps", "3", *ARGS])
    )
    assert (result.start_step, result.step, result.finished) == (2, 3, True)
    assert _ckpt(out, "controlnet")["optimizer"]["state"][0]["step"].item() == 3


def test_inpaint_unet_starts_as_the_base_unet(base: Path) -> None:
    unet = StableDiffusionPipeline.from_pretrained(base, local_files_only=True).unet
    nine = _inpaint_unet(unet)
    assert nine.config.in_channels == 9 and nine.conv_in.weight.shape[1] == 9
    x, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, TINY.text_hidden)
    extra = torch.randn(2, 5, 8, 8)  # anything in the mask / masked-image channels
    with torch.no_grad():
        want = unet(x, torch.tensor([10, 500]), hidden).sample
        got = nine(torch.cat([x, extra], 1), torch.tensor([10, 500]), hidden).sample
    assert torch.allclose(got, want, atol=1e-5)


def test_inpaint_pipeline_loads_offline_and_draws_64px(trained: tuple[Path, list], base: Path) -> None:
    out, _ = trained
    folder = out / "inpaint-pipeline"
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    for shared in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json"):
        assert (folder / shared).read_bytes() == (base / shared).read_bytes()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    image = pipe(
        "a green square",
        image=Image.new("RGB", (64, 64), (40, 80, 220)),
        mask_image=Image.fromarray(mask),
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_controlnet_loads_offline_and_draws_64px(trained: tuple[Path, list], base: Path) -> None:
    out, _ = trained
    controlnet = ControlNetModel.from_pretrained(
        out / "controlnet", dtype=torch.float32, local_files_only=True
    )
    with torch.no_grad():
        embedded = controlnet.controlnet_cond_embedding(torch.zeros(1, 3, 64, 64))
    assert embedded.shape[-2:] == (8, 8)  # three stride-2 downsamples onto the latent grid
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=controlnet, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    scribble = Image.fromarray(SceneDataset(0, 1)[0]["scribble"]).convert("RGB")
    image = pipe(
        "a red star", image=scribble, height=64, width=64, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)


def test_random_masks_are_binary_varied_and_in_range() -> None:
    masks = random_masks(64, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 64, 64)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    area = masks.sum(dim=(1, 2, 3))
    assert area.min() >= 40 and area.max() <= 40 * 40 and area.std() > 50  # 8-40 px boxes / ellipses


def test_modes_pool_matches_the_scene_dataset(tmp_path: Path) -> None:
    pool = load_modes_pool(tmp_path, seed=4, size=6)
    cached = load_modes_pool(tmp_path, seed=4, size=6)
    assert np.array_equal(pool.scribbles, cached.scribbles)
    item = SceneDataset(4, 6, holdout="exclude", empty_caption_p=0.0)[5]
    assert np.array_equal(pool.images[5], item["image"]) and pool.captions[5] == item["caption"]
    assert np.array_equal(pool.masks[5], item["mask"]) and np.array_equal(pool.scribbles[5], item["scribble"])
