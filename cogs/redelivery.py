"""After a restart, post the outcome of every Discord job the previous bot process never delivered.

A bot killed mid-job (SIGKILL, a crash, a power cut) loses its interactions and the tasks following
their jobs; :class:`~pipelines.engine.Engine` with ``recover=True`` puts the jobs themselves back in the
queue, and this cog makes sure each one's outcome still reaches its user, exactly once:

- Which jobs: those that came from Discord (``channel_id`` set), were created before this bot loaded
  its cogs (newer ones are followed by :class:`cogs.generate.Generate` as usual) and were never marked
  delivered (``jobs.delivered_at``; the presenter marks a job once Discord accepted its outcome).
- When: once, at the first ``on_ready`` (channels are cached by then); later reconnects do nothing.
- Where: the job's channel, with the owner's mention, the result embed and buttons — the same code as
  the live path (:func:`cogs.presenter.deliver_job`); there is no progress, the interaction is gone.
- Age: jobs still queued or running are always followed (the worker runs them now, their result is
  fresh). A finished job whose outcome is owed for longer than ``window`` (24 h by default; the bot
  was down all that time) is not posted any more: it is only marked, so such jobs do not pile up.
- A channel that is gone or closed to the bot (404/403): the job is marked and given up, with a log
  line. Other errors leave it owed, to be tried at the next start.

A crash in the few milliseconds between Discord accepting the message and the mark can post one
outcome twice; nothing else does.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from cogs.presenter import DEFAULT_UPLOAD_LIMIT, ChannelTarget, deliver_job, needs_spoiler
from pipelines.jobs import JobSpec
from storage import jobs as job_rows
from storage.tables import Job, utcnow

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = ["REDELIVERY_WINDOW", "Redelivery"]

log = logging.getLogger(__name__)

REDELIVERY_WINDOW = timedelta(hours=24)


class Redelivery(commands.Cog):
    """Posts what a previous bot process owed its users (see the module docstring).

    Args:
        window: How long after it finished an undelivered outcome is still posted.
    """

    def __init__(self, bot: commands.Bot, engine: Engine, *, window: timedelta = REDELIVERY_WINDOW) -> None:
        self.bot = bot
        self.engine = engine
        self.window = window
        self.loaded_at = utcnow()
        self.started = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def cog_load(self) -> None:
        self.loaded_at = utcnow()  # before the gateway connects: no job of this process is older

    async def cog_unload(self) -> None:
        for task in self._tasks:
            task.cancel()

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        if self.started:
            return
        self.started = True
        await self.redeliver()

    async def redeliver(self) -> list[int]:
        """Start following every owed job; returns their ids (stale ones are only marked)."""
        async with self.engine.db.sessions() as session:
            owed = await job_rows.list_undelivered(session, created_before=self.loaded_at)
        oldest = utcnow() - self.window
        stale = [job.id for job in owed if job.status.finished and _ended_at(job) < oldest]
        if stale:
            await self.engine.mark_delivered(*stale)
            log.warning("not posting %d outcome(s) owed over %s: jobs %s", len(stale), self.window, stale)
        followed = [job for job in owed if job.id not in stale]
        if followed:
            ids = [job.id for job in followed]
            log.info("posting the outcome of %d job(s) a previous run owed: %s", len(ids), ids)
        for job in followed:
            task = asyncio.create_task(self._deliver(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return [job.id for job in followed]

    async def _deliver(self, job: Job) -> None:
        try:
            channel = self.bot.get_channel(job.channel_id or 0) or await self.bot.fetch_channel(
                job.channel_id or 0
            )
            if not isinstance(channel, discord.abc.Messageable):  # a category or forum: nowhere to post
                raise _Nowhere("it cannot take messages")
            spec = JobSpec.from_dict(job.spec)
            spoiler = await needs_spoiler(self.engine, job.guild_id, channel, spec)
            guild = getattr(channel, "guild", None)
            limit = int(getattr(guild, "filesize_limit", 0) or DEFAULT_UPLOAD_LIMIT)
            target = ChannelTarget(channel, job.user_id, limit)
            await deliver_job(self.engine, target, job.id, spoiler=spoiler)
        except (discord.NotFound, discord.Forbidden, _Nowhere) as exc:
            log.warning("job %d: cannot post in channel %s (%s); given up", job.id, job.channel_id, exc)
            await self.engine.mark_delivered(job.id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("redelivering job %d failed; it stays owed until the next start", job.id)


class _Nowhere(Exception):
    """The job's channel cannot take the message."""


def _ended_at(job: Job) -> datetime:
    return job.finished_at or job.created_at
