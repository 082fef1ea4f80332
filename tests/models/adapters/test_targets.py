"""Adapters for a model with shapes of its own: the built-in ``shapes`` model (SD 1.5's architecture, scaled
down: UNet widths 48/96/96, 64-wide cross-attention and text encoder).

Files are made here in the real formats (webui ``.pt`` embeddings and hypernetworks, an ldm-layout VAE) or
committed (``models/shapes/loras/purple-circles.safetensors``, a kohya LoRA whose card gives rank 8, alpha 4
and 80 attention modules). The widths the tests expect are read off the real modules, not off the configs
the code reads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file

from models.adapters.embeddings import embedding_vectors, load_embeddings
from models.adapters.hypernetwork import apply_hypernetworks, load_hypernetwork
from models.adapters.inspect import check_asset
from models.adapters.lora import NO_FIT_MESSAGE, ActiveLora, LoraSet, inspect_lora
from models.adapters.safe_files import load_pickle_object, load_state_dict, read_safetensors_header
from models.adapters.targets import (
    adapter_fits,
    canonical_target,
    model_target,
    pipeline_target,
    served_targets,
    target_for_folder,
)
from models.families import Family
from models.ldm_export import vae_to_ldm
from models.registry import ModelRegistry
from pipelines.settings import Settings, build_registry
from storage.errors import InvalidRequestError
from storage.tables import AssetKind
from tests.models.adapters.test_hypernetwork import plain_mlp, webui_dict

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

REPO = Path(__file__).resolve().parents[3]
SHAPES = REPO / "models" / "shapes" / "model"
SHAPES_INPAINT = REPO / "models" / "shapes" / "inpaint"
PURPLE = REPO / "models" / "shapes" / "loras" / "purple-circles.safetensors"
CONFIGS = REPO / "models" / "configs"
MAX_BYTES = 64 * 2**20


@pytest.fixture
def default_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    """The registry of a server with no settings at all (no environment, no TOML file)."""
    import os

    for key in [k for k in os.environ if k.startswith("DREAMCORD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DREAMCORD_CONFIG", str(tmp_path / "none.toml"))
    return build_registry(Settings(data_dir=tmp_path / "data"))


@pytest.fixture(scope="module")
def shapes_pipe() -> Iterator[StableDiffusionPipeline]:
    pipe = StableDiffusionPipeline.from_pretrained(SHAPES, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 8×8 UNet's ops are tiny: two threads on a busy CPU stall at every barrier
    yield pipe
    torch.set_num_threads(threads)


def _attention_context_widths(unet: Any) -> set[int]:
    return {int(m.to_k.in_features) for m in unet.modules() if isinstance(m, Attention)}


def _run(pipe: Any, prompt: str = "a red circle on the left") -> torch.Tensor:
    latents: torch.Tensor = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    return latents


# --- targets ------------------------------------------------------------------------------------------------


def test_canonical_targets_have_the_families_published_widths() -> None:
    sd15, sdxl = canonical_target(Family.sd15), canonical_target(Family.sdxl)
    assert sd15.canonical and sd15.name == "SD 1.5" and sd15.text_widths == (768,)
    assert sd15.attention_widths == {320, 640, 1280, 768}  # the webui's SD 1.5 hypernetwork widths
    assert sdxl.text_widths == (768, 1280) and 2048 in sdxl.attention_widths
    assert sd15.key != sdxl.key


def test_shapes_target_is_custom_with_its_real_modules_widths() -> None:
    target = target_for_folder("shapes", Family.sd15, SHAPES)
    assert not target.canonical and (target.name, target.family) == ("shapes", Family.sd15)
    unet = UNet2DConditionModel.from_pretrained(SHAPES / "unet", local_files_only=True)
    assert target.attention_widths == _attention_context_widths(unet) == {48, 96, 64}
    pipe_te = json.loads((SHAPES / "text_encoder" / "config.json").read_text())
    assert target.text_widths == (pipe_te["hidden_size"],) == (64,)
    assert target.label == "the shapes model"


def test_inpainting_unets_share_their_base_models_target() -> None:
    shapes = target_for_folder("shapes", Family.sd15, SHAPES)
    inpaint = target_for_folder("shapes-inpaint", Family.sd15, SHAPES_INPAINT)
    assert json.loads((SHAPES_INPAINT / "unet" / "config.json").read_text())["in_channels"] == 9
    assert inpaint.key == shapes.key and not inpaint.canonical
    assert target_for_folder("x", Family.sd15, CONFIGS / "sd15-inpaint") == canonical_target(Family.sd15)


def _config_copy(tmp_path: Path, family: str, **unet_changes: Any) -> Path:
    folder = tmp_path / f"{family}-copy"
    shutil.copytree(CONFIGS / family, folder)
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | unet_changes))
    return folder


def test_equivalent_spellings_stay_canonical_and_other_widths_do_not(tmp_path: Path) -> None:
    canonical = canonical_target(Family.sd15)
    per_block = _config_copy(tmp_path / "a", "sd15", attention_head_dim=[8, 8, 8, 8], sample_size=96)
    assert target_for_folder("finetune", Family.sd15, per_block) == canonical
    wider = _config_copy(tmp_path / "b", "sd15", cross_attention_dim=1024)
    other = target_for_folder("wide", Family.sd15, wider)
    assert not other.canonical and other.name == "wide" and 1024 in other.attention_widths
    (wider / "vae" / "config.json").unlink()  # no VAE config: the UNet still decides
    assert not target_for_folder("wide", Family.sd15, wider).canonical


def test_served_targets_of_a_default_server(default_registry: ModelRegistry) -> None:
    targets = served_targets(default_registry)
    assert [(t.name, t.canonical) for t in targets] == [("shapes", False), ("SD 1.5", True)]
    assert model_target(default_registry, "shapes-inpaint") == targets[0]  # the same shapes, one name
    assert model_target(default_registry, "tiny-sd15") == canonical_target(Family.sd15)  # plumbing model


def test_served_targets_with_other_models(tmp_path: Path) -> None:
    registry = ModelRegistry(builtin_dir=tmp_path / "tiny", extra={"xl": str(CONFIGS / "sdxl")})
    assert [t.name for t in served_targets(registry)] == ["SDXL", "SD 1.5", "shapes"]
    tiny_default = ModelRegistry(builtin_dir=tmp_path / "tiny", default_model="tiny-sd15")
    assert [t.name for t in served_targets(tiny_default)] == ["SD 1.5", "shapes"]


def test_a_loaded_pipeline_has_its_folders_target(shapes_pipe: StableDiffusionPipeline) -> None:
    live = pipeline_target(shapes_pipe)
    assert live.key == target_for_folder("shapes", Family.sd15, SHAPES).key and not live.canonical


# --- recognising files --------------------------------------------------------------------------------------


def test_purple_circles_is_recognised_for_the_shapes_model(default_registry: ModelRegistry) -> None:
    checked = check_asset(PURPLE, targets=served_targets(default_registry))
    info = checked.info
    assert (info.kind, info.format, info.family) == (AssetKind.LORA, "kohya", Family.sd15)
    assert info.details["model"] == "shapes"
    assert (info.details["rank"], info.details["alpha"], info.details["layers"]) == (8, 4.0, 80)  # the card
    assert info.details["parts"] == ["unet"]
    header = read_safetensors_header(PURPLE)
    assert checked.short_hash == header.metadata["sshs_model_hash"][:12]
    shapes = served_targets(default_registry)[0]
    assert inspect_lora(header, targets=[shapes]) == info  # from the header alone, the same verdict


def test_purple_circles_is_refused_where_only_family_shapes_are_served() -> None:
    for kwargs in ({}, {"families": [Family.sd15, Family.sdxl]}):
        with pytest.raises(InvalidRequestError) as refused:
            check_asset(PURPLE, **kwargs)  # type: ignore[arg-type]
        assert str(refused.value) == NO_FIT_MESSAGE
    assert NO_FIT_MESSAGE == (
        "This LoRA fits none of this server's models; it was made for a model with other layer sizes."
    )


def _webui_embedding(path: Path, width: int) -> Path:
    generator = torch.Generator().manual_seed(width)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(2, width, generator=generator) * 0.3},
            "name": "shapey",
            "step": 500,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        },
        path,
    )
    return path


def test_shapes_embedding_is_recognised_and_refused_on_sd15(
    tmp_path: Path, default_registry: ModelRegistry
) -> None:
    path = _webui_embedding(tmp_path / "shapey.pt", 64)
    info = check_asset(path, targets=served_targets(default_registry)).info
    assert (info.kind, info.format, info.family) == (AssetKind.EMBEDDING, "webui-pt", Family.sd15)
    assert info.details["model"] == "shapes" and (info.details["vectors"], info.details["width"]) == (2, 64)
    with pytest.raises(InvalidRequestError) as refused:
        check_asset(path)
    assert str(refused.value) == (
        "This embedding file is not usable: "
        "its vectors are 64 wide, which fits neither SD 1.5 (768) nor SDXL."
    )
    odd = _webui_embedding(tmp_path / "odd.pt", 96)
    with pytest.raises(InvalidRequestError, match="96 wide, which fits none of this server's models"):
        check_asset(odd, targets=served_targets(default_registry))


def _webui_hypernetwork(path: Path, widths: tuple[int, ...]) -> Path:
    obj, _ = webui_dict(plain_mlp, widths, std=0.05, seed=sum(widths))
    torch.save(obj | {"name": "shapenet", "step": 300}, path)
    return path


def test_shapes_hypernetwork_is_recognised_and_refused_on_sd15(
    tmp_path: Path, default_registry: ModelRegistry
) -> None:
    path = _webui_hypernetwork(tmp_path / "shapenet.pt", (64, 48, 96))
    info = check_asset(path, targets=served_targets(default_registry)).info
    assert (info.kind, info.format, info.family) == (AssetKind.HYPERNETWORK, "webui", Family.sd15)
    assert info.details["model"] == "shapes" and info.details["widths"] == [48, 64, 96]
    with pytest.raises(InvalidRequestError, match="width 48, which no SD 1.5 attention layer has"):
        check_asset(path)
    odd = _webui_hypernetwork(tmp_path / "odd.pt", (64, 500))
    with pytest.raises(InvalidRequestError, match="width 500, which no attention layer of this server's"):
        check_asset(odd, targets=served_targets(default_registry))
    mixed = _webui_hypernetwork(tmp_path / "mixed.pt", (64, 768))  # one width of each model
    with pytest.raises(InvalidRequestError, match="widths are those of different models"):
        check_asset(mixed, targets=served_targets(default_registry))


def test_shapes_vae_is_recognised_and_refused_on_sd15(
    tmp_path: Path, default_registry: ModelRegistry
) -> None:
    vae = AutoencoderKL.from_pretrained(SHAPES / "vae", local_files_only=True)
    path = tmp_path / "shapes-vae.safetensors"
    save_file({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict()).items()}, str(path))
    info = check_asset(path, targets=served_targets(default_registry)).info
    assert (info.kind, info.format, info.family) == (AssetKind.VAE, "ldm", Family.sd15)
    assert info.details["model"] == "shapes" and info.details["tensors"] == len(vae.state_dict())
    with pytest.raises(InvalidRequestError, match=r"^This VAE's layer shapes do not match the SD 1\.5 VAE"):
        check_asset(path)
    torch.manual_seed(0)
    other = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
    )
    other_path = tmp_path / "other-vae.safetensors"
    save_file(other.state_dict(), str(other_path))
    with pytest.raises(InvalidRequestError) as refused:
        check_asset(other_path, targets=served_targets(default_registry))
    assert (
        str(refused.value) == "This VAE's layer shapes do not match the shapes model's VAE this server uses."
    )


def test_family_files_still_fit_family_targets_only() -> None:
    shapes = target_for_folder("shapes", Family.sd15, SHAPES)
    sd15 = canonical_target(Family.sd15)
    assert adapter_fits(AssetKind.EMBEDDING, {"width": 768}, sd15)
    assert not adapter_fits(AssetKind.EMBEDDING, {"width": 768}, shapes)
    assert adapter_fits(AssetKind.EMBEDDING, {"width": 64}, shapes)  # untagged but as wide as its encoder
    assert not adapter_fits(AssetKind.HYPERNETWORK, {"widths": [320, 640, 768, 1280]}, shapes)
    assert not adapter_fits(AssetKind.VAE, {}, shapes)  # its VAE is not SD 1.5's
    assert adapter_fits(AssetKind.LORA, {}, shapes)  # a LoRA's layers are checked when it is applied
    tagged = {"model": "shapes", "model_key": shapes.key}
    assert adapter_fits(AssetKind.LORA, tagged, shapes) and not adapter_fits(AssetKind.LORA, tagged, sd15)
    assert not adapter_fits(AssetKind.LORA, {"model": "shapes", "model_key": "0" * 16}, shapes)


# --- applying them to the shapes pipeline ------------------------------------------------------------------


def test_lora_set_applies_purple_circles_as_diffusers_does_and_comes_off(
    shapes_pipe: StableDiffusionPipeline,
) -> None:
    sd = load_state_dict(PURPLE, max_bytes=MAX_BYTES)
    metadata = read_safetensors_header(PURPLE).metadata
    lora_set = LoraSet(shapes_pipe)
    info = inspect_lora(sd, metadata, targets=[lora_set.target])
    assert (
        info is not None and info.details["model_key"] == target_for_folder("shapes", Family.sd15, SHAPES).key
    )
    before = _run(shapes_pipe)
    lora_set.activate(shapes_pipe, [ActiveLora(key="purple", state_dict=sd, info=info, metadata=metadata)])
    with_lora = _run(shapes_pipe)
    lora_set.deactivate(shapes_pipe)
    assert torch.equal(_run(shapes_pipe), before)  # bit-identical once switched off
    assert (with_lora - before).abs().max() > 1e-2
    lora_set.clear(shapes_pipe)

    assert torch.equal(_run(shapes_pipe), before)

    fresh = StableDiffusionPipeline.from_pretrained(SHAPES, local_files_only=True)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(PURPLE), adapter_name="reference")  # diffusers' own kohya loader
    torch.testing.assert_close(with_lora, _run(fresh), rtol=1e-4, atol=1e-4)


def test_shapes_embedding_and_hypernetwork_apply_and_restore(
    tmp_path: Path, shapes_pipe: StableDiffusionPipeline
) -> None:
    before = _run(shapes_pipe)
    obj = load_pickle_object(_webui_embedding(tmp_path / "shapey.pt", 64), max_bytes=MAX_BYTES)
    with load_embeddings(shapes_pipe, Family.sd15, {"shapey": embedding_vectors(obj, Family.sd15)}) as loaded:
        changed = _run(shapes_pipe, f"a red circle on the left, {' '.join(loaded['shapey'])}")
    assert not torch.equal(changed, before) and torch.equal(_run(shapes_pipe), before)

    path = _webui_hypernetwork(tmp_path / "shapenet.pt", (64, 48, 96))
    network = load_hypernetwork(load_pickle_object(path, max_bytes=MAX_BYTES))
    unet = shapes_pipe.unet
    with apply_hypernetworks(unet, [(network, 1.0)]):
        processors = unet.attn_processors
        changed = _run(shapes_pipe)
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert len(processors) == len(attention) == 20  # both attentions of the 10 transformer blocks
    assert (changed - before).abs().max() > 1e-3 and torch.equal(_run(shapes_pipe), before)


def test_sd15_lora_does_not_fit_the_shapes_pipeline(shapes_pipe: StableDiffusionPipeline) -> None:
    from tests.models.adapters.test_lora import kohya_state_dict, sd15_kohya_layers

    sd = kohya_state_dict(sd15_kohya_layers())
    info = inspect_lora(sd)
    assert info is not None and "model" not in info.details
    lora_set = LoraSet(shapes_pipe)
    with pytest.raises(InvalidRequestError, match="does not fit the layers of this server's model"):
        lora_set.activate(shapes_pipe, [ActiveLora(key="sd15", state_dict=sd, info=info)])
    assert lora_set.resident == () and not any(shapes_pipe.get_list_adapters().values())
