"""ControlNets and upscalers: where they are found, which is the default, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.extras import SHAPES_CONTROLNET, ExtraKind, ExtraRegistry
from models.families import Family
from storage.errors import IncompatibleAssetError, NotFoundError


def _controlnet_folder(path: Path, cross_attention_dim: int = 768) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"cross_attention_dim": cross_attention_dim}))
    return path


def _registry(tmp_path: Path, **kwargs: object) -> ExtraRegistry:
    return ExtraRegistry(builtin_dir=tmp_path / "tiny", **kwargs)  # type: ignore[arg-type]


def test_builtins_are_listed(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    controlnets = {e.name: e for e in registry.list(ExtraKind.controlnet)}
    assert controlnets[SHAPES_CONTROLNET].family == Family.sd15 and not controlnets[SHAPES_CONTROLNET].tiny
    assert controlnets["tiny-controlnet-xl"].family == Family.sdxl and controlnets["tiny-controlnet-xl"].tiny
    upscalers = {e.name: e.kind for e in registry.list(ExtraKind.upscaler)}
    assert upscalers == {"tiny-esrgan": ExtraKind.upscaler, "tiny-x4": ExtraKind.latent_upscaler}


def test_the_shapes_controlnet_is_the_default_only_for_the_shapes_model(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    entry = registry.require_controlnet(None, family=Family.sd15, control_type="canny", model="shapes")
    assert entry.name == SHAPES_CONTROLNET
    with pytest.raises(NotFoundError, match="No scribble ControlNet for sd15 is installed"):
        registry.require_controlnet(None, family=Family.sd15, control_type="scribble", model="my-model")


def test_default_is_chosen_by_type_from_the_name(tmp_path: Path) -> None:
    canny = _controlnet_folder(tmp_path / "cn" / "control_v11p_sd15_canny")
    depth = _controlnet_folder(tmp_path / "cn" / "control_v11f1p_sd15_depth")
    xl = _controlnet_folder(tmp_path / "cn" / "xl-canny", cross_attention_dim=2048)
    registry = _registry(
        tmp_path,
        controlnets={"control_v11p_sd15_canny": str(canny), "depth-one": str(depth), "xl-canny": str(xl)},
    )
    pick = registry.require_controlnet
    assert pick(None, family=Family.sd15, control_type="canny", model="m").name == "control_v11p_sd15_canny"
    assert pick(None, family=Family.sd15, control_type="depth", model="m").name == "depth-one"
    assert pick(None, family=Family.sdxl, control_type="canny", model="m").name == "xl-canny"
    with pytest.raises(IncompatibleAssetError, match="is for sdxl"):
        pick("xl-canny", family=Family.sd15, control_type="canny", model="m")
    with pytest.raises(NotFoundError, match="no ControlNet called 'nope'"):
        pick("nope", family=Family.sd15, control_type="canny", model="m")


def test_an_a1111_root_is_scanned(tmp_path: Path) -> None:
    root = tmp_path / "webui"
    _controlnet_folder(root / "models" / "ControlNet" / "control_scribble")
    (root / "models" / "ESRGAN").mkdir(parents=True)
    (root / "models" / "ESRGAN" / "4x-UltraSharp.pth").write_bytes(b"x")
    (root / "models" / "ESRGAN" / "notes.txt").write_text("not a model")
    registry = _registry(tmp_path, models_root=root)
    assert registry.get_controlnet("CONTROL_SCRIBBLE") is not None
    assert registry.get_upscaler("4x-ultrasharp") is not None and registry.get_upscaler("notes") is None
    assert registry.require_upscaler(None).name == "4x-UltraSharp"  # configured beats built-in


def test_upscaler_default_and_errors(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    assert registry.require_upscaler(None).name == "tiny-x4"
    with pytest.raises(NotFoundError, match="no upscaler called 'R-ESRGAN 4x'"):
        registry.require_upscaler("R-ESRGAN 4x")
    with pytest.raises(NotFoundError, match="must be a GAN model file or an x4 upscaler folder"):
        _registry(tmp_path, upscalers={"gone": str(tmp_path / "missing.pth")})
