"""``dreamcord bench``'s queue figures: batching speed-up, event-loop lag, and 1,000 queued jobs.

- ``batching_speedup``: 8 compatible jobs from 8 users, run batched (one pipeline call) and one by one
  (a batch budget of one image), in alternating order, on the same loaded model; the ratio of the
  medians (one by one / batched). Goal >= 2.0 at 64×64.
- ``loop_lag_p99_ms``: while those jobs run, a task sleeping 10 ms on the event loop records how late
  it wakes; the 99th percentile. Goal <= 50 ms.
- ``queue_1000``: 1,000 jobs from 100 users submitted (checked, resolved, written, indexed), then all
  scheduled into batches without running them: seconds for each and the peak Python memory.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import tracemalloc
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from pipelines.bench import scratch_settings
from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.settings import Settings

__all__ = ["run_queue_bench"]

PROMPTS = [
    "a red circle",
    "a blue square",
    "a green star",
    "a yellow ring",
    "a cat",
    "a dog",
    "a tree",
    "a house",
]


def _specs(model: str, size: int, steps: int, round_: int) -> list[JobSpec]:
    return [
        JobSpec(
            prompt=prompt,
            model=model,
            width=size,
            height=size,
            steps=steps,
            seed=1000 * round_ + user,
            user_id=user + 1,
        )
        for user, prompt in enumerate(PROMPTS)
    ]


class _LagProbe:
    """Measures how late a 10 ms sleep on the event loop wakes up."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags_ms.append((time.perf_counter() - before - 0.01) * 1000)

    def __enter__(self) -> _LagProbe:
        self._task = asyncio.create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def p99(self) -> float:
        if len(self.lags_ms) < 2:
            return 0.0
        return statistics.quantiles(self.lags_ms, n=100)[98]


async def _run_all(engine: Engine, specs: list[JobSpec]) -> float:
    """Submit every spec before the worker may take any, then wait for all; returns the seconds."""
    engine.queue.pause()
    ids = [(await engine.submit(spec))[0].job_id for spec in specs]
    started = time.perf_counter()
    engine.queue.resume()
    for job_id in ids:
        await engine.wait(job_id)
    return time.perf_counter() - started


async def _batching(settings: Settings, model: str, size: int, steps: int, repeats: int) -> dict[str, Any]:
    batched_settings = settings.model_copy(
        update={"batch_max_images": 8, "batch_max_pixels": 8 * size * size}
    )
    solo_settings = settings.model_copy(update={"batch_max_images": 1})
    async with Engine(batched_settings) as batched, Engine(solo_settings) as solo:
        solo.cache = batched.cache  # one loaded model for both: only the batching differs
        solo.worker.executor.cache = batched.cache
        await _run_all(batched, _specs(model, size, steps, 0))  # warm-up: load, first-call allocations
        await _run_all(solo, _specs(model, size, steps, 0))
        times: dict[str, list[float]] = {"batched": [], "one_by_one": []}
        probe = _LagProbe()
        with probe:
            for i in range(repeats):
                order = ("batched", "one_by_one") if i % 2 == 0 else ("one_by_one", "batched")
                for which in order:
                    engine = batched if which == "batched" else solo
                    times[which].append(await _run_all(engine, _specs(model, size, steps, i + 1)))
    batched_s, solo_s = statistics.median(times["batched"]), statistics.median(times["one_by_one"])
    return {
        "batching_speedup": round(solo_s / batched_s, 3),
        "batched_s_median": round(batched_s, 3),
        "one_by_one_s_median": round(solo_s, 3),
        "jobs": len(PROMPTS),
        "size": f"{size}x{size}",
        "steps": steps,
        "loop_lag_p99_ms": round(probe.p99(), 2),
        "loop_lag_samples": len(probe.lags_ms),
    }


async def _submit_and_schedule(settings: Settings, model: str) -> dict[str, Any]:
    limits = {"queue_per_user": 10, "queue_max": 1000}
    async with Engine(settings.model_copy(update=limits), start_worker=False) as engine:
        specs = [
            JobSpec(
                prompt=f"a shape number {i}",
                model=model,
                width=64,
                height=64,
                steps=20,
                seed=i,
                user_id=i % 100 + 1,
            )
            for i in range(1000)
        ]
        started = time.perf_counter()
        for spec in specs:
            await engine.submit(spec)
        submit_s = time.perf_counter() - started
        started = time.perf_counter()
        known = sum(engine.status(entry.job_id) is not None for entry in engine.queue.scheduler.queued())
        positions_s = time.perf_counter() - started
        started = time.perf_counter()
        batches = 0
        while batch := engine.queue.scheduler.next_batch():
            batches += 1
            for entry in batch:
                engine.queue.scheduler.finish(entry.job_id)
        schedule_s = time.perf_counter() - started
    return {
        "jobs": len(specs),
        "users": 100,
        "submit_s": round(submit_s, 3),
        "submit_ms_per_job": round(submit_s * 1000 / len(specs), 2),
        "positions_s": round(positions_s, 3),
        "positions_known": known,
        "schedule_s": round(schedule_s, 3),
        "batches": batches,
    }


async def _queue_1000(settings: Settings, model: str) -> dict[str, Any]:
    """Timed in one run; the peak Python heap in a second one (tracemalloc slows Python down)."""
    timed = await _submit_and_schedule(
        settings.model_copy(update={"data_dir": settings.data_dir / "timed"}), model
    )
    tracemalloc.start()
    await _submit_and_schedule(settings.model_copy(update={"data_dir": settings.data_dir / "traced"}), model)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {**timed, "peak_python_mb": round(peak / 2**20, 1)}


async def run_queue_bench(
    settings: Settings, *, model: str = "tiny-sd15", size: int = 64, steps: int = 20, repeats: int = 5
) -> dict[str, Any]:
    """The queue's figures as a JSON-ready dict (scratch database and store; built-in models reused)."""
    with TemporaryDirectory(prefix="dreamcord-bench-") as scratch:
        bench_settings = scratch_settings(settings, Path(scratch))
        batching = await _batching(bench_settings, model, size, steps, repeats)
        queue = await _queue_1000(
            bench_settings.model_copy(update={"data_dir": Path(scratch) / "q1000"}), model
        )
    return {
        "model": model,
        "batching_speedup": batching.pop("batching_speedup"),
        "goal_batching_speedup_min": 2.0,
        "loop_lag_p99_ms": batching.pop("loop_lag_p99_ms"),
        "goal_loop_lag_p99_ms_max": 50,
        "batching": batching,
        "queue_1000": queue,
    }
