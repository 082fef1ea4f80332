"""The queue benchmark runs end to end and reports every figure the issue asks for."""

from __future__ import annotations

from pipelines.bench_queue import run_queue_bench
from pipelines.settings import Settings


async def test_queue_bench_reports_batching_lag_and_1000_jobs(settings: Settings) -> None:
    report = await run_queue_bench(settings, steps=3, repeats=1)
    batching = report["batching"]
    ratio = batching["one_by_one_s_median"] / batching["batched_s_median"]
    assert abs(report["batching_speedup"] - ratio) < 0.01 * ratio  # the medians are rounded to ms
    assert report["batching_speedup"] > 1.0  # eight calls cost more than one, measured side by side
    assert batching["loop_lag_samples"] > 0 and report["loop_lag_p99_ms"] >= 0
    queue = report["queue_1000"]
    assert queue["jobs"] == 1000 and queue["positions_known"] == 1000
    assert queue["batches"] == 125  # 1,000 compatible one-image jobs in batches of 8
    assert queue["peak_python_mb"] > 0 and queue["submit_s"] > 0
