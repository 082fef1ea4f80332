"""50 users × 2 /imagine within a second through the Discord double: all acknowledged in time, all
delivered, in fair order."""

from __future__ import annotations

import asyncio
from typing import Any

from pipelines.engine import Engine
from pipelines.events import Started
from tests.cogs.conftest import wait_job_message
from tests.discord_double import DiscordDouble, Guild


async def test_fifty_users_twice_each(double: DiscordDouble, bot: Any, engine: Engine, guild: Guild) -> None:
    users = [double.add_user(f"user{i}", guild) for i in range(50)]
    engine.hub.maxsize = 100_000  # this test reads every event; the bot never needs old ones
    events = engine.hub.subscribe(None, previews=False)
    order: list[int] = []

    async def record_starts() -> None:
        while True:
            event = await events.get()
            if isinstance(event, Started):
                order.append(event.job_id)

    recorder = asyncio.create_task(record_starts())
    loop = asyncio.get_running_loop()
    begin = loop.time()
    options = {"prompt": "a red circle", "steps": 2}
    firsts = await asyncio.gather(*(double.slash(u, guild, None, "imagine", options=options) for u in users))
    seconds = await asyncio.gather(*(double.slash(u, guild, None, "imagine", options=options) for u in users))
    assert loop.time() - begin < 1.5  # all 100 dispatched within about a second
    records = [*firsts, *seconds]
    acks = [(await record.response()).at for record in records]
    assert max(acks) < 3.0, sorted(acks)[-5:]
    messages = await asyncio.gather(*(wait_job_message(double, record, timeout=240) for record in records))
    assert all(message.attachments for message in messages)
    recorder.cancel()
    assert len(order) == 100
    jobs_of = {}
    for record, message in zip(records, messages, strict=True):
        job_id = int(message.embeds[0]["footer"]["text"].split()[1])
        jobs_of.setdefault(record.user.id, []).append(job_id)
    first_jobs = {jobs[0] for jobs in jobs_of.values()}
    # fair: every user's first job started before any user's second one
    assert set(order[:50]) == first_jobs, order
    double.assert_clean()
