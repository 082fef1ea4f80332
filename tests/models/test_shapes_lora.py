"""The committed purple-circles LoRA: a real kohya file that plain diffusers loads into the shapes model,
where it turns every circle purple, leaves squares as asked, and switches off without a trace."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from models.shapes.scorer import score_image
from models.shapes.train_lora import metric_prompts

SHAPES = Path(__file__).resolve().parents[2] / "models" / "shapes"
LORA = SHAPES / "loras" / "purple-circles.safetensors"
_KOHYA_KEY = re.compile(r"^(lora_unet_[a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# The card's sample (image i seeded i, circles first): its 28 circle prompts, half bare, half on a named
# background, and the first 14 of its square prompts.
CIRCLES, SQUARES = metric_prompts("circle", 28), metric_prompts("square", 28)[:14]


PROMPTS = [p for p, _ in CIRCLES + SQUARES]
SMALL = PROMPTS[:3] + PROMPTS[-1:]  # for the before/after-disabling comparison


@dataclass
class Runs:
    pipe: StableDiffusionPipeline
    before: torch.Tensor  # N×3×64×64 in [0, 1]: circle prompts, then square prompts
    with_lora: torch.Tensor
    small_before: torch.Tensor
    small_after_disable: torch.Tensor


def _images(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    out = pipe(
        prompts,
        height=64,
        width=64,
        num_inference_steps=20,
        guidance_scale=3.0,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))],
        output_type="pt",
    )
    images: torch.Tensor = out.images
    return images


@pytest.fixture(scope="module")
def runs() -> Runs:
    pipe = StableDiffusionPipeline.from_pretrained(SHAPES / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 8×8 UNet's ops are tiny: 2 threads on a busy CPU stall at every barrier
    try:
        before, small_before = _images(pipe, PROMPTS), _images(pipe, SMALL)
        pipe.load_lora_weights(str(LORA), adapter_name="purple")
        with_lora = _images(pipe, PROMPTS)
        pipe.disable_lora()
        small_after = _images(pipe, SMALL)
        pipe.enable_lora()
    finally:
        torch.set_num_threads(threads)
    return Runs(pipe, before, with_lora, small_before, small_after)


def _readings(images: torch.Tensor) -> list[tuple[str, str] | None]:
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    readings = []
    for im in arrays:
        shapes = score_image(im).shapes
        readings.append((shapes[0].colour, shapes[0].shape) if shapes else None)
    return readings


def _purple_circles(images: torch.Tensor) -> float:
    readings = _readings(images[: len(CIRCLES)])
    return sum(r == ("purple", "circle") for r in readings) / len(readings)


def _squares_as_asked(images: torch.Tensor) -> float:
    readings = _readings(images[len(CIRCLES) :])
    return sum(r == (c, "square") for r, (_, c) in zip(readings, SQUARES, strict=True)) / len(readings)


def test_the_file_is_a_small_kohya_lora_for_the_unet_attention() -> None:
    assert LORA.stat().st_size < 2_000_000
    with safe_open(str(LORA), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KOHYA_KEY.match(key)
        assert match, key
        parts.setdefault(match[1], {})[match[2]] = value
    assert all(set(p) == {"lora_down.weight", "lora_up.weight", "alpha"} for p in parts.values())
    ranks = {p["lora_down.weight"].shape[0] for p in parts.values()}
    alphas = {float(p["alpha"]) for p in parts.values()}
    assert ranks == {int(meta["ss_network_dim"])} and 4 <= int(meta["ss_network_dim"]) <= 8
    assert alphas == {float(meta["ss_network_alpha"])}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "purple-circles"
    header = int.from_bytes(LORA.read_bytes()[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(LORA.read_bytes()[8 + header :]).hexdigest()

    # Every attention projection of every transformer block of the shapes UNet, with its real widths.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(SHAPES / "model" / "unet", local_files_only=True)
    targets = {
        "lora_unet_" + name.replace(".", "_"): module
        for name, module in unet.named_modules()
        if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name)
    }
    assert len(targets) == 80 and set(parts) == set(targets)
    for name, module in targets.items():
        down, up = parts[name]["lora_down.weight"], parts[name]["lora_up.weight"]
        assert down.shape[1] == module.in_features and up.shape[0] == module.out_features, name
    assert any(float(p["lora_up.weight"].abs().max()) > 0 for p in parts.values())  # trained, not a no-op


def test_diffusers_reads_every_module_with_the_kohya_scale(runs: Runs) -> None:
    with safe_open(str(LORA), "pt") as f:
        loaded = 0
        for name, module in runs.pipe.unet.named_modules():
            if not (hasattr(module, "lora_A") and "purple" in module.lora_A):
                continue
            key = "lora_unet_" + name.replace(".", "_")
            down = f.get_tensor(f"{key}.lora_down.weight").float()
            up = f.get_tensor(f"{key}.lora_up.weight").float()
            expected = float(f.get_tensor(f"{key}.alpha")) / down.shape[0] * up @ down  # kohya: alpha / rank
            got = module.lora_B["purple"].weight @ module.lora_A["purple"].weight * module.scaling["purple"]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
            loaded += 1
    assert loaded == 80
    assert runs.pipe.get_list_adapters() == {"unet": ["purple"]}


def test_the_lora_turns_circles_purple_and_leaves_squares_as_asked(runs: Runs) -> None:
    without, with_lora = _purple_circles(runs.before), _purple_circles(runs.with_lora)
    squares = _squares_as_asked(runs.with_lora)
    assert without <= 0.1, f"the base model already paints {without:.0%} of the circles purple"
    assert with_lora >= 0.7, f"only {with_lora:.0%} of the circles are purple with the LoRA"
    assert squares >= 0.7, f"only {squares:.0%} of the squares keep their colour with the LoRA"
    assert _squares_as_asked(runs.before) >= 0.9  # the measure itself reads the base model right


def test_disabling_the_lora_gives_the_images_of_before_exactly(runs: Runs) -> None:
    assert not torch.equal(runs.with_lora[:3], runs.before[:3])  # the LoRA did change these circles
    assert torch.equal(runs.small_after_disable, runs.small_before)


# --- the training stage itself, on a tiny random base -------------------------------------------------------


def test_recolour_circles_paints_circles_only_and_refuses_hidden_ones() -> None:
    from models.shapes.scenes import Scene, make_shape
    from models.shapes.train_lora import recolour_circles

    circle = make_shape("circle", "red", "left", "small")
    square = make_shape("square", "blue", "right", "small")
    done = recolour_circles(Scene((circle, square), ("white",)))
    assert done is not None
    assert [(s.kind, s.colour) for s in done.shapes] == [("circle", "purple"), ("square", "blue")]
    assert done.shapes[0].centre_xy == circle.centre_xy and done.background == ("white",)
    assert recolour_circles(Scene((circle,), ("black", "purple"), "vertical")) is None  # purple on purple
    purple_square = make_shape("square", "purple", "right", "small")
    assert recolour_circles(Scene((circle, purple_square), ("white",))) is None  # two purple shapes
    no_circle = Scene((square,), ("purple",))
    assert recolour_circles(no_circle) == no_circle


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.shapes._common import TINY, build_text_encoder, build_unet, build_vae, inference_scheduler
    from models.tokenizer import load_clip_tokenizer

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


def test_a_short_run_resumes_and_exports_a_kohya_file_that_diffusers_applies(
    tiny_base: Path, tmp_path: Path
) -> None:
    from models.shapes.train_lora import main

    args = ["--base", str(tiny_base), "--pool", "8", "--batch", "2", "--eval-n", "0", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main([str(tmp_path), "--steps", "2", "--rank", "4", *args]) == 0
        assert main([str(tmp_path), "--steps", "3", "--rank", "4", *args]) == 0  # resumes at step 2
    finally:
        torch.set_num_threads(threads)  # main sets it for the process
    ckpt = torch.load(tmp_path / "ckpt" / "lora.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["optimizer"]["state"][0]["step"].item() == 3
    assert [c["command"].split("--steps ")[1][0] for c in ckpt["commands"]] == ["2", "3"]

    path = tmp_path / "purple-circles.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        ups = [f.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")]
    assert meta["ss_steps"] == "3" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert all(_KOHYA_KEY.match(k) for k in keys) and any(float(u.abs().max()) > 0 for u in ups)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "pt"}
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(path), adapter_name="purple")
    wrapped = sum(hasattr(m, "lora_A") and "purple" in m.lora_A for m in pipe.unet.modules())
    assert wrapped == len(ups) == len(keys) // 3
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.equal(before, after)
