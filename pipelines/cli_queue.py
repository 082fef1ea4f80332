"""``dreamcord worker``, ``dreamcord queue`` and ``dreamcord cancel``: the queue from a terminal.

``dreamcord generate --no-wait`` queues a job and returns at once; ``dreamcord worker`` serves the
queue (the bot does the same in its own process): it takes over jobs a crash left behind, picks up jobs
other processes queue, and prints one JSON line per finished job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

__all__ = ["add_queue_commands", "run_cancel", "run_queue", "run_worker"]


def add_queue_commands(sub: Any, handlers: dict[str, Any]) -> None:
    p = sub.add_parser("worker", help="serve the job queue (without Discord): run queued jobs as they come")
    p.add_argument("--until-idle", action="store_true", help="exit once nothing is queued or running")
    p.set_defaults(func=handlers["worker"])

    p = sub.add_parser("queue", help="the queued and running jobs, in the order they will run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handlers["queue"])

    p = sub.add_parser("cancel", help="cancel a queued or running job (as the operator)")
    p.add_argument("job", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handlers["cancel"])


async def _serve(until_idle: bool) -> None:
    from pipelines.engine import Engine
    from pipelines.events import Cancelled, Failed, Finished
    from pipelines.settings import load_settings

    async with Engine(load_settings(), recover=True) as engine:
        events = engine.hub.subscribe(None)
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if until_idle and not len(engine.queue.scheduler) and not engine.queue.running():
                    await engine.queue.sync()
                    if not len(engine.queue.scheduler):
                        return
                continue
            line: dict[str, Any] | None = None
            if isinstance(event, Finished):
                line = {
                    "job": event.job_id,
                    "status": "done",
                    "images": [str(i.path) for i in event.result.images],
                }
            elif isinstance(event, Failed):
                line = {"job": event.job_id, "status": "failed", "error": event.reason}
            elif isinstance(event, Cancelled):
                line = {"job": event.job_id, "status": "cancelled"}
            if line is not None:
                print(json.dumps(line), flush=True)


def run_worker(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args.until_idle))
    return 0


async def _queue() -> list[dict[str, Any]]:
    from pipelines.events import EventHub
    from pipelines.queue import JobQueue
    from pipelines.settings import load_settings
    from storage import jobs as job_rows
    from storage.db import Database
    from storage.tables import JobStatus

    settings = load_settings()
    async with Database(settings.resolved_database_url) as db:
        queue = JobQueue(db, EventHub())
        await queue.sync()  # read only: indexes the queued jobs, changes nothing
        async with db.sessions() as session:
            running = await job_rows.list_jobs(session, status=JobStatus.RUNNING, limit=1000)
        rows = [{"job": job.id, "status": "running", "user": job.user_id} for job in reversed(running)]
        for position, entry in enumerate(queue.scheduler.order(), start=1):
            rows.append({"job": entry.job_id, "status": "queued", "position": position, "user": entry.user})
    return rows


def run_queue(args: argparse.Namespace) -> int:
    rows = asyncio.run(_queue())
    if args.json:
        print(json.dumps({"jobs": rows}))
    elif not rows:
        print("The queue is empty.")
    for row in rows if not args.json else []:
        where = f"#{row['position']}" if row["status"] == "queued" else "running"
        print(f"job {row['job']}  {where}  user {row['user'] if row['user'] is not None else '-'}")
    return 0


async def _cancel(job_id: int) -> bool:
    from pipelines.engine import Engine
    from pipelines.settings import load_settings

    async with Engine(load_settings(), start_worker=False) as engine:
        return await engine.cancel(job_id, None)


def run_cancel(args: argparse.Namespace) -> int:
    cancelled = asyncio.run(_cancel(args.job))
    if args.json:
        print(json.dumps({"job": args.job, "cancelled": cancelled}))
    else:
        print(f"Job {args.job} cancelled." if cancelled else f"Job {args.job} had already finished.")
    return 0
