"""Shows one job in Discord: the queued message, throttled progress edits with previews, the outcome.

The first message is the interaction's follow-up; it is edited through the interaction's webhook while
the token lives (15 minutes). An outcome that comes later, or that Discord refuses as an edit (unknown
webhook or interaction, an expired token, errors left after discord.py's own retries of 429 and 5xx), is
posted to the channel with the user's mention instead, so nothing is lost.

Once the outcome (result, failure or cancellation) has been sent, the job is marked delivered in the
database (``jobs.delivered_at``). A bot that died before that leaves the job unmarked, and the next one
posts it (:mod:`cogs.redelivery`, through the same :func:`deliver_job` with a :class:`ChannelTarget`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Protocol

import discord

from cogs.admin import guild_policy
from cogs.job_buttons import result_view
from pipelines.delivery import encode_for_upload, grid
from pipelines.events import (
    Cancelled,
    Failed,
    Finished,
    JobEvent,
    JobResult,
    Progress,
    Queued,
    Started,
)
from pipelines.jobs import JobSpec

if TYPE_CHECKING:
    from pipelines.engine import Engine

Messageable = discord.abc.Messageable

__all__ = [
    "DEFAULT_UPLOAD_LIMIT",
    "EDIT_INTERVAL_S",
    "TOKEN_LIFETIME_S",
    "ChannelTarget",
    "JobTarget",
    "deliver_job",
    "follow_job",
    "needs_spoiler",
    "queued_text",
    "result_embed",
]

log = logging.getLogger(__name__)

EDIT_INTERVAL_S = 1.5  # at most one progress edit this often
TOKEN_LIFETIME_S = 14 * 60  # an interaction token lasts 15 minutes; stop using it a little before
DEFAULT_UPLOAD_LIMIT = 10 * 2**20  # Discord's attachment limit without boosts


def queued_text(job_id: int, position: int, eta_s: float) -> str:
    ahead = "next in line" if position <= 1 else f"#{position} in the queue"
    return f"Job {job_id} is {ahead} (about {_duration(eta_s)})."


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min"


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = width * done // max(total, 1)
    return "█" * filled + "░" * (width - filled)


def result_embed(result: JobResult, note: str | None = None) -> discord.Embed:
    spec = result.spec
    embed = discord.Embed(description=(spec.prompt or spec.kind)[:4000])
    embed.add_field(name="Seed", value=str(spec.seed))
    embed.add_field(
        name="Size", value=f"{result.images[0].width}×{result.images[0].height}" if result.images else "-"
    )
    embed.add_field(name="Model", value=str(spec.model))
    embed.add_field(name="Steps", value=f"{spec.steps} · {spec.sampler} · CFG {spec.cfg:g}")
    notes = [*result.notes, *([note] if note else [])]
    if notes:
        embed.add_field(name="Note", value=" ".join(notes)[:1024], inline=False)
    embed.set_footer(text=f"job {result.job_id} · {result.seconds:.1f} s")
    return embed


def _result_files(
    result: JobResult, limit: int, spoiler: bool = False
) -> tuple[list[list[discord.File]], str | None]:
    """The files per message (a grid first when there are several images), and a note if re-encoded."""
    pngs = [image.path.read_bytes() for image in result.images]
    grid_file: list[tuple[str, bytes]] = []
    if len(pngs) > 1:
        from PIL import Image

        buffer = io.BytesIO()
        grid([Image.open(io.BytesIO(data)) for data in pngs]).save(buffer, format="PNG")
        if len(buffer.getvalue()) < limit // 2:  # the grid is a convenience: never at the singles' expense
            grid_file.append((f"dreamcord-{result.job_id}-grid.png", buffer.getvalue()))
    room = limit - sum(len(data) for _, data in grid_file)
    delivery = encode_for_upload(
        pngs, room, stems=[f"dreamcord-{result.job_id}-{i + 1}" for i in range(len(pngs))]
    )
    messages = [list(message) for message in delivery.messages] or [[]]
    messages[0] = grid_file + messages[0]
    for preview in result.previews:  # e.g. the preprocessed control map, when it fits beside the images
        data = preview.path.read_bytes()
        used = sum(len(d) for _, d in messages[-1])
        if len(messages[-1]) < 10 and used + len(data) <= limit:
            label = re.sub(r"[^a-z0-9]+", "-", preview.label.lower()).strip("-") or "preview"
            messages[-1].append((f"dreamcord-{result.job_id}-{label}.png", data))
    files = [
        [discord.File(io.BytesIO(data), filename=name, spoiler=spoiler) for name, data in message]
        for message in messages
    ]
    return files, delivery.note


class JobTarget(Protocol):
    """Where a job's messages go: :class:`_Message` (the interaction's) or :class:`ChannelTarget`."""

    @property
    def filesize_limit(self) -> int: ...

    async def edit(self, **kwargs: Any) -> None:
        """Show progress (best effort: never raises)."""

    async def final(self, **kwargs: Any) -> None:
        """Show the outcome; raises ``discord.HTTPException`` when it could be posted nowhere."""

    async def extra(self, files: list[discord.File]) -> None:
        """Another message of result files (the upload limit split them)."""


async def _post(channel: Messageable, user_id: int | None, **kwargs: Any) -> None:
    """The outcome as a channel message, with the owner's mention (message-edit kwargs accepted)."""
    files: list[discord.File] = kwargs.pop("attachments", None) or []
    for file in files:  # a refused edit may have read them
        file.reset()
    if kwargs.get("view") is None:
        kwargs.pop("view", None)
    mention = f"<@{user_id}> " if user_id else ""
    content = (mention + str(kwargs.pop("content", "") or "")).strip()
    await channel.send(content=content, files=files, **kwargs)


class _Message:
    """The job's message: edited through the interaction webhook while the token lives, else the channel.

    ``message`` may be None (the queued message could not be sent): the outcome then goes to the channel.
    """

    def __init__(self, interaction: discord.Interaction, message: discord.WebhookMessage | None) -> None:
        self.interaction = interaction
        self.message = message
        self.started = time.monotonic()

    @property
    def token_alive(self) -> bool:
        return time.monotonic() - self.started < TOKEN_LIFETIME_S

    @property
    def filesize_limit(self) -> int:
        return int(self.interaction.filesize_limit or DEFAULT_UPLOAD_LIMIT)

    async def _channel(self) -> Messageable:
        channel = self.interaction.channel
        if isinstance(channel, Messageable):
            return channel
        fetched = await self.interaction.client.fetch_channel(self.interaction.channel_id or 0)
        if not isinstance(fetched, Messageable):
            raise TypeError(f"channel {self.interaction.channel_id} cannot take messages")
        return fetched

    async def edit(self, **kwargs: Any) -> None:
        if self.message is None or not self.token_alive:
            return  # progress is not worth a channel message; the outcome will be posted
        try:
            await self.message.edit(**kwargs)
        except discord.HTTPException as exc:
            log.info("could not edit job message: %s", exc)

    async def extra(self, files: list[discord.File]) -> None:
        if self.token_alive:
            try:
                await self.interaction.followup.send(files=files)
                return
            except discord.HTTPException as exc:
                log.warning("could not send more result files as a follow-up (%s); posting them", exc)
            for file in files:
                file.reset()
        await (await self._channel()).send(files=files)

    async def final(self, **kwargs: Any) -> None:
        """An edit of the message; a channel message when the token is gone or Discord refuses the edit."""
        if self.message is not None and self.token_alive:
            try:
                await self.message.edit(**kwargs)
                return
            except discord.HTTPException as exc:
                log.warning("could not edit the job message (%s); posting the outcome to the channel", exc)
        await _post(await self._channel(), self.interaction.user.id, **kwargs)


class ChannelTarget:
    """A job followed without its interaction (after a restart): no progress, the outcome posted in
    ``channel`` with ``user_id``'s mention."""

    def __init__(self, channel: Messageable, user_id: int | None, filesize_limit: int) -> None:
        self.channel = channel
        self.user_id = user_id
        self.filesize_limit = filesize_limit

    async def edit(self, **kwargs: Any) -> None:
        return None

    async def extra(self, files: list[discord.File]) -> None:
        await self.channel.send(files=files)

    async def final(self, **kwargs: Any) -> None:
        await _post(self.channel, self.user_id, **kwargs)


async def needs_spoiler(engine: Engine, guild_id: int | None, channel: object, spec: JobSpec) -> bool:
    """Whether the job's images go behind a spoiler cover: the server's NSFW policy says "spoiler", the
    prompt matches its NSFW words and the channel is not age-restricted."""
    age_restricted = bool(getattr(channel, "is_nsfw", lambda: False)())
    policy = await guild_policy(engine, guild_id, getattr(channel, "id", None))
    return not age_restricted and policy.nsfw == "spoiler" and policy.is_nsfw(spec)


async def _show_progress(
    target: JobTarget, job_id: int, event: JobEvent, last_edit: float, spoiler: bool
) -> float:
    """Edit the message for a non-final event (throttled); returns the time of the last edit."""
    now = time.monotonic()
    if isinstance(event, Queued) and now - last_edit >= EDIT_INTERVAL_S:
        await target.edit(content=queued_text(job_id, event.position, event.eta_s))
        return now
    if isinstance(event, Started):
        others = event.batch_jobs - 1
        shared = f" (sharing the GPU with {others} other job(s))" if others > 0 else ""
        await target.edit(content=f"Job {job_id} is starting{shared}…")
        return now
    if isinstance(event, Progress) and (now - last_edit >= EDIT_INTERVAL_S):
        text = (
            f"Job {job_id}: `{_bar(event.step, event.total)}` step {event.step}/{event.total}, "
            f"about {_duration(event.eta_s)} left"
        )
        extra: dict[str, object] = {}
        if event.preview is not None:
            preview = discord.File(io.BytesIO(event.preview), filename="preview.png", spoiler=spoiler)
            extra["attachments"] = [preview]
        await target.edit(content=text, **extra)
        return now
    return last_edit


async def _show_outcome(
    target: JobTarget, job_id: int, event: JobEvent, notes: list[str], spoiler: bool
) -> None:
    """Post the final event: the result with its embed and buttons, or the failure / cancellation."""
    if isinstance(event, Finished):
        result = JobResult(
            event.result.job_id,
            event.result.spec,
            event.result.images,
            event.result.seconds,
            notes,
            event.result.previews,
        )
        messages, note = await asyncio.to_thread(
            _result_files, result, target.filesize_limit, spoiler
        )  # encoding is CPU work
        await target.final(
            content="",
            embed=result_embed(result, note),
            attachments=messages[0],
            view=result_view(job_id, len(result.images)),
        )
        for files in messages[1:]:  # what did not fit in one upload
            await target.extra(files)
    elif isinstance(event, Failed):
        await target.final(content=f"Job {job_id} failed: {event.reason}", view=None, attachments=[])
    elif isinstance(event, Cancelled):
        await target.final(content=f"Job {job_id} was cancelled.", view=None, attachments=[])


async def deliver_job(
    engine: Engine, target: JobTarget, job_id: int, notes: list[str] | None = None, *, spoiler: bool = False
) -> None:
    """Follow the job's events to its end through ``target``, then mark it delivered.

    A job that has already ended gets its outcome at once (rebuilt from the database). The job is marked
    delivered only after Discord accepted the outcome; if sending fails this raises and the job stays
    owed, to be posted by the next bot start. A crash in the few milliseconds between the send and the
    mark therefore repeats the message after the restart — at least once, and once in all but that case.
    """
    last_edit = 0.0
    async with aclosing(engine.events(job_id)) as events:
        async for event in events:
            if event.final:
                await _show_outcome(target, job_id, event, notes or [], spoiler)
                await engine.mark_delivered(job_id)
            else:
                last_edit = await _show_progress(target, job_id, event, last_edit, spoiler)


async def follow_job(
    engine: Engine,
    interaction: discord.Interaction,
    message: discord.WebhookMessage | None,
    job_id: int,
    notes: list[str],
    *,
    spoiler: bool = False,
) -> None:
    """Follow the job's events to its end, editing ``message`` (never raises: errors are logged).

    ``spoiler``: images (previews too) go behind Discord's spoiler cover (the server's NSFW policy).
    ``message`` None: the queued message could not be sent; the outcome is posted to the channel.
    """
    try:
        await deliver_job(engine, _Message(interaction, message), job_id, notes, spoiler=spoiler)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("delivering job %d failed; it stays owed until the bot's next start", job_id)
