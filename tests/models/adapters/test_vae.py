"""Tests for models.adapters.vae: ldm and diffusers VAE files, checked, swapped in for a job, restored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from safetensors.torch import save_file

from models.adapters.safe_files import load_state_dict
from models.adapters.vae import default_vae_config, inspect_vae, load_vae, swap_vae
from models.families import Family
from models.ldm_export import vae_to_ldm
from models.tiny import tiny_path
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_BYTES = 400 * 2**20


@pytest.fixture(scope="module")
def vae_alt(tiny_models: Path) -> AutoencoderKL:
    """A second VAE with the tiny sd15 shapes and other weights (what a user's VAE is to a model)."""
    return AutoencoderKL.from_pretrained(tiny_path(tiny_models, "vae-alt"), local_files_only=True)


def ldm_file(
    vae: AutoencoderKL, path: Path, *, prefix: str = "first_stage_model.", extras: bool = True
) -> Path:
    """``vae`` saved as the webui's VAE files are: ldm names, often with training leftovers."""
    tensors = {prefix + k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict()).items()}
    if extras:
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    save_file(tensors, str(path))
    return path


def _read(path: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(path, max_bytes=MAX_BYTES)


def _assert_same_weights(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def _job(pipe: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        "a cat", num_inference_steps=1, height=64, width=64, generator=generator, output_type="np"
    ).images


def test_ldm_file_with_training_leftovers_is_recognised_and_loads_exactly(
    tmp_path: Path, tiny_sd15: StableDiffusionPipeline, vae_alt: AutoencoderKL
) -> None:
    tensors = _read(ldm_file(vae_alt, tmp_path / "alt.safetensors"))
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in tensors
    info = inspect_vae(tensors, {}, family=Family.sd15, config=tiny_sd15.vae.config)
    assert info is not None
    assert (info.kind, info.format, info.family) == (AssetKind.VAE, "ldm", Family.sd15)
    expected_tensors = len(vae_alt.state_dict())
    assert info.details == {
        "latent_channels": 4,
        "tensors": expected_tensors,
        "ignored": 2,
        "dtype": "float32",
    }
    assert info.describe() == "VAE, ldm format, SD 1.5"
    loaded = load_vae(tensors, tiny_sd15.vae.config)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_weights(loaded, vae_alt)


@pytest.mark.parametrize("prefix", ["", "vae."])
def test_other_prefixes_are_read(tmp_path: Path, vae_alt: AutoencoderKL, prefix: str) -> None:
    tensors = _read(ldm_file(vae_alt, tmp_path / "alt.safetensors", prefix=prefix, extras=False))
    info = inspect_vae(tensors, family=Family.sd15, config=vae_alt.config)
    assert info is not None and info.format == "ldm" and info.details["ignored"] == 0
    _assert_same_weights(load_vae(tensors, vae_alt.config), vae_alt)


def test_diffusers_layout_and_its_old_attention_names(vae_alt: AutoencoderKL) -> None:
    state = vae_alt.state_dict()
    info = inspect_vae(state, family=Family.sdxl, config=vae_alt.config)
    assert info is not None and (info.format, info.family) == ("diffusers", Family.sdxl)
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, tensor in state.items():
        for new, before in old_names.items():
            key = key.replace(new, before)
        old[key] = tensor
    assert any(".proj_attn." in k for k in old)
    _assert_same_weights(load_vae(old, vae_alt.config), vae_alt)


def test_half_precision_file_is_loaded_in_the_asked_dtype(tmp_path: Path, vae_alt: AutoencoderKL) -> None:
    path = tmp_path / "half.safetensors"
    save_file({k: v.half().contiguous() for k, v in vae_alt.state_dict().items()}, str(path))
    tensors = _read(path)
    info = inspect_vae(tensors, family=Family.sd15, config=vae_alt.config)
    assert info is not None and info.details["dtype"] == "float16"
    vae = load_vae(tensors, vae_alt.config)
    assert vae.dtype == torch.float32
    ref = vae_alt.state_dict()
    assert all(torch.equal(t, ref[k].half().float()) for k, t in vae.state_dict().items())
    assert load_vae(tensors, vae_alt.config, dtype=torch.float16).dtype == torch.float16


def test_swap_changes_the_job_and_restore_is_bit_identical(
    tmp_path: Path, tiny_sd15: StableDiffusionPipeline, vae_alt: AutoencoderKL
) -> None:
    pipe = tiny_sd15
    child = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    original = pipe.vae
    before = _job(pipe)
    user_vae = load_vae(
        _read(ldm_file(vae_alt, tmp_path / "alt.safetensors")), pipe.vae.config, dtype=torch.half
    )
    with swap_vae([pipe, child], user_vae) as swap:
        assert pipe.vae is user_vae and child.vae is user_vae
        assert user_vae.dtype == original.dtype and user_vae.device == original.device
        during = _job(pipe)
    swap.restore()  # idempotent
    assert pipe.vae is original and child.vae is original
    assert pipe.config.vae == ("diffusers", "AutoencoderKL")
    assert not np.array_equal(during, before)
    assert np.array_equal(_job(pipe), before)
    with swap_vae([], user_vae):
        assert pipe.vae is original


def test_reference_sd15_vae_in_ldm_layout_fits_both_families(sd15_reference: StableDiffusionPipeline) -> None:
    tensors = {"first_stage_model." + k: v for k, v in vae_to_ldm(sd15_reference.vae.state_dict()).items()}
    for family in (Family.sd15, Family.sdxl):  # SD 1.x and SDXL VAEs have the same shapes
        info = inspect_vae(tensors, family=family)
        assert info is not None and info.family == family and info.details["tensors"] == 248
    vae = load_vae(tensors, sd15_reference.vae.config)
    _assert_same_weights(vae, sd15_reference.vae)


def _mixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(iter(tensors))
    return {k if k != key else "first_stage_model." + k: v for k, v in tensors.items()}


def _latent(channels: int) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors["decoder.conv_in.weight"]
        return tensors | {"decoder.conv_in.weight": torch.zeros(weight.shape[0], channels, 3, 3)}

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_latent(16), "is for SD3 or Flux (16 latent channels)"),
        (_latent(8), "has 8 latent channels; the SD 1.5 VAE this server uses has 4"),
        (lambda t: {k: v for k, v in t.items() if k != "encoder.conv_in.bias"}, "incomplete: it lacks 1 of"),
        (lambda t: {k: v for k, v in t.items() if k != "decoder.conv_in.weight"}, "no decoder input layer"),
        (
            lambda t: t | {"encoder.conv_in.weight": torch.zeros(8, 3, 5, 5)},
            "layer shapes do not match the SD",
        ),
        (lambda t: t | {"decoder.extra.weight": torch.zeros(3)}, "layer shapes do not match"),
        (_mixed, "mixes VAE weights with other weights"),
    ],
)
def test_vaes_that_do_not_fit_are_refused_in_one_sentence(
    vae_alt: AutoencoderKL, change: Any, words: str
) -> None:
    tensors = change(vae_to_ldm(vae_alt.state_dict()))
    with pytest.raises(InvalidRequestError) as caught:
        inspect_vae(tensors, family=Family.sd15, config=vae_alt.config)
    message = str(caught.value)
    assert words in message and message.endswith(".") and "\n" not in message
    with pytest.raises(InvalidRequestError):
        load_vae(tensors, vae_alt.config)


def test_tiny_vae_against_the_real_sd15_config_is_refused(vae_alt: AutoencoderKL) -> None:
    with pytest.raises(InvalidRequestError, match=r"^This VAE's layer shapes do not match the SD 1\.5 VAE"):
        inspect_vae(vae_to_ldm(vae_alt.state_dict()), family=Family.sd15)


@pytest.mark.parametrize(
    "tensors",
    [
        {"lora_unet_down.lora_up.weight": torch.zeros(4, 4)},
        {"emb_params": torch.zeros(2, 768)},
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "first_stage_model.encoder.down.0.x": 1,
        },
        {},
    ],
)
def test_other_files_are_not_vaes(tensors: dict[str, Any]) -> None:
    assert inspect_vae(tensors, family=Family.sd15) is None
    with pytest.raises(InvalidRequestError, match="not a VAE"):
        load_vae(tensors, default_vae_config(Family.sd15))


def test_default_configs_are_the_families_reference_vaes() -> None:
    sd15, sdxl = default_vae_config(Family.sd15), default_vae_config(Family.sdxl)
    assert sd15["latent_channels"] == sdxl["latent_channels"] == 4
    assert sd15["block_out_channels"] == sdxl["block_out_channels"] == [128, 256, 512, 512]
    assert (sd15["scaling_factor"], sdxl["scaling_factor"]) == (0.18215, 0.13025)
