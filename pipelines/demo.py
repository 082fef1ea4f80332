"""The demo: one job per mode and model family through the real engine, then ``out/index.html``."""

from __future__ import annotations

import html
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipelines.engine import Engine, JobResult
from pipelines.jobs import JobSpec
from pipelines.settings import Settings

__all__ = ["DEMO_JOBS", "DemoJob", "render_gallery", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoJob:
    title: str
    spec: JobSpec


_SHAPES_PROMPTS = (
    "a large red circle at the top left on a blue background",
    "a green square at the bottom right on a white background",
    "black background, large yellow star in the centre",
    "a purple ring on an orange background",
    "a white cross at the top on a green background",
    "a small blue triangle on a yellow background",
)

DEMO_JOBS: tuple[DemoJob, ...] = (
    *(
        DemoJob(
            f"txt2img · built-in shapes model · “{prompt}”",
            JobSpec(prompt=prompt, model="shapes", seed=10 + i, cfg=3.0, sampler="DPM++ 2M"),
        )
        for i, prompt in enumerate(_SHAPES_PROMPTS)
    ),
    DemoJob(
        "txt2img · tiny SD 1.5 (random weights: proves the plumbing, shows noise)",
        JobSpec(
            prompt="a red circle on a blue background", model="tiny-sd15", width=128, height=128, seed=1234
        ),
    ),
    DemoJob(
        "txt2img · tiny SD 1.5, batch of 2, Euler a",
        JobSpec(
            prompt="a green square",
            negative_prompt="blurry",
            model="tiny-sd15",
            width=64,
            height=64,
            sampler="Euler a",
            seed=7,
            batch=2,
        ),
    ),
    DemoJob(
        "txt2img · tiny SDXL",
        JobSpec(prompt="a yellow star, night sky", model="tiny-sdxl", width=128, height=128, seed=42),
    ),
)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dreamcord demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; background: #1e1f22; color: #dbdee1; }}
.card {{ display: flex; gap: 1.5rem; margin-bottom: 2rem; padding: 1rem; background: #2b2d31;
         border-radius: 8px; }}
.card img {{ width: 256px; height: 256px; image-rendering: pixelated; background: #000; }}
pre {{ white-space: pre-wrap; font-size: 0.85rem; }}
</style></head><body>
<h1>dreamcord demo</h1>
<p>Each image was generated through the engine (queue row, worker thread, content-addressed store) and
carries its webui parameters in the PNG. Regenerate with <code>scripts/demo.sh</code>.</p>
{cards}
</body></html>
"""

_CARD = """<div class="card"><div>{images}</div><div><h2>{title}</h2>
<p>job {job_id} · {seconds:.2f} s</p><pre>{parameters}</pre></div></div>"""


def render_gallery(entries: list[tuple[str, JobResult, list[str]]]) -> str:
    """HTML for ``(title, result, image file names relative to the page)`` entries."""
    cards = []
    for title, result, names in entries:
        imgs = "".join(f'<img src="{html.escape(n)}" alt="{html.escape(result.spec.prompt)}">' for n in names)
        cards.append(
            _CARD.format(
                images=imgs,
                title=html.escape(title),
                job_id=result.job_id,
                seconds=result.seconds,
                parameters=html.escape(result.images[0].parameters),
            )
        )
    return _PAGE.format(cards="\n".join(cards))


async def run_demo(settings: Settings, out: Path, jobs: tuple[DemoJob, ...] = DEMO_JOBS) -> Path:
    """Run every demo job and write ``out/index.html``; returns its path."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[str, JobResult, list[str]]] = []
    async with Engine(settings) as engine:
        for job in jobs:
            result = await engine.generate(job.spec)
            names = []
            for image in result.images:
                name = f"job{result.job_id}-{image.index}.png"
                shutil.copyfile(image.path, images_dir / name)
                names.append(f"images/{name}")
            entries.append((job.title, result, names))
            log.info("demo: %s -> job %s in %.2f s", job.title, result.job_id, result.seconds)
    index = out / "index.html"
    index.write_text(render_gallery(entries), encoding="utf-8")
    return index
