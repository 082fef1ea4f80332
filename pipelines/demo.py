"""The demo: one job per mode and model family through the real engine, then ``out/index.html``."""

from __future__ import annotations

import html
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.demo_jobs import DEMO_JOBS, DemoJob
from pipelines.engine import Engine, JobResult
from pipelines.settings import Settings

__all__ = ["DEMO_JOBS", "DemoJob", "render_gallery", "run_demo"]

log = logging.getLogger(__name__)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dreamcord demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; background: #1e1f22; color: #dbdee1; }}
.card {{ display: flex; gap: 1.5rem; margin-bottom: 2rem; padding: 1rem; background: #2b2d31;
         border-radius: 8px; }}
.card img {{ width: 192px; height: 192px; image-rendering: pixelated; background: #000; }}
figure {{ display: inline-block; margin: 0 0.5rem 0 0; }}
figcaption {{ font-size: 0.8rem; color: #949ba4; }}
pre {{ white-space: pre-wrap; font-size: 0.85rem; }}
</style></head><body>
<h1>dreamcord demo</h1>
<p>Each image was generated through the engine (queue row, worker thread, content-addressed store) and
carries its webui parameters in the PNG. Regenerate with <code>scripts/demo.sh</code>.</p>
{cards}
</body></html>
"""

_CARD = """<div class="card"><div>{images}</div><div><h2>{title}</h2>
<p>job {job_id} · {seconds:.2f} s{notes}</p><pre>{parameters}</pre></div></div>"""


@dataclass
class GalleryEntry:
    """One card: the job's title and result, and (caption, file name) pairs for inputs and outputs."""

    title: str
    result: JobResult
    figures: list[tuple[str, str]] = field(default_factory=list)


def _figure(caption: str, name: str) -> str:
    return (
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_gallery(entries: list[GalleryEntry]) -> str:
    """The gallery page for ``entries`` (file names relative to the page)."""
    cards = []
    for entry in entries:
        result = entry.result
        notes = "".join(f" · {html.escape(n)}" for n in result.notes)
        cards.append(
            _CARD.format(
                images="".join(_figure(c, n) for c, n in entry.figures),
                title=html.escape(entry.title),
                job_id=result.job_id,
                seconds=result.seconds,
                notes=notes,
                parameters=html.escape(result.images[0].parameters),
            )
        )
    return _PAGE.format(cards="\n".join(cards))


async def _run_one(engine: Engine, job: DemoJob, images_dir: Path) -> GalleryEntry:
    inputs, shown = job.inputs()
    result = await engine.generate(job.spec, inputs=inputs)
    entry = GalleryEntry(job.title, result)
    for index, (caption, data) in enumerate(shown):
        name = f"job{result.job_id}-input{index}.png"
        (images_dir / name).write_bytes(data)
        entry.figures.append((caption, f"images/{name}"))
    for index, preview in enumerate(result.previews):
        name = f"job{result.job_id}-preview{index}.png"
        shutil.copyfile(preview.path, images_dir / name)
        entry.figures.append((preview.label, f"images/{name}"))
    for image in result.images:
        name = f"job{result.job_id}-{image.index}.png"
        shutil.copyfile(image.path, images_dir / name)
        entry.figures.append((f"output, seed {image.seed}, {image.width}×{image.height}", f"images/{name}"))
    return entry


async def run_demo(settings: Settings, out: Path, jobs: tuple[DemoJob, ...] = DEMO_JOBS) -> Path:
    """Run every demo job and write ``out/index.html``; returns its path."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries: list[GalleryEntry] = []
    async with Engine(settings) as engine:
        for job in jobs:
            entry = await _run_one(engine, job, images_dir)
            entries.append(entry)
            log.info("demo: %s -> job %s in %.2f s", job.title, entry.result.job_id, entry.result.seconds)
    index = out / "index.html"
    index.write_text(render_gallery(entries), encoding="utf-8")
    return index
