"""PNG info for every mode: the webui's keys, readable back by the webui's own parser rules."""

from __future__ import annotations

from pipelines.jobs import ControlUnit, JobKind, JobSpec
from pipelines.parameters import webui_parameters
from pipelines.pnginfo import parse_parameters

BASE = JobSpec(prompt="a red circle", negative_prompt="blurry", width=64, height=64, seed=5, steps=10)


def _params(spec: JobSpec, extra: dict[str, object] | None = None) -> dict[str, str]:
    prompt, negative, params = parse_parameters(
        webui_parameters(spec, 5, "shapes", "abcdef1234567890", extra)
    )
    assert prompt == spec.prompt and negative == spec.negative_prompt
    return params


def test_txt2img_has_no_mode_keys() -> None:
    params = _params(BASE)
    assert params["Size"] == "64x64" and params["Model hash"] == "abcdef1234" and params["Seed"] == "5"
    assert not {"Denoising strength", "Mask blur", "Hires upscale"} & set(params)


def test_img2img_and_inpaint_keys() -> None:
    assert (
        _params(JobSpec(**{**BASE.to_dict(), "kind": "img2img", "strength": 0.3}))["Denoising strength"]
        == "0.3"
    )
    inpaint = _params(
        JobSpec(
            **{**BASE.to_dict(), "kind": "inpaint", "mask_blur": 6, "only_masked": True, "masked_padding": 16}
        )
    )
    assert inpaint["Mask blur"] == "6" and inpaint["Inpaint area"] == "Only masked"
    assert inpaint["Masked area padding"] == "16" and inpaint["Denoising strength"] == "0.75"


def test_hires_keys_and_final_size() -> None:
    spec = JobSpec(**{**BASE.to_dict(), "hires_scale": 2.0, "hires_steps": 5, "hires_denoise": 0.5})
    params = _params(spec)
    assert params["Size"] == "128x128" and params["Hires upscale"] == "2"
    assert params["Hires steps"] == "5" and params["Hires upscaler"] == "Latent"
    assert params["Denoising strength"] == "0.5"
    assert "Hires steps" not in _params(JobSpec(**{**spec.to_dict(), "hires_steps": 0}))


def test_controlnet_units_as_the_extension_writes_them() -> None:
    units = (
        ControlUnit("canny", model="control_canny", low=50, high=150, weight=0.8),
        ControlUnit("scribble", model="shapes-scribble", start=0.1, end=0.9),
    )
    params = _params(JobSpec(**{**BASE.to_dict(), "kind": JobKind.controlnet, "controls": units}))
    assert params["ControlNet 0"] == (
        "Module: canny, Model: control_canny, Weight: 0.8, Resize Mode: Crop and Resize, Threshold A: 50, "
        "Threshold B: 150, Guidance Start: 0, Guidance End: 1, Control Mode: Balanced"
    )
    assert "Guidance Start: 0.1, Guidance End: 0.9" in params["ControlNet 1"]
    assert "Threshold" not in params["ControlNet 1"] and "Denoising strength" not in params


def test_upscale_keys_like_the_extras_tab_and_runner_extras_win() -> None:
    spec = JobSpec(prompt="", kind=JobKind.upscale, width=64, height=48, scale=2, upscaler="tiny-esrgan")
    text = webui_parameters(spec, 1, None, None, {"Tile size": 32})
    _, _, params = parse_parameters(text)
    assert params == {
        "Postprocess upscale by": "2",
        "Postprocess upscaler": "tiny-esrgan",
        "Size": "128x96",
        "Tile size": "32",
    }
