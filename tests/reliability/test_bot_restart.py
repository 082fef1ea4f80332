"""The bot SIGKILLed mid-job and started again: every job's outcome reaches Discord exactly once.

The bot runs in a subprocess (``bot_process.py``) against the Discord double in this process; jobs come
from three users through /imagine. Once one result is delivered and another job is running, the process
is killed; a new one recovers the queue and posts what the dead one still owed (``cogs.redelivery``).
Also here: outcomes owed too long are marked, not posted, and the migration that added
``jobs.delivered_at`` backfills the jobs that had already finished.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text, update

from bot import sync_commands
from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.settings import Settings
from storage import jobs as job_rows
from storage.db import Database, sqlite_url
from storage.tables import Job, utcnow
from tests.discord_double import DiscordDouble, Guild, StoredMessage, User
from tests.reliability.bot_process import bot_env, release, start_bot_process

#: (user, steps): the second job is slow (~2 s on the tiny model) so that it is running at the kill;
#: different step counts keep them from sharing a batch.
JOBS = [("alice", 4), ("bob", 50), ("carol", 6), ("alice", 8)]


OLD_JOB_ROW = (
    "INSERT INTO jobs (kind, status, spec, attempts, created_at, finished_at, channel_id) "
    "VALUES ('txt2img', :status, '{}', 0, '2026-01-01 00:00:00.000000', :finished, 5)"
)


def result_messages(double: DiscordDouble) -> dict[int, list[StoredMessage]]:
    """Job id -> every live message showing its result (interaction messages and channel posts)."""
    found: dict[int, list[StoredMessage]] = {}
    for message in double.messages.values():
        for embed in message.embeds:
            footer = str((embed.get("footer") or {}).get("text", ""))
            if not message.deleted and footer.startswith("job "):
                found.setdefault(int(footer.split()[1]), []).append(message)
    return found


def rows(db: Path) -> dict[int, dict[str, Any]]:
    with sqlite3.connect(db, timeout=15) as conn:
        conn.row_factory = sqlite3.Row
        found = {row["id"]: dict(row) for row in conn.execute("SELECT * FROM jobs")}
        for job in found.values():
            job["images"] = conn.execute(
                "SELECT count(*) FROM images WHERE job_id = ?", (job["id"],)
            ).fetchone()[0]
    conn.close()
    return found


async def wait_rows(db: Path, what: str, predicate: Any, timeout: float = 90) -> dict[int, dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            found = await asyncio.to_thread(rows, db) if db.exists() else {}
            if predicate(found):
                return found
            await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover - the timeout raises


def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()


async def test_sigkill_mid_job_then_restart_delivers_every_job_once(
    double: DiscordDouble, guild: Guild, tmp_path: Path, tiny_models: Path
) -> None:
    data = tmp_path / "data"
    db = data / "dreamcord.db"
    users = {name: double.add_user(name, guild) for name in ("alice", "bob", "carol")}
    settings = Settings(data_dir=data, builtin_models_dir=tiny_models, discord_token=double.token)
    await sync_commands(settings)  # the admin's `dreamcord sync-commands`, once
    env = bot_env(double.base_url, double.gateway_url, double.token, data, tiny_models)
    logs = tmp_path / "first.log", tmp_path / "second.log"
    # The second process only imports while the first one runs (held before it opens anything).
    starting = [
        asyncio.create_task(start_bot_process(env, logs[0])),
        asyncio.create_task(start_bot_process(env, logs[1], held=True)),
    ]
    try:
        first, second = await asyncio.gather(*starting)
        records = [
            await double.slash(
                users[name], guild, None, "imagine", options={"prompt": "a red circle", "steps": s}
            )
            for name, s in JOBS
        ]
        before = await wait_rows(
            db,
            "a delivered job and a running one",
            lambda r: (
                len(r) == len(JOBS)
                and any(j["delivered_at"] for j in r.values())
                and any(j["status"] == "running" for j in r.values())
            ),
        )
        first.kill()  # SIGKILL: no cleanup at all
        await first.wait()
        assert len(before) == len(JOBS) and all(r.ok for record in records for r in record.callbacks)
        delivered_before = {i for i, j in before.items() if j["delivered_at"]}
        killed = {i for i, j in before.items() if j["status"] == "running"}
        assert delivered_before and killed and not delivered_before & killed

        await release(second, logs[1])  # the restart: engine with recover=True, bot, redelivery
        after = await wait_rows(
            db, "every job delivered", lambda r: all(j["delivered_at"] for j in r.values())
        )
        late = await double.slash(
            users["carol"], guild, None, "imagine", options={"prompt": "late", "steps": 4}
        )
        final = await wait_rows(
            db, "the new job delivered", lambda r: len(r) == 5 and all(j["delivered_at"] for j in r.values())
        )
        await asyncio.sleep(0.5)  # a second copy of anything would show by now
        second.terminate()
        assert await asyncio.wait_for(second.wait(), 60) == 0  # SIGTERM: a clean stop
    finally:
        for task in starting:
            if task.done() and not task.cancelled() and task.exception() is None:
                _stop(task.result())
            else:
                task.cancel()

    owners = {job_id: job["user_id"] for job_id, job in final.items()}
    results = result_messages(double)
    assert {job_id: len(messages) for job_id, messages in results.items()} == dict.fromkeys(final, 1)
    for job_id, job in after.items():
        assert job["status"] == "done" and job["images"] == 1, job
        assert job["attempts"] == (2 if job_id in killed else 1), job
        if job_id in delivered_before:
            assert before[job_id]["delivered_at"] == job["delivered_at"]  # not posted again
    for job_id, (message,) in results.items():
        assert message.attachments and message.component(f"dc:reroll:{job_id}") is not None
        if job_id in delivered_before or job_id == max(final):
            assert message.interaction_id is not None  # the job's own message, edited
        else:  # posted by the new process: in the channel, for its owner
            assert message.interaction_id is None and message.content.startswith(f"<@{owners[job_id]}>")
    assert results[max(final)][0].interaction_id == late.id
    assert double.gateway.identifies == 2
    double.assert_clean()


OOM = "The model ran out of memory; try a smaller size."


async def _owed_job(
    engine: Engine, user: User, guild: Guild, channel_id: int | None, *, age: timedelta, failed: bool
) -> int:
    """A job from Discord (``channel_id``) created ``age`` ago, never delivered; failed then, or queued."""
    spec = engine.prepare(JobSpec(prompt="a red circle", width=64, height=64, steps=2, seed=1))
    async with engine.db.sessions.begin() as session:
        job = await job_rows.create_job(
            session,
            kind=spec.kind.value,
            spec=spec.to_dict(),
            user_id=user.id,
            guild_id=guild.id,
            channel_id=channel_id,
        )
        if failed:
            await job_rows.mark_failed(session, job.id, OOM)
        when = utcnow() - age
        finished = when if failed else None
        await session.execute(
            update(Job).where(Job.id == job.id).values(created_at=when, finished_at=finished)
        )
        return job.id


async def test_outcomes_owed_too_long_are_marked_not_posted(
    double: DiscordDouble, running_bot: Any, engine: Engine, guild: Guild, alice: User
) -> None:
    """Owed when the bot starts: a failure from an hour ago is posted, one from two days ago only marked
    (nobody waits for it any more), a job queued three days ago and never run is run and posted, and a
    CLI job (no channel) is left alone."""
    channel = guild.text_channel.id
    recent = await _owed_job(engine, alice, guild, channel, age=timedelta(hours=1), failed=True)
    stale = await _owed_job(engine, alice, guild, channel, age=timedelta(days=2), failed=True)
    waiting = await _owed_job(engine, alice, guild, channel, age=timedelta(days=3), failed=False)
    cli = await _owed_job(engine, alice, guild, None, age=timedelta(hours=1), failed=True)
    async with running_bot(engine):
        result = await double.wait_for_message(channel, lambda m: bool(m.attachments), timeout=60)
        await asyncio.sleep(0.3)
    posted = [m.content for m in double.channel_messages(channel)]
    assert sorted(posted) == sorted([f"<@{alice.id}> Job {recent} failed: {OOM}", f"<@{alice.id}>"])
    assert result.embeds[0]["footer"]["text"].startswith(f"job {waiting} ·")
    async with engine.db.sessions() as session:
        jobs = {i: await job_rows.get_job(session, i) for i in (recent, stale, waiting, cli)}
    delivered = {i: job.delivered_at for i, job in jobs.items() if job is not None}
    assert delivered[recent] and delivered[stale] and delivered[waiting] and delivered[cli] is None
    double.assert_clean()


async def test_migration_backfills_finished_jobs(tmp_path: Path) -> None:
    """Jobs finished before ``delivered_at`` existed count as delivered; unfinished ones are still owed."""
    async with Database(sqlite_url(tmp_path / "old.db"), migrate=False) as db:
        await db.upgrade("0001")
        async with db.engine.begin() as conn:
            for status, finished in (
                ("done", "2026-01-02 03:04:05.000000"),
                ("queued", None),
                ("running", None),
            ):
                await conn.execute(
                    text(OLD_JOB_ROW),
                    {"status": status, "finished": finished},
                )
        await db.upgrade("head")
        async with db.engine.connect() as conn:
            found = (await conn.execute(text("SELECT status, delivered_at FROM jobs ORDER BY id"))).all()
    assert [tuple(row) for row in found] == [
        ("done", "2026-01-02 03:04:05.000000"),
        ("queued", None),
        ("running", None),
    ]
