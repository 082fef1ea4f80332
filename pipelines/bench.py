"""``dreamcord bench``: what the engine costs on top of the bare diffusers call, measured side by side.

For each size, one txt2img job through the engine (job rows, worker thread, PNG encoding with webui
parameters, content-addressed store) is timed against the bare pipeline call for the same spec on the
same already-loaded pipeline, alternating the order of the two (ABBA) so that machine noise hits both
alike. Reported as the median of the per-pair ratios (engine / bare); the goal is <= 1.03.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.samplers import make_scheduler
from pipelines.settings import Settings
from pipelines.text_to_image import generators_for

__all__ = ["run_bench", "scratch_settings"]


def _bare_call(engine: Engine, spec: JobSpec) -> float:
    """Time the plain diffusers call (the pipeline is loaded and the scheduler set beforehand)."""
    model = engine.cache.get(spec.model)
    pipe = model.pipeline(model.base_class_name)
    pipe.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    started = time.perf_counter()
    pipe(
        prompt=[spec.prompt] * spec.batch,
        negative_prompt=[spec.negative_prompt] * spec.batch,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.cfg,
        generator=generators_for(spec),
        output_type="pil",
    )
    return time.perf_counter() - started


async def _measure(engine: Engine, spec: JobSpec, repeats: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    executor = engine.worker.thread
    await engine.generate(spec)  # warm-up: load and cache the model, first-call allocations
    await loop.run_in_executor(executor, _bare_call, engine, engine.prepare(spec))
    ratios, ours, bare = [], [], []
    for i in range(repeats):
        # Alternate which goes first (ABBA), so drift in the machine's speed hits both alike.
        for which in ("engine", "bare") if i % 2 == 0 else ("bare", "engine"):
            if which == "engine":
                started = time.perf_counter()
                await engine.generate(spec)
                ours.append(time.perf_counter() - started)
            else:
                bare.append(await loop.run_in_executor(executor, _bare_call, engine, engine.prepare(spec)))
        ratios.append(ours[-1] / bare[-1])
    return {
        "engine_s_median": round(statistics.median(ours), 4),
        "bare_s_median": round(statistics.median(bare), 4),
        "ratio_median": round(statistics.median(ratios), 4),
    }


def scratch_settings(settings: Settings, data_dir: Path) -> Settings:
    """The settings with a scratch database and store; the built-in models stay where they are built."""
    return settings.model_copy(
        update={"data_dir": data_dir, "database_url": None, "builtin_models_dir": settings.tiny_models_dir}
    )


async def run_bench(
    settings: Settings, *, sizes: list[int], repeats: int = 5, model: str = "tiny-sd15", steps: int = 20
) -> dict[str, Any]:
    """Engine overhead per size, as a JSON-ready dict (a scratch database and store are used)."""
    with TemporaryDirectory(prefix="dreamcord-bench-") as scratch:
        bench_settings = scratch_settings(settings, Path(scratch))
        results: dict[str, Any] = {}
        async with Engine(bench_settings) as engine:
            for size in sizes:
                spec = JobSpec(
                    prompt="a red circle on a blue background",
                    model=model,
                    width=size,
                    height=size,
                    steps=steps,
                    seed=1,
                )
                results[f"{size}x{size}"] = await _measure(engine, spec, repeats)
    return {
        "benchmark": "engine_overhead",
        "model": model,
        "steps": steps,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "goal_ratio_max": 1.03,
        "sizes": results,
    }
