"""The ``dreamcord`` CLI contract: JSON output, exit code 2 with one sentence for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main

DREAMCORD = Path(sys.executable).parent / "dreamcord"


@pytest.fixture
def env(tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "DREAMCORD_DATA_DIR": str(tmp_path / "data"),
        "DREAMCORD_BUILTIN_MODELS_DIR": str(tiny_models),
        "DREAMCORD_CONFIG": str(tmp_path / "none.toml"),
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


def test_generate_json_through_the_console_script(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(DREAMCORD),
            "generate",
            "--prompt",
            "a red circle",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "3",
            "--seed",
            "11",
            "--batch",
            "2",
            "--sampler",
            "Euler a",
            "--out",
            str(out),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert set(payload) == {"job", "images", "previews", "notes", "seconds"}
    assert payload["job"]["prompt"] == "a red circle" and payload["job"]["sampler"] == "Euler a"
    assert [i["seed"] for i in payload["images"]] == [11, 12]
    for item in payload["images"]:
        path = Path(item["path"])
        assert path.parent == out and (item["width"], item["height"]) == (64, 64)
        with Image.open(path) as png:
            assert f"Seed: {item['seed']}" in png.info["parameters"]
    assert "using the built-in shapes model" in proc.stderr  # said once, on stderr
    assert proc.stderr.count("built-in") == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--width", "65"], "multiple of 8"),
        (["--steps", "0"], "Steps must be between 1 and 150"),
        (["--steps", "10000"], "Steps must be between 1 and 150"),
        (["--sampler", "Euler z"], "no sampler called"),
        (["--batch", "9"], "Batch size must be between 1 and 4"),
        (["--model", "unknown"], "There is no model called 'unknown'"),
        (["--width", "abc"], "invalid int value"),
    ],
)
def test_bad_input_exit_2_one_sentence_and_json_error(
    env: dict[str, str], args: list[str], fragment: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["generate", "--prompt", "x", "--json", "--out", str(tmp_path / "o"), *args])
    captured = capsys.readouterr()
    assert code == 2
    assert fragment in captured.err and captured.err.count("\n") == 1
    assert fragment in json.loads(captured.out)["error"]
    assert not (tmp_path / "data" / "files").exists() or not any((tmp_path / "data" / "files").rglob("*"))


def test_empty_prompt_is_refused(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["generate", "--prompt", "", "--out", str(tmp_path / "o")]) == 2
    assert "The prompt is empty" in capsys.readouterr().err


def test_models_list_json(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["shapes"]["default"] and rows["shapes"]["family"] == "sd15"
    assert not rows["tiny-sd15"]["default"] and rows["tiny-sdxl"]["family"] == "sdxl"


def test_pnginfo_json_reads_a_fixture(
    env: dict[str, str], fixtures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = fixtures_dir / "pnginfo" / "parsers__AUTOMATIC1111__automatic1111_cropped.png"
    assert main(["pnginfo", str(png), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["tool"] == "AUTOMATIC1111" and payload["prompt"]
    assert set(payload) == {"tool", "prompt", "negative_prompt", "parameters"}


def test_pnginfo_on_a_non_image(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "x.png"
    bogus.write_bytes(b"hello")
    assert main(["pnginfo", str(bogus), "--json"]) == 2
    assert "not an image" in json.loads(capsys.readouterr().out)["error"]


def test_run_without_token_says_how_to_get_one(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k != "DREAMCORD_DISCORD_TOKEN"}
    proc = subprocess.run(
        [str(DREAMCORD), "run"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert "DREAMCORD_DISCORD_TOKEN" in proc.stderr and "developers/applications" in proc.stderr


def _write_png(path: Path, image: Image.Image) -> Path:
    image.save(path, format="PNG")
    return path


def _red_disc_scene(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import ImageDraw

    scene = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(scene).ellipse((20, 20, 44, 44), fill=(230, 20, 20))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((18, 18, 46, 46), fill=255)
    return _write_png(tmp_path / "scene.png", scene), _write_png(tmp_path / "mask.png", mask)


def test_erase_mode_through_the_cli(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scene, mask = _red_disc_scene(tmp_path)
    out = tmp_path / "out"
    args = [
        "generate",
        "--mode",
        "erase",
        "--init",
        str(scene),
        "--mask",
        str(mask),
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["job"]["kind"] == "erase" and payload["job"]["mask_image"]
    with Image.open(payload["images"][0]["path"]) as image:
        result = np.asarray(image.convert("RGB"), dtype=int)
        parameters = image.info["parameters"]
    red = (result[..., 0] > 150) & (result[..., 1] < 90)
    assert not red.any()  # the disc is gone
    assert "Erase method: Telea" in parameters


def test_preprocess_writes_a_scribble_map(env: dict[str, str], tmp_path: Path) -> None:
    from PIL import ImageDraw

    drawing = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(drawing).line((8, 32, 56, 32), fill=(0, 0, 0), width=3)
    src = _write_png(tmp_path / "drawing.png", drawing)
    assert main(["preprocess", "scribble", str(src), "--out", str(tmp_path / "map.png")]) == 0
    with Image.open(tmp_path / "map.png") as image:
        result = np.asarray(image.convert("L"))
    assert result[32, 32] == 255 and result[5, 5] == 0


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--mode", "inpaint", "--mask", "{black}"], "The mask is all black"),
        (
            ["--mode", "controlnet", "--control", "sketchy:{scene}"],
            "There is no control type called 'sketchy'",
        ),
        (["--mode", "img2img", "--init", "{missing}"], "Cannot read the init image"),
        (["--mode", "upscale", "--scale", "9"], "Upscale factor must be a number between 1 and 4"),
    ],
)
def test_mode_errors_exit_2_with_one_sentence(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    scene, _ = _red_disc_scene(tmp_path)
    black = _write_png(tmp_path / "black.png", Image.new("L", (64, 64), 0))
    paths = {"black": str(black), "scene": str(scene), "missing": str(tmp_path / "nope.png")}
    args = ["generate", "--prompt", "x", "--init", str(scene), "--out", str(tmp_path / "o"), "--json"]
    if "controlnet" in extra:
        args.remove("--init")
        args.remove(str(scene))
    code = main([*args, *[e.format(**paths) for e in extra]])
    captured = capsys.readouterr()
    assert code == 2 and fragment in captured.err and captured.err.count("\n") == 1
    assert not (tmp_path / "data" / "files").exists() or not any((tmp_path / "data" / "files").rglob("*"))


def test_explain_prompt_json(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    text = "a (red:1.3) [circle:square:0.5], <lora:pixel:0.8> BREAK blue background"
    assert main(["explain-prompt", text, "--steps", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"weights", "schedule", "networks", "chunks", "tokens"}
    assert ["red", 1.3] in report["weights"] and ["BREAK", -1] in report["weights"]
    assert [until for until, _ in report["schedule"]] == [5, 10]
    assert "circle" in report["schedule"][0][1] and "square" in report["schedule"][1][1]
    assert report["networks"] == [{"type": "lora", "name": "pixel", "weight": 0.8}]
    assert report["chunks"] == 2  # BREAK starts a second chunk
    assert main(["explain-prompt", "(x:1.2.3)", "--json"]) == 2
    assert "'1.2.3' is not a number" in json.loads(capsys.readouterr().out)["error"]
