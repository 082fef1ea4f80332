"""The load run (issue 8): /imagine jobs from many users through the Discord double, measured.

The real bot (``build_bot``, real discord.py) serves the double, sharing its event loop (so every figure
includes the double's own work); the engine runs on a scratch data dir with the tiny models, 64×64.
Arrivals (fixed by the seed): each user sends ``jobs / users`` commands over ``window_s`` seconds, every
user's first in the same second at the start and another in the same second at mid-window (two bursts),
the rest at random, at least ``GAP_S`` apart per user (a person re-typing a slash command). No user has
more than ``queue_per_user`` jobs at once; the per-server limit is raised, all users sharing one server.
Acks are timed by the double, as Discord would: from dispatching INTERACTION_CREATE to the callback POST.

Run: ``scripts/load.sh`` or ``.venv/bin/python -m tests.reliability.load_run --jobs 500 --users 50 [--json]``
(exit status 1 when a property fails).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import gc
import io
import json
import logging
import random
import re
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import discord
from PIL import Image
from sqlalchemy import func, select

from bot import build_bot
from pipelines.bench import scratch_settings
from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.queue import JobQueue, Submitted, Taken
from pipelines.settings import load_settings
from storage import tables
from tests.discord_double import DiscordDouble, InteractionRecord

__all__ = ["LoadPlan", "arrivals", "main", "run_load"]

log = logging.getLogger(__name__)

GAP_S = 1.0  # the least time between two commands of one person
ACK_DEADLINE_S = 3.0
JOB_TEXT = re.compile(r"^Job (\d+) is ")
RESULT_FOOTER = re.compile(r"^job (\d+) ·")
EPHEMERAL = 1 << 6
UNEXPECTED_START = "Something broke on our side"  # cogs.common.error_text for what is not a BotError


@dataclass(frozen=True)
class LoadPlan:
    """What to send and what to hold it to."""

    jobs: int = 500
    users: int = 50
    window_s: float = 60.0
    size: int = 64
    steps: int = 4
    queue_per_guild: int = 500
    seed: int = 8
    timeout_s: float = 900.0  # for every result, after the last command
    rss_growth_max_mb: float = 64.0  # from after the first fifth of the jobs to the end


def arrivals(plan: LoadPlan) -> list[tuple[float, int]]:
    """(seconds from the start, user index) of every command, in time order."""
    out: list[tuple[float, int]] = []
    for user in range(plan.users):
        rng = random.Random(plan.seed * 100_003 + user)
        count = plan.jobs // plan.users + (user < plan.jobs % plan.users)
        times = [rng.uniform(0, 0.99)][:count]
        if count >= 2:
            times.append(plan.window_s / 2 + rng.uniform(0, 0.99))
        while len(times) < count:
            tries = (rng.uniform(0, plan.window_s) for _ in range(200))
            free = next((t for t in tries if all(abs(t - s) >= GAP_S for s in times)), None)
            times.append(free if free is not None else max(times) + GAP_S)
        out += [(t, user) for t in times]
    return sorted(out)


def _quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Probe:
    """Loop lag (how late a 10 ms sleep wakes) and RSS, sampled on the loop under test."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self.rss_mb: list[float] = [_rss_mb()]

    async def run(self) -> None:
        last_rss = time.perf_counter()
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            self.lags_ms.append((now - before - 0.01) * 1000)
            if now - last_rss >= 0.25:
                self.rss_mb.append(_rss_mb())
                last_rss = now


@dataclass
class _Fairness:
    """Records every arrival and every take of the queue, to check the fair order afterwards."""

    queue: JobQueue
    arrived: dict[int, tuple[int | None, int, int]] = field(default_factory=dict)  # job -> user, line, takes
    takes: list[list[tuple[int, int | None]]] = field(default_factory=list)

    def install(self) -> None:
        """Wrap submit and take (before the worker starts: it looks ``take`` up on every batch)."""
        queue, submit, take = self.queue, self.queue.submit, self.queue.take

        async def recording_submit(spec: JobSpec) -> Submitted:
            submitted = await submit(spec)  # no await from indexing to here: no take can interleave
            line = queue.scheduler.active_count(user=spec.user_id) if spec.user_id is not None else 1
            self.arrived[submitted.job_id] = (spec.user_id, line, len(self.takes))
            return submitted

        async def recording_take(loaded: Hashable | None = None) -> list[Taken]:
            batch = await take(loaded)
            self.takes.append([(t.entry.job_id, t.entry.user) for t in batch])
            return batch

        queue.submit = recording_submit  # type: ignore[method-assign]
        queue.take = recording_take  # type: ignore[method-assign]

    def check(self) -> tuple[list[str], int]:
        """Unfair overtakes, and how many overtakes the rejoin allowance excused.

        While job J waits, another user may start no more jobs than J's user had in line when J was sent
        (J included), plus one for each of that user's commands sent into an empty line meanwhile: a user
        whose line ran empty rejoins at the current round (the scheduler's rule), not behind it.
        """
        where = {job: (t, p) for t, batch in enumerate(self.takes) for p, (job, _) in enumerate(batch)}
        found, excused = [], 0
        for job, (user, line, takes_before) in self.arrived.items():
            if job not in where:
                continue  # never started: counted as lost
            t, p = where[job]
            started = Counter(u for batch in self.takes[takes_before:t] for _, u in batch)
            started.update(u for _, u in self.takes[t][:p])
            started.pop(user, None)
            rejoins = Counter(  # commands sent into an empty line during the wait (ids grow with time)
                u for j, (u, n, k) in self.arrived.items() if n == 1 and j > job and k <= t
            )
            for other, count in started.items():
                excused += line < count <= line + rejoins[other]
                if count > line + rejoins[other]:
                    found.append(f"job {job} ({line} in line) waited while user {other} started {count}")
        return found, excused


@dataclass
class _Sent:
    """One /imagine sent: by whom, what the double recorded, when its result was first seen."""

    user: int
    record: InteractionRecord
    delivered_at: float | None = None

    def job_id(self) -> int | None:
        """The id from the "Job N is ..." follow-up (None: no job was queued)."""
        for action in list(self.record.actions):
            if action.kind == "followup" and action.ok and (found := JOB_TEXT.match(_text(action))):
                return int(found[1])
        return None

    def private_answer(self) -> str | None:
        """The sentence sent privately instead of a job (a refusal, or an unexpected error)."""
        for action in list(self.record.actions):
            if action.kind == "followup" and action.ok and int(action.payload.get("flags") or 0) & EPHEMERAL:
                return _text(action)
        return None

    def outcome(self, results: dict[int, list[Any]]) -> str:
        """delivered, refused, errored (an unexpected error's sentence), failed, or pending."""
        job_id, answer = self.job_id(), self.private_answer()
        if job_id is not None and job_id in results:
            return "delivered"
        if answer is not None:
            return "errored" if answer.startswith(UNEXPECTED_START) else "refused"
        message = self.record.original
        return "failed" if message is not None and f"Job {job_id} failed" in message.content else "pending"


def _text(action: Any) -> str:
    return str(action.payload.get("content") or "")


def _results(double: DiscordDouble, channel_id: int) -> dict[int, list[Any]]:
    """Result messages (an embed and files) in the channel, by the job id in their footer."""
    out: dict[int, list[Any]] = {}
    for message in double.channel_messages(channel_id):
        if message.embeds and message.attachments:
            footer = str((message.embeds[0].get("footer") or {}).get("text") or "")
            if found := RESULT_FOOTER.match(footer):
                out.setdefault(int(found[1]), []).append(message)
    return out


async def _watch(double: DiscordDouble, channel_id: int, sent: list[_Sent], marks: dict[str, float]) -> None:
    """Stamp each job's delivery time; note the RSS once the first fifth of the jobs were delivered."""
    while True:
        results, now = _results(double, channel_id), time.monotonic()
        for item in sent:
            if item.delivered_at is None and item.job_id() in results:
                item.delivered_at = now
        done = sum(item.delivered_at is not None for item in sent)
        if "rss_early_mb" not in marks and done >= max(1.0, marks["early_after"]):
            marks["rss_early_mb"] = _rss_mb()
        await asyncio.sleep(0.2)


async def _send_all(
    double: DiscordDouble, guild: Any, users: list[Any], plan: LoadPlan, sent: list[_Sent]
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    by_user: dict[int, list[float]] = {}
    for at, user in arrivals(plan):
        by_user.setdefault(user, []).append(at)

    async def person(user: int, times: list[float]) -> None:
        for n, at in enumerate(times):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            options = {
                "prompt": f"a shape number {n} for user {user}",
                "width": plan.size,
                "height": plan.size,
                "steps": plan.steps,
            }
            record = await double.slash(users[user], guild, None, "imagine", options=options)
            sent.append(_Sent(user, record))

    await asyncio.gather(*(person(user, times) for user, times in by_user.items()))


async def _db_counts(engine: Engine) -> dict[str, int]:
    """What the database says: job rows, done ones, and done ones without exactly one image row."""
    job, image = tables.Job, tables.Image
    async with engine.db.sessions() as session:
        by_status = dict((await session.execute(select(job.status, func.count()).group_by(job.status))).all())
        done = set((await session.scalars(select(job.id).where(job.status == tables.JobStatus.DONE))).all())
        per_job = select(image.job_id, func.count()).group_by(image.job_id)
        images = dict((await session.execute(per_job)).all())
    return {
        "rows": sum(by_status.values()),
        "done": len(done),
        "done_without_one_image": sum(images.get(job_id, 0) != 1 for job_id in done),
    }


def _good_image(message: Any, size: int) -> bool:
    try:
        with Image.open(io.BytesIO(message.file_bytes(0))) as image:
            return image.size == (size, size)
    except Exception:
        return False


def _summary(
    plan: LoadPlan,
    sent: list[_Sent],
    results: dict[int, list[Any]],
    received: dict[int, float],
    fairness: _Fairness,
) -> dict[str, Any]:
    firsts = [item.record.callbacks[0] for item in sent if item.record.callbacks]
    acks = [action.at for action in firsts]
    to_bot = [(received[i.record.id] - i.record.dispatched_at) * 1e3 for i in sent if i.record.id in received]
    outcomes = Counter(item.outcome(results) for item in sent)
    latency = [i.delivered_at - i.record.dispatched_at for i in sent if i.delivered_at is not None]
    ours = {job for item in sent if (job := item.job_id()) is not None}
    unfair, excused = fairness.check()
    return {
        "submitted": len(sent),
        "acknowledged": sum(a.ok and a.at <= ACK_DEADLINE_S for a in firsts),
        "ack_p50_s": round(_quantile(acks, 50), 3),
        "ack_p99_s": round(_quantile(acks, 99), 3),
        "ack_max_s": round(max(acks, default=0.0), 3),
        "to_bot_p99_ms": round(_quantile(to_bot, 99), 1),
        "to_bot_max_ms": round(max(to_bot, default=0.0), 1),
        "delivered": outcomes["delivered"],
        "refused": outcomes["refused"],
        "lost": len(sent) - outcomes["delivered"] - outcomes["refused"],
        "lost_failed": outcomes["failed"],
        "lost_errored": outcomes["errored"],
        "duplicates": sum(len(messages) - 1 for messages in results.values()),
        "strangers": len(set(results) - ours),
        "bad_images": sum(not _good_image(results[job][0], plan.size) for job in ours if job in results),
        "result_p50_s": round(_quantile(latency, 50), 2),
        "result_p99_s": round(_quantile(latency, 99), 2),
        "result_max_s": round(max(latency, default=0.0), 2),
        "fairness_violations": len(unfair),
        "fairness_rejoin_excused": excused,
        "answers": dict(Counter(a for i in sent if (a := i.private_answer()) is not None)),
        "fairness_examples": unfair[:5],
    }


async def _drive(double: DiscordDouble, engine: Engine, plan: LoadPlan, probe: _Probe) -> dict[str, Any]:
    """The bot on the double: send every command, wait for every outcome, measure."""
    sent: list[_Sent] = []
    received: dict[int, float] = {}  # interaction id -> when the bot's on_interaction saw it
    marks = {"early_after": plan.jobs / 5}
    fairness = _Fairness(engine.queue)
    fairness.install()
    engine.worker.start()
    guild = double.add_guild("Load Guild")
    channel = guild.text_channel.id
    users = [double.add_user(f"user{i}", guild) for i in range(plan.users)]
    bot = build_bot(engine, guild_ready_timeout=0.05)

    async def on_interaction(interaction: discord.Interaction) -> None:
        received[interaction.id] = time.monotonic()

    bot.add_listener(on_interaction, "on_interaction")
    async with double.run_bot(bot) as started:
        await started.tree.sync()
        tasks = [asyncio.create_task(probe.run()), asyncio.create_task(_watch(double, channel, sent, marks))]
        began = time.monotonic()
        await _send_all(double, guild, users, plan, sent)
        deadline = time.monotonic() + plan.timeout_s
        while time.monotonic() < deadline:
            results = _results(double, channel)
            if all(item.outcome(results) != "pending" for item in sent):
                break
            await asyncio.sleep(0.2)
        wall = max((i.delivered_at or began for i in sent), default=began) - began
        await asyncio.sleep(0.5)  # a late duplicate would show up here
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        gc.collect()  # after the lag probe stopped: this full collection is ours, not the bot's
        rss_end = _rss_mb()
        figures = _summary(plan, sent, _results(double, channel), received, fairness)
    rss_early = marks.get("rss_early_mb", rss_end)
    return {
        **figures,
        "double_violations": len(double.violations),
        "rss_after_first_fifth_mb": round(rss_early, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_early, 1),
        "wall_s": round(wall, 1),
        "jobs_per_s": round(figures["delivered"] / wall, 2) if wall > 0 else 0.0,
        "double_violation_examples": double.violations[:5],
    }


async def run_load(plan: LoadPlan, *, tiny_models: Path, scratch: Path) -> dict[str, Any]:
    """Run the plan once; the figures and properties as a JSON-ready dict (``passed`` says it all)."""
    base = load_settings(builtin_models_dir=tiny_models, queue_per_guild=plan.queue_per_guild)
    settings, probe = scratch_settings(base, scratch), _Probe()
    async with DiscordDouble() as double, Engine(settings, recover=True, start_worker=False) as engine:
        with double.install(discord):
            figures = await _drive(double, engine, plan, probe)
        db = await _db_counts(engine)
    report: dict[str, Any] = {
        "plan": asdict(plan),
        "jobs": plan.jobs,
        "users": plan.users,
        "queue_per_user": settings.queue_per_user,
        **figures,
        "loop_lag_p50_ms": round(_quantile(probe.lags_ms, 50), 1),
        "loop_lag_p99_ms": round(_quantile(probe.lags_ms, 99), 1),
        "loop_lag_max_ms": round(max(probe.lags_ms, default=0.0), 1),
        "peak_rss_mb": round(max(_peak_rss_mb(), *probe.rss_mb), 1),
        "db": db,
    }
    report["properties"] = _properties(plan, report)
    report["passed"] = all(report["properties"].values())
    return report


def _properties(plan: LoadPlan, r: dict[str, Any]) -> dict[str, bool]:
    most_per_user = -(-plan.jobs // plan.users)
    refusals_possible = most_per_user > r["queue_per_user"] or plan.jobs > plan.queue_per_guild
    return {
        "all_acknowledged_within_3s": r["acknowledged"] == r["submitted"] == plan.jobs,
        "none_lost": r["lost"] == 0,
        "no_duplicates": r["duplicates"] == 0 and r["strangers"] == 0,
        "images_ok": r["bad_images"] == 0,
        "refusals_expected": r["refused"] == 0 or refusals_possible,
        "fairness_held": r["fairness_violations"] == 0,
        "memory_bounded": r["rss_growth_mb"] <= plan.rss_growth_max_mb,
        "discord_rules_kept": r["double_violations"] == 0,
        "database_agrees": r["db"]["done"] == r["delivered"] == r["db"]["rows"] - r["lost_failed"]
        and r["db"]["done_without_one_image"] == 0,
    }


def _print(report: dict[str, Any]) -> None:
    print(f"load run: {report['plan']}")
    for key, value in report.items():
        if key not in ("plan", "properties", "passed") and value not in ({}, []):
            print(f"  {key:26} {value}")
    for name, ok in report["properties"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print("PASSED" if report["passed"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    """The command: run the plan, print the figures (or JSON), exit 1 when a property fails."""
    defaults = LoadPlan()
    parser = argparse.ArgumentParser(prog="load_run", description=__doc__.splitlines()[0])
    for name in ("jobs", "users", "window_s", "size", "steps", "queue_per_guild", "seed", "timeout_s"):
        value = getattr(defaults, name)
        parser.add_argument(
            "--" + name.removesuffix("_s").replace("_", "-"), dest=name, type=type(value), default=value
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = LoadPlan(**{k: v for k, v in vars(args).items() if k != "json"})
    from models.tiny import ensure_tiny_models
    from tests.conftest import TINY_CACHE

    tiny = ensure_tiny_models(TINY_CACHE)
    with TemporaryDirectory(prefix="dreamcord-load-") as scratch:
        report = asyncio.run(run_load(plan, tiny_models=tiny, scratch=Path(scratch)))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        _print(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
