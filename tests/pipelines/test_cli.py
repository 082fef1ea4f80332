"""The ``dreamcord`` CLI contract: JSON output, exit code 2 with one sentence for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
