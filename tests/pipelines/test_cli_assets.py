"""``dreamcord check-asset`` and ``assets``: every real fixture recognised, hostile files refused."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.cli import main

DREAMCORD = Path(sys.executable).parent / "dreamcord"

# What ../shared/fixtures/README.md says each file is (independent of our code): kind, format, vectors/rank.
FIXTURES = {
    "embeddings/EasyNegative.safetensors": ("embedding", "webui-safetensors", {"vectors": 8}),
    "embeddings/bad-artist.pt": ("embedding", "webui-pt", {"vectors": 2}),
    "embeddings/bad-artist-anime.pt": ("embedding", "webui-pt", {"vectors": 2}),
    "embeddings/bad-hands-5.pt": ("embedding", "webui-pt", {"vectors": 2}),
    "embeddings/eyeliner2.pt": ("embedding", "webui-pt", {"vectors": 3}),
    "embeddings/bad_prompt_version2.pt": ("embedding", "webui-pt", {"vectors": 8}),
    "embeddings/bad-prompt.pt": ("embedding", "webui-pt", {"vectors": 16}),
    "embeddings/fastai_birb-style_learned_embeds.bin": ("embedding", "diffusers", {"vectors": 1}),
    "lora/analog_svd_rank4.safetensors": ("lora", "cloneofsimo", {"rank": 4}),
    "lora/lora_disney.safetensors": ("lora", "cloneofsimo", {}),
    "lora/smart_falcon_4_lokr.safetensors": ("lora", "lycoris-lokr", {}),
    "lora/smart_falcon_16_lokr.safetensors": ("lora", "lycoris-lokr", {}),
    "lora/diffusers_old_format_pytorch_lora_weights.safetensors": ("lora", "diffusers-old", {"rank": 4}),
    "lora/sd15_text_encoder_adapter_model.safetensors": ("lora", "peft", {"rank": 8}),
}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "DREAMCORD_DATA_DIR": str(tmp_path / "data"),
        "DREAMCORD_CONFIG": str(tmp_path / "none.toml"),
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


def _check(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, object]]:
    code = main(["check-asset", str(path), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("relative", sorted(FIXTURES))
def test_every_real_fixture_is_recognised(
    relative: str, fixtures_dir: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    kind, fmt, details = FIXTURES[relative]
    code, report = _check(fixtures_dir / relative, capsys)
    assert code == 0, report
    assert (report["ok"], report["kind"], report["format"], report["family"]) == (True, kind, fmt, "sd15")
    got = report["details"]
    assert isinstance(got, dict)
    for key, value in details.items():
        assert got[key] == value


def test_lokr_hash_is_the_webui_lora_hash(
    fixtures_dir: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The README: ``sshs_model_hash`` in the file's metadata is what A1111 prints as "Lora hashes"."""
    from models.adapters.safe_files import read_safetensors_header

    path = fixtures_dir / "lora/smart_falcon_4_lokr.safetensors"
    code, report = _check(path, capsys)
    assert code == 0
    expected = read_safetensors_header(path).metadata["sshs_model_hash"]
    assert report["short_hash"] == expected[:12]
    assert report["sha256"] != expected  # the whole-file hash is a different thing


def test_kind_mismatch_is_one_sentence(
    fixtures_dir: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _check(fixtures_dir / "embeddings/EasyNegative.safetensors", capsys, "--kind", "lora")
    assert code == 1
    assert report == {
        "ok": False,
        "error": "This file is not a LoRA we recognise; check that you picked the right kind.",
    }


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_nothing_runs(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    for name in ("cute_lora.pt", "cute_lora.bin", "cute_lora.ckpt", "cute_lora.safetensors"):
        path = tmp_path / name
        if name.endswith(".pt"):
            torch.save({"string_to_param": {"*": _Evil(marker)}}, path)
        else:
            path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": _Evil(marker)}, protocol=2))
        code, report = _check(path, capsys)
        assert code == 1 and report["ok"] is False
        assert "contains code" in str(report["error"])
        assert not marker.exists()


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (struct.pack("<Q", 10**6) + b"{}", "runs past the end"),
        (struct.pack("<Q", 200 * 2**20) + b"{" + b" " * 100, "larger than allowed"),
        (struct.pack("<Q", 4) + b"{xx}", "not readable JSON"),
        (b"", "empty"),
        (b"hello world, not weights", "not a weights file"),
    ],
)
def test_forged_files_refused(
    blob: bytes, fragment: str, tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "forged.safetensors"
    path.write_bytes(blob)
    code, report = _check(path, capsys)
    assert code == 1
    assert fragment in str(report["error"])


def test_sdxl_lora_refused_by_name_on_an_sd15_server(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A kohya SDXL LoRA (te1/te2, 2048-wide cross-attention): the sentence names both families."""
    rank = 4
    tensors = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(
            rank, 2048
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, rank),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(rank, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, rank),
    }
    path = tmp_path / "xl.safetensors"
    save_file(tensors, str(path))
    code, report = _check(path, capsys)
    assert code == 1
    assert report["error"] == "This LoRA is for SDXL; this server's model is SD 1.5."


def test_assets_add_list_remove_through_the_console_script(
    fixtures_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DREAMCORD), *args], env=env, capture_output=True, text=True, timeout=120)

    added = run("assets", "add", str(fixtures_dir / "embeddings/EasyNegative.safetensors"), "--json")
    assert added.returncode == 0, added.stderr
    report = json.loads(added.stdout)
    assert (report["name"], report["kind"], report["short_hash"]) == (
        "EasyNegative",
        "embedding",
        "c74b4e810b03",
    )
    stored = (
        Path(env["DREAMCORD_DATA_DIR"])
        / "files"
        / report["sha256"][:2]
        / report["sha256"][2:4]
        / report["sha256"]
    )
    assert stored.read_bytes() == (fixtures_dir / "embeddings/EasyNegative.safetensors").read_bytes()

    again = run("assets", "add", str(fixtures_dir / "embeddings/EasyNegative.safetensors"))
    assert again.returncode == 2
    assert again.stderr.strip() == (
        "You already have an embedding called EasyNegative; pick another name or delete the old one first."
    )

    listed = json.loads(run("assets", "list", "--json").stdout)
    assert [(a["kind"], a["name"], a["visibility"]) for a in listed] == [
        ("embedding", "EasyNegative", "public")
    ]

    removed = run("assets", "remove", "EasyNegative", "--kind", "embedding")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(run("assets", "list", "--json").stdout) == []
    assert not stored.exists()  # nothing else used those bytes


def test_refused_upload_stores_nothing(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nan.safetensors"
    save_file({"emb_params": torch.full((2, 768), float("nan"))}, str(path))
    assert main(["assets", "add", str(path), "--name", "broken"]) == 2
    assert "NaN" in capsys.readouterr().err
    files = Path(env["DREAMCORD_DATA_DIR"]) / "files"
    assert not files.exists() or not [p for p in files.rglob("*") if p.is_file() and ".tmp" not in p.parts]
    assert main(["assets", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_lora_made_for_the_shapes_model_is_recognised_for_it(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The committed purple-circles LoRA (its card: kohya, rank 8, alpha 4, 80 UNet attention modules)."""
    lora = Path(__file__).resolve().parents[2] / "models" / "shapes" / "loras" / "purple-circles.safetensors"
    code, report = _check(lora, capsys)
    assert code == 0, report
    assert (report["kind"], report["format"], report["family"]) == ("lora", "kohya", "sd15")
    details = report["details"]
    assert isinstance(details, dict)
    assert (details["model"], details["rank"], details["alpha"], details["layers"]) == ("shapes", 8, 4.0, 80)
