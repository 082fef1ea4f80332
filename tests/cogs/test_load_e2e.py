"""50 users × 2 /imagine within a second through the Discord double: all acknowledged in time, all
delivered, in fair order."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

import pytest

from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.queue import Submitted, Taken
from tests.cogs.conftest import wait_job_message
from tests.discord_double import DiscordDouble, Guild


async def test_fifty_users_twice_each(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [double.add_user(f"user{i}", guild) for i in range(50)]
    queue = engine.queue
    firsts: dict[int | None, int] = {}  # user -> their first job
    unfair: list[tuple[int, list[int]]] = []
    submit, take = queue.submit, queue.take

    async def recording_submit(spec: JobSpec) -> Submitted:
        submitted = await submit(spec)
        firsts.setdefault(spec.user_id, submitted.job_id)  # no await between: the worker cannot interleave
        return submitted

    async def checking_take(loaded: Hashable | None = None) -> list[Taken]:
        batch = await take(loaded)
        waiting = sorted(e.job_id for e in queue.scheduler.queued() if firsts.get(e.user) == e.job_id)
        for taken in batch:  # fair: nobody's second job starts while someone's first one waits
            if firsts.get(taken.entry.user) != taken.entry.job_id and waiting:
                unfair.append((taken.entry.job_id, waiting))
        return batch

    monkeypatch.setattr(queue, "submit", recording_submit)
    monkeypatch.setattr(queue, "take", checking_take)
    engine.worker._task.cancel()  # restart the worker loop so it calls the checking take
    engine.worker._task = None
    engine.worker.start()
    loop = asyncio.get_running_loop()
    begin = loop.time()
    options = {"prompt": "a red circle", "steps": 2}
    firsts_records = await asyncio.gather(
        *(double.slash(u, guild, None, "imagine", options=options) for u in users)
    )
    seconds = await asyncio.gather(*(double.slash(u, guild, None, "imagine", options=options) for u in users))
    assert loop.time() - begin < 1.5  # all 100 dispatched within about a second
    records = [*firsts_records, *seconds]
    acks = [(await record.response()).at for record in records]
    assert max(acks) < 3.0, sorted(acks)[-5:]
    messages = await asyncio.gather(*(wait_job_message(double, record, timeout=240) for record in records))
    assert all(message.attachments for message in messages)
    assert len(firsts) == 50 and not unfair, unfair[:5]
    double.assert_clean()
