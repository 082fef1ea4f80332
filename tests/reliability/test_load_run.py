"""The load run's harness in the normal suite: a small run through the Discord double (24 jobs, 6 users),
holding it to the same properties, plus checks of its arrival pattern and of its fairness judge.
The full 500-job, 50-user run has its own command: scripts/load.sh."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tests.reliability.load_run import GAP_S, LoadPlan, _Fairness, arrivals, run_load

SMALL = LoadPlan(jobs=24, users=6, window_s=6.0, steps=2, timeout_s=120.0)


async def test_small_load_run_keeps_every_property(tiny_models: Path, tmp_path: Path) -> None:
    report = await run_load(SMALL, tiny_models=tiny_models, scratch=tmp_path)
    assert report["submitted"] == report["acknowledged"] == 24, report
    assert report["ack_max_s"] < 3.0
    assert report["delivered"] == 24 and report["lost"] == 0 and report["refused"] == 0, report
    assert report["duplicates"] == 0 and report["bad_images"] == 0
    assert report["fairness_violations"] == 0, report["fairness_examples"]
    assert report["double_violations"] == 0, report["double_violation_examples"]
    assert report["db"] == {"rows": 24, "done": 24, "done_without_one_image": 0}
    assert report["peak_rss_mb"] > 0 and report["loop_lag_max_ms"] >= report["loop_lag_p99_ms"] >= 0
    assert report["passed"], report["properties"]


def test_arrivals_have_two_bursts_and_a_human_pace() -> None:
    plan = LoadPlan(jobs=500, users=50, window_s=60.0)
    sent = arrivals(plan)
    assert len(sent) == 500 and set(Counter(user for _, user in sent).values()) == {10}
    for start in (0.0, plan.window_s / 2):  # every user once within the same second
        burst = [user for at, user in sent if start <= at < start + 1.0]
        assert sorted(burst) == list(range(50))
    for user in range(50):
        times = sorted(at for at, who in sent if who == user)
        assert all(b - a >= GAP_S for a, b in zip(times, times[1:], strict=False)), times
        assert times[-1] <= plan.window_s
    assert arrivals(plan) == sent  # the same plan, the same arrivals


def _judge(arrived: dict[int, tuple[int, int, int]], takes: list[list[tuple[int, int]]]) -> list[str]:
    fairness = _Fairness(queue=None)  # type: ignore[arg-type]  # only the records are judged
    fairness.arrived, fairness.takes = dict(arrived), [list(t) for t in takes]
    return fairness.check()[0]


def test_fairness_judge_flags_first_come_first_served() -> None:
    # user 1 sends four jobs (1-4, lines 1-4), then user 2 one (5), all before any take
    arrived: dict[int, Any] = {1: (1, 1, 0), 2: (1, 2, 0), 3: (1, 3, 0), 4: (1, 4, 0), 5: (2, 1, 0)}
    fifo = [[(1, 1)], [(2, 1)], [(3, 1)], [(4, 1)], [(5, 2)]]
    assert _judge(arrived, fifo) == ["job 5 (1 in line) waited while user 1 started 4"]
    fair = [[(1, 1)], [(5, 2)], [(2, 1)], [(3, 1)], [(4, 1)]]
    assert _judge(arrived, fair) == []
    batched = [[(1, 1), (2, 1), (5, 2)], [(3, 1), (4, 1)]]  # one batch: its order is the start order
    assert _judge(arrived, batched) == ["job 5 (1 in line) waited while user 1 started 2"]
