"""The registry finds models in settings, an A1111 folder layout and the built-ins; the cache loads them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.cache import PipelineCache, choose_device
from models.families import Family, detect_family_from_folder
from models.registry import ModelRegistry, SourceKind, file_sha256
from storage.errors import InvalidRequestError, NotFoundError


@pytest.fixture
def a1111_root(tmp_path: Path, tiny_models: Path) -> Path:
    root = tmp_path / "webui"
    checkpoints = root / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    shutil.copytree(tiny_models / "sd15", checkpoints / "my-diffusers-model")
    (checkpoints / "notes.txt").write_text("not a model")
    return root


def test_builtins_are_listed_with_families(tiny_models: Path) -> None:
    registry = ModelRegistry(builtin_dir=tiny_models)
    entries = {e.name: e for e in registry.list()}
    assert entries["tiny-sd15"].family == Family.sd15 and entries["tiny-sd15"].kind == SourceKind.builtin
    assert entries["tiny-sdxl"].family == Family.sdxl
    assert entries["shapes"].family == Family.sd15 and entries["shapes"].default_size == 64
    assert not entries["shapes"].built_on_demand and entries["tiny-sd15"].built_on_demand
    assert registry.default_name == "shapes" and registry.using_builtin_default


def test_a1111_root_and_settings_models(a1111_root: Path, tiny_models: Path) -> None:
    registry = ModelRegistry(
        builtin_dir=tiny_models, models_root=a1111_root, extra={"XL": str(tiny_models / "sdxl")}
    )
    found = registry.require("my-diffusers-model")
    assert found.kind == SourceKind.folder and found.family == Family.sd15
    assert registry.require("xl").family == Family.sdxl  # names match case-insensitively
    assert registry.default_name == "my-diffusers-model" and not registry.using_builtin_default
    assert "notes" not in {e.name for e in registry.list()}


def test_unknown_and_offline_hub_models_are_refused(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(builtin_dir=tiny_models, extra={"hubby": "someone/some-model"})
    with pytest.raises(NotFoundError, match="There is no model called 'nope'; available models: .*tiny-sd15"):
        registry.require("nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFoundError, match="hub id, but this bot runs offline"):
        registry.require("hubby")
    with pytest.raises(NotFoundError, match="neither a file, a folder nor a hub id"):
        ModelRegistry(builtin_dir=tiny_models, extra={"bad": "/definitely/not/here"})


def test_family_detection_refuses_non_sd_folders(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(InvalidRequestError, match="only SD 1.x and SDXL"):
        detect_family_from_folder(tmp_path)
    with pytest.raises(InvalidRequestError, match="no model_index.json"):
        detect_family_from_folder(tmp_path / "empty")


def test_model_hash_is_the_unet_file_sha256(tiny_models: Path) -> None:
    registry = ModelRegistry(builtin_dir=tiny_models)
    entry = registry.require("tiny-sd15")
    expected = file_sha256(tiny_models / "sd15" / "unet" / "diffusion_pytorch_model.safetensors")
    assert registry.model_hash(entry) == expected and len(expected) == 64


def test_cache_shares_components_and_evicts_lru(tiny_models: Path) -> None:
    registry = ModelRegistry(builtin_dir=tiny_models)
    device, dtype = choose_device("cpu")
    assert (device.type, dtype) == ("cpu", torch.float32)
    cache = PipelineCache(registry, device=device, dtype=dtype, budget_bytes=10**12)
    sd = cache.get("tiny-sd15")
    assert cache.get("TINY-SD15") is sd
    img2img = sd.pipeline("StableDiffusionImg2ImgPipeline")
    assert img2img.unet is sd.base.unet and img2img.vae is sd.base.vae
    cache.get("tiny-sdxl")
    assert cache.loaded_names() == ["tiny-sd15", "tiny-sdxl"]
    cache.budget_bytes = 1  # over budget: everything but the model just used goes
    cache.get("tiny-sd15")
    assert cache.loaded_names() == ["tiny-sd15"]


def test_single_file_in_a1111_root_loads_through_the_cache(tmp_path: Path, tiny_models: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from models.ldm_export import save_config_dir, save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "sd15", local_files_only=True)
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    save_single_file(pipe, checkpoints / "civitai-style.safetensors")
    save_config_dir(pipe, checkpoints / "civitai-style.config")  # the tiny shapes need a sidecar config
    registry = ModelRegistry(builtin_dir=tiny_models, models_root=tmp_path)
    entry = registry.require("civitai-style")
    assert entry.kind == SourceKind.single_file and entry.family == Family.sd15
    assert "civitai-style.config" not in {e.name for e in registry.list()}
    assert registry.model_hash(entry) == file_sha256(checkpoints / "civitai-style.safetensors")
    cache = PipelineCache(registry, device=torch.device("cpu"), dtype=torch.float32, budget_bytes=10**12)
    loaded = cache.get("civitai-style")
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(loaded.base.unet.state_dict()[name], tensor), name


def test_cache_freezes_the_heap_after_a_load_and_thaws_it_when_models_go(tiny_models: Path) -> None:
    """Loaded weights are kept out of full garbage collections (they stall the bot's loop) until dropped."""
    import gc

    gc.unfreeze()
    registry = ModelRegistry(builtin_dir=tiny_models)
    cache = PipelineCache(registry, device=torch.device("cpu"), dtype=torch.float32, budget_bytes=1)
    cache.get("tiny-sd15")
    assert gc.get_freeze_count() > 0
    cache.get("tiny-sdxl")  # over the budget: tiny-sd15 is evicted (unfrozen), then the heap refrozen
    assert cache.loaded_names() == ["tiny-sdxl"]
    assert gc.get_freeze_count() > 0
    cache.clear()
    assert gc.get_freeze_count() == 0
