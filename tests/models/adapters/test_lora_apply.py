"""Tests for applying LoRAs per job (models.adapters.lora.LoraSet) on the SD 1.5-shaped reference model.

Every run is one step at 64x64 without CFG, compared as latents. The shared reference pipeline is left as
built: adapters are deleted after each test and the PEFT wrappers removed at the end of the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from models.adapters.lora import ActiveLora, LoraSet, inspect_lora
from models.adapters.safe_files import load_state_dict, read_safetensors_header
from storage.errors import InvalidRequestError
from tests.models.adapters.test_lora import SDXL_KOHYA_LAYERS, kohya_state_dict, sd15_kohya_layers

# peft warns whenever a second adapter joins a model; keeping several resident is the point of LoraSet.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

MAX_BYTES = 64 * 2**20
FIXTURE_FILES = [
    "analog_svd_rank4.safetensors",
    "diffusers_old_format_pytorch_lora_weights.safetensors",
    "lora_disney.safetensors",
    "sd15_text_encoder_adapter_model.safetensors",
    "smart_falcon_16_lokr.safetensors",
    "smart_falcon_4_lokr.safetensors",
]
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE_FC1 = "encoder.layers.0.mlp.fc1"


def run(pipe: Any, **kwargs: Any) -> torch.Tensor:
    """One step at 64x64 without CFG, seeded; the latents."""
    return pipe(
        "a photo of a cat",
        num_inference_steps=kwargs.pop("steps", 1),
        height=64,
        width=64,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kwargs,
    ).images


def lora(path_or_sd: Path | dict[str, torch.Tensor], key: str, weight: float = 1.0, **kw: Any) -> ActiveLora:
    """An ActiveLora the way the engine makes one: load, inspect, weight."""
    if isinstance(path_or_sd, Path):
        sd = load_state_dict(path_or_sd, max_bytes=MAX_BYTES)
        metadata = read_safetensors_header(path_or_sd).metadata
    else:
        sd, metadata = path_or_sd, {}
    info = inspect_lora(sd, metadata)
    assert info is not None
    return ActiveLora(key=key, state_dict=sd, info=info, weight=weight, metadata=metadata, **kw)


@pytest.fixture(scope="module")
def lora_pipe(sd15_reference: StableDiffusionPipeline) -> Iterator[StableDiffusionPipeline]:
    yield sd15_reference
    sd15_reference.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in sd15_reference.unet.modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in sd15_reference.text_encoder.modules())


@pytest.fixture(scope="module")
def lora_baseline(lora_pipe: StableDiffusionPipeline) -> torch.Tensor:
    return run(lora_pipe)


@pytest.fixture
def lora_sets(lora_pipe: StableDiffusionPipeline) -> Iterator[Callable[..., LoraSet]]:
    made: list[LoraSet] = []

    def make(**kwargs: Any) -> LoraSet:
        made.append(LoraSet(lora_pipe, **kwargs))
        return made[-1]

    yield make
    for lora_set in made:
        lora_set.clear(lora_pipe)
    assert not any(lora_pipe.get_list_adapters().values())


@pytest.fixture(scope="module")
def lora_kohya() -> dict[str, torch.Tensor]:
    """SD 1.5 kohya LoRA on attention, feed-forward, projections, a resnet conv and CLIP (alpha 2, rank 4)."""
    return kohya_state_dict(sd15_kohya_layers(), rank=4, alpha=2.0, seed=1)


def _lokr_delta(sd: Mapping[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """LyCORIS LoKr, written out: kron(w1_a @ w1_b, w2_a @ w2_b) * alpha / rank (rank = w2_b's rows)."""
    w1 = sd[f"{name}.lokr_w1_a"].float() @ sd[f"{name}.lokr_w1_b"].float()
    w2 = sd[f"{name}.lokr_w2_a"].float() @ sd[f"{name}.lokr_w2_b"].float()
    scale = float(sd[f"{name}.alpha"]) / sd[f"{name}.lokr_w2_b"].shape[0]
    return torch.kron(w1, w2).reshape(shape) * scale


def _weight(pipe: Any, component: str, module: str) -> torch.Tensor:
    sub = getattr(pipe, component).get_submodule(module)
    return getattr(sub, "base_layer", sub).weight


@pytest.mark.parametrize("filename", [*FIXTURE_FILES, "kohya (made here)"])
def test_each_file_changes_the_output_and_the_next_plain_run_is_bit_identical(
    lora_pipe: StableDiffusionPipeline,
    lora_baseline: torch.Tensor,
    lora_sets: Callable[..., LoraSet],
    lora_kohya: dict[str, torch.Tensor],
    fixtures_dir: Path,
    filename: str,
) -> None:
    source = lora_kohya if filename.startswith("kohya") else fixtures_dir / "lora" / filename
    active = lora(source, key=filename, weight=0.8)
    lora_set = lora_sets()
    lokr_checks = {
        "unet": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "text_encoder": "encoder.layers.5.mlp.fc2",
    }
    before = {c: _weight(lora_pipe, c, m).detach().clone() for c, m in lokr_checks.items()}
    lora_set.activate(lora_pipe, [active])
    if active.info.format == "lycoris-lokr":  # the swapped-in weight is the LoKr delta, times 0.8
        for component, module in lokr_checks.items():
            kohya = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + module.replace(
                ".", "_"
            )
            expected = before[component] + 0.8 * _lokr_delta(
                active.state_dict, kohya, before[component].shape
            )
            assert torch.allclose(_weight(lora_pipe, component, module), expected, atol=1e-6)
    changed = run(lora_pipe)
    lora_set.deactivate(lora_pipe)
    after = run(lora_pipe)
    assert not torch.allclose(changed, lora_baseline, atol=1e-5)
    assert torch.equal(after, lora_baseline)
    for component, module in lokr_checks.items():
        assert torch.equal(_weight(lora_pipe, component, module), before[component])


def _with_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PEFT text-encoder file in diffusers' own spelling, which its loader accepts."""
    return {k.replace("base_model.model.", "text_encoder."): v for k, v in sd.items()}


@pytest.mark.parametrize(
    ("filename", "layers"),
    [
        ("kohya (made here)", 16 * 11 + 1 + 12 * 6),
        ("diffusers_old_format_pytorch_lora_weights.safetensors", 128),
        ("sd15_text_encoder_adapter_model.safetensors", 24),
    ],
)
def test_every_layer_matches_what_diffusers_own_loader_makes_of_the_file(
    lora_pipe: StableDiffusionPipeline,
    lora_sets: Callable[..., LoraSet],
    lora_kohya: dict[str, torch.Tensor],
    fixtures_dir: Path,
    filename: str,
    layers: int,
) -> None:
    if filename.startswith("kohya"):
        sd = lora_kohya
    else:
        sd = _with_prefix(load_state_dict(fixtures_dir / "lora" / filename, max_bytes=MAX_BYTES))
    active = lora(fixtures_dir / "lora" / filename if not filename.startswith("kohya") else sd, key="mine")
    lora_sets().activate(lora_pipe, [active])
    lora_pipe.load_lora_weights(dict(sd), adapter_name="theirs")
    try:
        compared = 0
        for model in (lora_pipe.unet, lora_pipe.text_encoder):
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and "theirs" in module.lora_A:
                    ours = module.get_delta_weight("lora_mine")
                    assert torch.allclose(ours, module.get_delta_weight("theirs"), atol=1e-6, rtol=1e-4)
                    compared += 1
        assert compared == layers
    finally:
        lora_pipe.set_adapters(["lora_mine"])  # deleting the only active adapter makes peft warn
        lora_pipe.delete_adapters("theirs")


def test_two_loras_at_once_add_their_weighted_deltas(
    lora_pipe: StableDiffusionPipeline,
    lora_baseline: torch.Tensor,
    lora_sets: Callable[..., LoraSet],
    lora_kohya: dict[str, torch.Tensor],
    fixtures_dir: Path,
) -> None:
    old_path = fixtures_dir / "lora" / "diffusers_old_format_pytorch_lora_weights.safetensors"
    old = load_state_dict(old_path, max_bytes=MAX_BYTES)
    lora_set = lora_sets()
    lora_set.activate(lora_pipe, [lora(lora_kohya, "kohya", 0.7), lora(old_path, "old", -0.5)])
    module = lora_pipe.unet.get_submodule(TO_Q)
    kohya_name = "lora_unet_" + TO_Q.replace(".", "_")
    delta_kohya = (
        0.5 * lora_kohya[f"{kohya_name}.lora_up.weight"] @ lora_kohya[f"{kohya_name}.lora_down.weight"]
    )
    delta_old = old[f"unet.{TO_Q}.lora.up.weight"] @ old[f"unet.{TO_Q}.lora.down.weight"]
    x = torch.randn(2, 7, 320, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = x @ (module.base_layer.weight + 0.7 * delta_kohya - 0.5 * delta_old).T
        assert torch.allclose(module(x), expected, atol=1e-4)
        changed = run(lora_pipe)
    lora_set.deactivate(lora_pipe)
    with torch.no_grad():
        assert torch.equal(module(x), module.base_layer(x))
    assert not torch.allclose(changed, lora_baseline, atol=1e-5)
    assert torch.equal(run(lora_pipe), lora_baseline)


def test_weight_zero_is_no_lora(
    lora_pipe: StableDiffusionPipeline,
    lora_baseline: torch.Tensor,
    lora_sets: Callable[..., LoraSet],
    lora_kohya: dict[str, torch.Tensor],
    fixtures_dir: Path,
) -> None:
    lokr = fixtures_dir / "lora" / "smart_falcon_4_lokr.safetensors"
    lora_sets().activate(lora_pipe, [lora(lora_kohya, "kohya", 0.0), lora(lokr, "lokr", 0.0)])
    assert torch.allclose(run(lora_pipe), lora_baseline, atol=1e-6)


def test_unet_and_text_encoder_weights_apply_apart_and_negative_inverts(
    lora_pipe: StableDiffusionPipeline, lora_sets: Callable[..., LoraSet], lora_kohya: dict[str, torch.Tensor]
) -> None:
    unet_module = lora_pipe.unet.get_submodule(TO_Q)
    lora_set = lora_sets()
    lora_set.activate(lora_pipe, [lora(lora_kohya, "kohya", 1.0, unet_weight=0.0)])
    te_module = lora_pipe.text_encoder.get_submodule(TE_FC1)
    x_unet = torch.randn(1, 4, 320, generator=torch.Generator().manual_seed(1))
    x_te = torch.randn(1, 4, 768, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(unet_module(x_unet), unet_module.base_layer(x_unet), atol=1e-7)
        plus = te_module(x_te) - te_module.base_layer(x_te)
        assert plus.abs().max() > 1e-3
        lora_set.activate(lora_pipe, [lora(lora_kohya, "kohya", -1.0)])
        minus = te_module(x_te) - te_module.base_layer(x_te)
    assert torch.allclose(minus, -plus, atol=1e-5)


def test_loha_layers_get_the_hadamard_delta_and_their_weights_back(
    lora_pipe: StableDiffusionPipeline, lora_sets: Callable[..., LoraSet]
) -> None:
    gen = torch.Generator().manual_seed(4)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=gen) for s in ((1280, 8), (8, 768), (1280, 8), (8, 768)))
    sd = {
        f"{name}.hada_w1_a": w1a,
        f"{name}.hada_w1_b": w1b,
        f"{name}.hada_w2_a": w2a,
        f"{name}.hada_w2_b": w2b,
        f"{name}.alpha": torch.tensor(4.0),
    }
    module = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    before = _weight(lora_pipe, "unet", module).detach().clone()
    lora_set = lora_sets()
    lora_set.activate(lora_pipe, [lora(sd, "loha", 0.5)])
    expected = before + 0.5 * (4.0 / 8) * (w1a @ w1b) * (w2a @ w2b)
    assert torch.allclose(_weight(lora_pipe, "unet", module), expected, atol=1e-5)
    lora_set.deactivate(lora_pipe)
    assert torch.equal(_weight(lora_pipe, "unet", module), before)


def test_resident_loras_are_loaded_once_and_the_oldest_evicted(
    lora_pipe: StableDiffusionPipeline,
    lora_sets: Callable[..., LoraSet],
    fixtures_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {
        "a": "sd15_text_encoder_adapter_model.safetensors",
        "b": "diffusers_old_format_pytorch_lora_weights.safetensors",
        "c": "lora_disney.safetensors",
    }
    loras = {key: lora(fixtures_dir / "lora" / name, key) for key, name in files.items()}
    calls: list[str] = []
    original = lora_pipe.load_lora_weights

    def counting(state_dict: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["adapter_name"])
        return original(state_dict, **kwargs)

    monkeypatch.setattr(lora_pipe, "load_lora_weights", counting)
    lora_set = lora_sets(max_resident=2)
    for keys in (["a"], [], ["b"], ["a"], ["b", "a"], ["b"]):
        lora_set.activate(lora_pipe, [loras[k] for k in keys])
        lora_set.deactivate(lora_pipe)
    assert calls == ["lora_a", "lora_b"]
    lora_set.activate(lora_pipe, [loras["c"]])  # a is the least recently used
    assert calls == ["lora_a", "lora_b", "lora_c"] and lora_set.resident == ("b", "c")
    adapters = {name for names in lora_pipe.get_list_adapters().values() for name in names}
    assert adapters == {"lora_b", "lora_c"}
    lora_set.activate(lora_pipe, [loras["a"]])
    assert calls[-1] == "lora_a" and lora_set.resident == ("c", "a")


def test_img2img_made_with_from_pipe_sees_the_lora(
    lora_pipe: StableDiffusionPipeline, lora_sets: Callable[..., LoraSet], lora_kohya: dict[str, torch.Tensor]
) -> None:
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(lora_pipe)
    img2img.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    plain = run(img2img, image=image, strength=0.5, steps=2)
    lora_set = lora_sets()
    lora_set.activate(lora_pipe, [lora(lora_kohya, "kohya")])
    changed = run(img2img, image=image, strength=0.5, steps=2)
    lora_set.deactivate(lora_pipe)
    assert not torch.allclose(changed, plain, atol=1e-5)
    assert torch.equal(run(img2img, image=image, strength=0.5, steps=2), plain)


def test_refusals_load_nothing_and_leave_no_lora_active(
    lora_pipe: StableDiffusionPipeline, lora_sets: Callable[..., LoraSet], lora_kohya: dict[str, torch.Tensor]
) -> None:
    lora_set = lora_sets()
    good = lora(lora_kohya, "good")
    sdxl = lora(kohya_state_dict(SDXL_KOHYA_LAYERS), "sdxl")
    with pytest.raises(InvalidRequestError) as refused:
        lora_set.activate(lora_pipe, [good, sdxl])
    assert str(refused.value) == "This LoRA is for SDXL; this server's model is SD 1.5."
    assert lora_set.resident == () and lora_set.active == ()
    dora_sd = kohya_state_dict({"lora_unet_conv_in": (4, 320, (3, 3))})
    dora_sd["lora_unet_conv_in.dora_scale"] = torch.ones(320, 1, 1, 1)
    with pytest.raises(InvalidRequestError) as refused:
        lora_set.activate(lora_pipe, [lora(dora_sd, "dora")])
    assert str(refused.value) == "DoRA files can't be applied yet; upload a standard LoRA."
    # a file that fails after another was switched on: the first is switched off again
    mislabelled = ActiveLora(key="bad", state_dict=kohya_state_dict(SDXL_KOHYA_LAYERS), info=good.info)
    with pytest.raises(InvalidRequestError, match="does not fit"):
        lora_set.activate(lora_pipe, [good, mislabelled])
    module = lora_pipe.unet.get_submodule(TO_Q)
    x = torch.randn(1, 3, 320)
    with torch.no_grad():
        assert torch.equal(module(x), module.base_layer(x))
    assert lora_set.active == ()
