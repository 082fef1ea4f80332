"""Live previews from latents: the published tables, the fit to a VAE, and previews of a real generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageFilter
from torch import Tensor

from models.cache import LoadedModel, PipelineCache
from models.families import Family
from pipelines.previews import (
    SD15_FACTORS,
    SDXL_FACTORS,
    RgbFactors,
    factors_for_vae,
    fit_rgb_factors,
    latents_to_preview,
    rgb_factors_for,
    stock_factors,
)
from pipelines.settings import Settings, build_registry

PROMPT = "a large red circle in the centre on a white background"
STEPS = 20


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[PipelineCache]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), builtin_models_dir=tiny_models)
    cache = PipelineCache(
        build_registry(settings), device=torch.device("cpu"), dtype=torch.float32, budget_bytes=2**31
    )
    yield cache
    cache.clear()


@pytest.fixture(scope="module")
def shapes(cache: PipelineCache) -> LoadedModel:
    return cache.get("shapes")


@pytest.fixture(scope="module")
def run(shapes: LoadedModel) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """A real 64×64 txt2img run: the latents after every step (by step index) and the decoded image."""
    pipe = shapes.pipeline(shapes.base_class_name)
    latents: dict[int, torch.Tensor] = {}

    def keep(_pipe: object, step: int, _t: object, kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        latents[step] = kwargs["latents"].clone()
        return kwargs

    out = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    assert sorted(latents) == list(range(STEPS))
    return latents, np.asarray(out.images[0], dtype=np.float64)


def _stock_vae(scaling_factor: float) -> AutoencoderKL:
    """A stock-size SD VAE (the real class and config, weights left unallocated on the meta device)."""
    with torch.device("meta"):
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=scaling_factor,
        )


def _preview(latents: torch.Tensor, factors: RgbFactors) -> np.ndarray:
    return np.asarray(latents_to_preview(latents, factors)[0], dtype=np.float64) / 255


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by 2 px, away from the edges the 8×8 preview blurs."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))) > 0


# --- the published tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize("table", [SD15_FACTORS, SDXL_FACTORS])
def test_tables_have_one_rgb_row_per_latent_channel(table: RgbFactors) -> None:
    assert len(table.weights) == 4 and all(len(row) == 3 for row in table.weights)
    assert table.bias == (0.0, 0.0, 0.0)  # the webui adds no bias
    assert all(v > 0 for v in table.weights[0]) and all(v < 0 for v in table.weights[3])  # channel 1: light


def test_tables_match_the_webui_source() -> None:
    # Checked against AUTOMATIC1111/stable-diffusion-webui, modules/sd_vae_approx.py, cheap_approximation()
    # at commit 326c86913ce02ac7e5efd720009db79575864e90 (the `coeffs` lists for SDXL and for the rest).
    assert SD15_FACTORS.weights[0] == (0.298, 0.207, 0.208)
    assert SD15_FACTORS.weights[2] == (-0.158, 0.189, 0.264)
    assert SD15_FACTORS.weights[3] == (-0.184, -0.271, -0.473)
    assert SDXL_FACTORS.weights[0] == (0.3448, 0.4168, 0.4395)
    assert SDXL_FACTORS.weights[1] == (-0.1953, -0.0290, 0.0250)
    assert SDXL_FACTORS.weights[3] == (-0.3730, -0.2499, -0.2088)


def test_stock_vaes_get_their_family_table_and_others_do_not() -> None:
    sd_vae, xl_vae = _stock_vae(0.18215), _stock_vae(0.13025)
    assert factors_for_vae(sd_vae, Family.sd15) is SD15_FACTORS  # on meta: no encoding was attempted
    assert factors_for_vae(xl_vae, Family.sdxl) is SDXL_FACTORS
    assert stock_factors(xl_vae.config, Family.sd15) is None  # an SDXL VAE in an SD 1.x model: fit it
    assert stock_factors(sd_vae.config, Family.sdxl) is None


# --- the fit ----------------------------------------------------------------------------------------------


def test_fit_is_deterministic_and_leaves_the_vae_alone(shapes: LoadedModel) -> None:
    vae = shapes.base.vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    training, grads = vae.training, [p.requires_grad for p in vae.parameters()]
    first, second = fit_rgb_factors(vae), fit_rgb_factors(vae)
    assert first == second and first.source == "fitted to this VAE"
    assert len(first.weights) == vae.config.latent_channels
    after = vae.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert vae.training == training and [p.requires_grad for p in vae.parameters()] == grads


def test_fitted_map_tells_the_scene_colours_apart(shapes: LoadedModel) -> None:
    """Solids in the shapes model's own colours (not the fit's reference colours), encoded and mapped."""
    vae = shapes.base.vae
    factors = rgb_factors_for(shapes)
    colours = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 80, 220)}
    colours |= {"white": (245, 245, 245), "black": (15, 15, 15)}
    seen = {}
    with torch.no_grad():
        for name, rgb in colours.items():
            x = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 127.5 - 1
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            seen[name] = _preview(z, factors)[16:48, 16:48].mean(axis=(0, 1))
    for i, name in enumerate(("red", "green", "blue")):
        assert seen[name].argmax() == i, seen
    assert seen["white"].sum() > seen["black"].sum() + 1.0, seen


def test_models_are_fitted_and_cached_per_model(cache: PipelineCache, shapes: LoadedModel) -> None:
    factors = rgb_factors_for(shapes)
    assert factors.source == "fitted to this VAE"
    assert rgb_factors_for(shapes) is factors  # cached
    assert factors == fit_rgb_factors(shapes.base.vae)
    tiny = cache.get("tiny-sd15")  # random weights and a tiny VAE: fitted too, to its own numbers
    tiny_factors = rgb_factors_for(tiny)
    assert tiny_factors.source == "fitted to this VAE" and tiny_factors != factors


# --- previews of a real generation ------------------------------------------------------------------------


def test_final_preview_resembles_the_decoded_image(
    shapes: LoadedModel, run: tuple[dict[int, torch.Tensor], np.ndarray]
) -> None:
    latents, image = run
    factors = rgb_factors_for(shapes)
    preview = _preview(latents[STEPS - 1], factors)
    assert preview.shape == image.shape == (64, 64, 3)  # 8×8 latents: capped at the final image's size
    error = np.abs(preview - image).mean(axis=(0, 1))
    # Baselines on the same image: a blank mid-grey preview (~0.44 per channel on this white image) and the
    # webui SD table, made for another VAE. A linear map of this VAE's 8×8 latents cannot be sharp (its
    # colours are not linear in the latents; even a map fitted to these very latents is ~0.1 off), but it
    # must be far better than both.
    grey_error = np.abs(0.5 - image).mean(axis=(0, 1))
    table_error = np.abs(_preview(latents[STEPS - 1], SD15_FACTORS) - image).mean(axis=(0, 1))
    assert (error < 0.5 * grey_error).all(), (error, grey_error)
    assert error.mean() < 0.6 * table_error.mean(), (error, table_error)

    shape = _core((image[..., 0] > 0.6) & (image[..., 1] < 0.35) & (image[..., 2] < 0.35))
    background = _core(image.min(axis=2) > 0.8)
    assert shape.sum() > 200 and background.sum() > 2000  # the model drew a large red circle on white
    r, g, b = preview[shape].mean(axis=0)
    assert r > 0.45 and r - max(g, b) > 0.1, (r, g, b)  # red-ish
    light = preview[background].mean(axis=0)
    assert light.min() > 0.7 and light.mean() > (r + g + b) / 3 + 0.2, light


def test_an_early_preview_is_further_from_the_image_than_the_last(
    shapes: LoadedModel, run: tuple[dict[int, torch.Tensor], np.ndarray]
) -> None:
    latents, image = run
    factors = rgb_factors_for(shapes)
    early = np.abs(_preview(latents[1], factors) - image).mean()  # after step 2 of 20: mostly noise
    last = np.abs(_preview(latents[STEPS - 1], factors) - image).mean()
    assert early > last + 0.15, (early, last)


# --- latents_to_preview -----------------------------------------------------------------------------------


def test_preview_sizes_dtype_and_values() -> None:
    latents = torch.zeros(3, 4, 6, 10, dtype=torch.float16)
    latents[0, 0] = 1.0  # -> the table's first row: (0.298, 0.207, 0.208)
    latents[1, 3] = -10.0  # far past white
    latents[2, 3] = 10.0  # far past black
    images = latents_to_preview(latents, SD15_FACTORS)
    assert len(images) == 3 and all(im.mode == "RGB" for im in images)
    assert images[0].size == (80, 48)  # 8× the latent size: the final image's, under max_side=256
    expected = [round((1 + v) / 2 * 255) for v in (0.298, 0.207, 0.208)]  # 165, 154, 154
    assert np.array_equal(np.asarray(images[0])[20, 40], expected)
    assert (np.asarray(images[1]) == 255).all() and (np.asarray(images[2]) == 0).all()
    assert latents_to_preview(latents, SD15_FACTORS, max_side=40)[0].size == (40, 24)
    assert latents_to_preview(latents, SD15_FACTORS, max_side=5)[0].size == (5, 3)  # smaller than the latents


def test_preview_uses_the_bias_and_checks_the_channel_count() -> None:
    factors = RgbFactors(weights=((0.0, 0.0, 0.0),) * 4, bias=(0.2, -0.6, 3.0), source="test")
    (image,) = latents_to_preview(torch.randn(1, 4, 2, 2), factors)
    assert image.size == (16, 16) and (np.asarray(image) == [153, 51, 255]).all()
    with pytest.raises(ValueError):
        latents_to_preview(torch.zeros(1, 16, 4, 4), factors)
    with pytest.raises(ValueError):
        latents_to_preview(torch.zeros(4, 4, 4), factors)
