"""Shows one job in Discord: the queued message, throttled progress edits with previews, the result.

The first message is the interaction's follow-up; it is edited through the interaction's webhook while
the token lives (15 minutes). A result that comes later is posted to the channel instead, so nothing is
lost when a long queue outlives the token.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from typing import TYPE_CHECKING

import discord

from cogs.job_buttons import result_view
from pipelines.delivery import encode_for_upload, grid
from pipelines.events import Cancelled, Failed, Finished, JobResult, Progress, Queued, Started

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = ["EDIT_INTERVAL_S", "TOKEN_LIFETIME_S", "follow_job", "queued_text", "result_embed"]

log = logging.getLogger(__name__)

EDIT_INTERVAL_S = 1.5  # at most one progress edit this often
TOKEN_LIFETIME_S = 14 * 60  # an interaction token lasts 15 minutes; stop using it a little before


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


class _Message:
    """The job's message: edited through the interaction webhook while the token lives, else the channel."""

    def __init__(self, interaction: discord.Interaction, message: discord.WebhookMessage) -> None:
        self.interaction = interaction
        self.message = message
        self.started = time.monotonic()

    @property
    def token_alive(self) -> bool:
        return time.monotonic() - self.started < TOKEN_LIFETIME_S

    async def edit(self, **kwargs: object) -> None:
        if not self.token_alive:
            return  # progress is not worth a channel message; the result will be posted
        try:
            await self.message.edit(**kwargs)  # type: ignore[arg-type]
        except discord.HTTPException as exc:
            log.info("could not edit job message: %s", exc)

    async def extra(self, files: list[discord.File]) -> None:
        """Another message of result files (the upload limit split them)."""
        if self.token_alive:
            await self.interaction.followup.send(files=files)
        elif isinstance(self.interaction.channel, discord.abc.Messageable):
            await self.interaction.channel.send(files=files)

    async def final(self, **kwargs: object) -> None:
        """The result: an edit of the message, or a channel message when the token is gone or refused."""
        if self.token_alive:
            try:
                await self.message.edit(**kwargs)  # type: ignore[arg-type]
                return
            except discord.NotFound:
                pass
        channel = self.interaction.channel
        if isinstance(channel, discord.abc.Messageable):
            files = kwargs.pop("attachments", None) or []
            for file in files:  # type: ignore[attr-defined]
                file.reset()
            if kwargs.get("view") is None:
                kwargs.pop("view", None)
            content = f"{self.interaction.user.mention} " + str(kwargs.pop("content", "") or "")
            await channel.send(content=content.strip(), files=files, **kwargs)  # type: ignore[call-overload]


async def follow_job(
    engine: Engine,
    interaction: discord.Interaction,
    message: discord.WebhookMessage,
    job_id: int,
    notes: list[str],
    *,
    spoiler: bool = False,
) -> None:
    """Follow the job's events to its end, editing ``message`` (never raises: errors are logged).

    ``spoiler``: images (previews too) go behind Discord's spoiler cover (the server's NSFW policy).
    """
    target = _Message(interaction, message)
    last_edit = 0.0
    try:
        async for event in engine.events(job_id):
            now = time.monotonic()
            if isinstance(event, Queued) and now - last_edit >= EDIT_INTERVAL_S:
                await target.edit(content=queued_text(job_id, event.position, event.eta_s))
                last_edit = now
            elif isinstance(event, Started):
                shared = (
                    f" (sharing the GPU with {event.batch_jobs - 1} other job(s))"
                    if event.batch_jobs > 1
                    else ""
                )
                await target.edit(content=f"Job {job_id} is starting{shared}…")
                last_edit = now
            elif isinstance(event, Progress) and (now - last_edit >= EDIT_INTERVAL_S):
                text = (
                    f"Job {job_id}: `{_bar(event.step, event.total)}` step {event.step}/{event.total}, "
                    f"about {_duration(event.eta_s)} left"
                )
                extra: dict[str, object] = {}
                if event.preview is not None:
                    preview = discord.File(io.BytesIO(event.preview), filename="preview.png", spoiler=spoiler)
                    extra["attachments"] = [preview]
                await target.edit(content=text, **extra)
                last_edit = now
            elif isinstance(event, Finished):
                result = JobResult(
                    event.result.job_id,
                    event.result.spec,
                    event.result.images,
                    event.result.seconds,
                    notes,
                    event.result.previews,
                )
                limit = int(interaction.filesize_limit or 10 * 2**20)
                messages, note = await asyncio.to_thread(
                    _result_files, result, limit, spoiler
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
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("following job %d failed", job_id)
