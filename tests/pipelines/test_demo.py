"""The demo gallery: every job's inputs, previews and outputs are on the page, and the files exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.demo import run_demo
from pipelines.demo_jobs import DEMO_JOBS, DEMO_MODE_JOBS
from pipelines.jobs import JobKind
from pipelines.settings import load_settings


def test_the_demo_covers_every_mode() -> None:
    kinds = {job.spec.kind for job in DEMO_JOBS}
    assert kinds == set(JobKind)
    assert any(job.spec.hires_scale for job in DEMO_JOBS)
    assert {job.spec.model for job in DEMO_JOBS if job.spec.kind == JobKind.txt2img} >= {
        "shapes",
        "tiny-sdxl",
    }


async def test_gallery_shows_inputs_previews_and_outputs(tmp_path: Path, tiny_models: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", builtin_models_dir=tiny_models)
    chosen = tuple(
        job for job in DEMO_MODE_JOBS if job.spec.kind in (JobKind.erase, JobKind.controlnet, JobKind.upscale)
    )[:3]
    assert {j.spec.kind for j in chosen} == {JobKind.erase, JobKind.controlnet, JobKind.upscale}
    index = await run_demo(settings, tmp_path / "out", chosen)
    page = index.read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert all((index.parent / s).is_file() for s in sources)
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert captions.count("mask") == 1 and "hand drawing" in captions
    assert any(c.startswith("control 1") for c in captions)  # the preprocessed scribble
    assert sum(c.startswith("output") for c in captions) == 3
    assert "Postprocess upscaler: Lanczos" in page and "ControlNet 0" in page


@pytest.mark.slow
async def test_the_whole_demo_runs(tmp_path: Path, tiny_models: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", builtin_models_dir=tiny_models)
    index = await run_demo(settings, tmp_path / "out")
    assert index.read_text(encoding="utf-8").count('class="card"') == len(DEMO_JOBS)
