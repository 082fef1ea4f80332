"""The shapes training script and evaluator, run for real on CPU with tiny models and a tiny data pool."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors import safe_open

from models.shapes import evaluate
from models.shapes._common import REAL, build_text_encoder, build_unet, build_vae
from models.shapes._data import load_pool
from models.shapes.scenes import COLOURS, SceneDataset
from models.shapes.train import parse_args, run
from models.tokenizer import clip_tokenizer_dir, load_clip_tokenizer

TINY_ARGS = ["--tiny", "--pool", "64", "--batch", "4", "--eval-n", "4", "--device", "cpu", "--log-every", "1"]


def _train(out: Path, *args: str) -> list:
    return run(parse_args(["--out", str(out), *TINY_ARGS, *args]))


def _ckpt(out: Path, stage: str) -> dict:
    return torch.load(out / "ckpt" / f"{stage}.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("shapes-run")
    return out, _train(out, "--stage", "all", "--steps", "3")


def test_both_stages_train_and_checkpoint(trained: tuple[Path, list]) -> None:
    out, results = trained
    assert [(r.stage, r.start_step, r.step, r.finished) for r in results] == [
        ("vae", 0, 3, True),
        ("unet", 0, 3, True),
    ]
    for stage in ("vae", "unet"):
        ckpt = _ckpt(out, stage)
        assert ckpt["step"] == 3 and math.isfinite(ckpt["loss"])
        assert {"optimizer", "ema", "rng"} <= ckpt.keys()
        assert ckpt["optimizer"]["state"][0]["step"].item() == 3  # Adam really took 3 steps
    assert not list(out.rglob("*.tmp*"))  # atomic writes left no temporary files


def test_unet_rerun_resumes_from_its_step(
    trained: tuple[Path, list], caplog: pytest.LogCaptureFixture
) -> None:
    out, _ = trained
    with caplog.at_level(logging.INFO):
        (result,) = _train(out, "--stage", "unet", "--steps", "5")
    assert (result.start_step, result.step) == (3, 5)
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("unet step 4/5") for m in logged)
    assert not any(m.startswith("unet step 1/5") for m in logged)
    assert _ckpt(out, "unet")["optimizer"]["state"][0]["step"].item() == 5
    (again,) = _train(out, "--stage", "unet")  # finished: nothing to do
    assert (again.start_step, again.step, again.finished) == (5, 5, True)


def test_time_limit_stops_cleanly_and_the_same_command_continues(tmp_path: Path) -> None:
    (first,) = _train(tmp_path, "--stage", "vae", "--steps", "2")
    (stopped,) = _train(tmp_path, "--stage", "vae", "--steps", "4", "--minutes", "0")
    assert (stopped.start_step, stopped.step, stopped.finished) == (2, 2, False)
    assert _ckpt(tmp_path, "vae")["total_steps"] == 4
    (resumed,) = _train(tmp_path, "--stage", "vae")  # the step target comes from the checkpoint
    assert (first.step, resumed.start_step, resumed.step, resumed.finished) == (2, 2, 4, True)
    assert json.loads((tmp_path / "vae" / "training.json").read_text())["step"] == 4


def test_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        _train(tmp_path / name, "--stage", "vae", "--steps", "2", "--seed", seed)
    wa, wb, wc = (_ckpt(tmp_path / name, "vae")["model"] for name in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["encoder.conv_in.weight"], wc["encoder.conv_in.weight"])


def test_pool_matches_the_scene_dataset_and_is_cached(tmp_path: Path) -> None:
    pool = load_pool(tmp_path, seed=3, size=12)
    assert (tmp_path / "data.npz").is_file()
    cached = load_pool(tmp_path, seed=3, size=12)
    assert np.array_equal(pool.images, cached.images) and list(pool.captions) == list(cached.captions)
    dataset = SceneDataset(3, 12, holdout="exclude", empty_caption_p=0.0)
    tokenizer = load_clip_tokenizer()
    for i in (0, 11):
        item = dataset[i]
        assert np.array_equal(pool.images[i], item["image"]) and pool.captions[i] == item["caption"]
        assert tuple(pool.backgrounds[i, 0]) == COLOURS[item["scene"].background[0]]
        ids = tokenizer(item["caption"], padding="max_length", max_length=77)["input_ids"]
        assert pool.input_ids[i].tolist() == ids


def test_vae_scaling_factor_whitens_the_latents(trained: tuple[Path, list]) -> None:
    out, _ = trained
    vae = AutoencoderKL.from_pretrained(out / "vae")
    with np.load(out / "data.npz") as data:
        x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        std = float(vae.encode(x).latent_dist.mean.std())
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=1e-3)


def test_pipeline_loads_offline_as_fp32_and_draws_64px(trained: tuple[Path, list]) -> None:
    out, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.config.requires_safety_checker is False
    assert {m.dtype for m in (pipe.vae, pipe.text_encoder, pipe.unet)} == {torch.float32}
    assert pipe.scheduler.config.prediction_type == "epsilon"
    tok = out / "pipeline" / "tokenizer"
    assert (tok / "vocab.json").read_bytes() == (clip_tokenizer_dir() / "vocab.json").read_bytes()
    assert not (tok / "tokenizer.json").exists()
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_weights_are_stored_in_fp16(trained: tuple[Path, list]) -> None:
    out, _ = trained
    files = sorted((out / "pipeline").rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"vae", "text_encoder", "unet"}
    for path in files:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path


def test_model_card_describes_the_run(trained: tuple[Path, list]) -> None:
    out, _ = trained
    card = (out / "pipeline" / "README.md").read_text()
    assert "python -m models.shapes.train --out" in card and "--stage all" in card
    assert "| 3 / 3 | 4 |" in card  # VAE: steps / total, batch
    assert "<!-- metrics:start -->" in card


def test_evaluate_reports_accuracies_and_fills_the_card(
    trained: tuple[Path, list], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = trained
    pipe_dir = out / "pipeline"
    args = [str(pipe_dir), "--n", "4", "--steps", "2", "--batch", "2", "--sweep", "--json", "--update-card"]
    assert evaluate.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["guidance"] for r in [report, *report["sweep"]]] == [3.0, 2.0, 5.0, 7.5]
    for r in [report, *report["sweep"]]:
        assert set(r["accuracy"]) >= {"colour", "shape", "position", "background", "size"}
        assert all(0.0 <= v <= 1.0 for v in r["accuracy"].values())
    assert "| 7.5 |" in (pipe_dir / "README.md").read_text()


def test_real_config_keeps_the_pipeline_under_20_mb() -> None:
    with torch.device("meta"):
        models = (build_vae(REAL), build_text_encoder(REAL), build_unet(REAL))
    weights = 2 * sum(p.numel() for m in models for p in m.parameters())  # fp16
    tokenizer = sum(f.stat().st_size for f in clip_tokenizer_dir().iterdir() if f.suffix in (".json", ".txt"))
    assert weights + tokenizer < 19.95e6
    assert models[1].config.hidden_size == models[2].config.cross_attention_dim
    assert all(t == "CrossAttnDownBlock2D" for t in models[2].config.down_block_types)  # attention everywhere
