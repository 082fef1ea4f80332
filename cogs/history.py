"""``/history``, ``/show``, ``/pnginfo`` and ``/prompt explain``: looking back and looking inside."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs.admin import guild_policy
from cogs.common import answer, read_image_attachment
from cogs.job_buttons import result_view
from pipelines.followups import spec_from_parameters
from pipelines.jobs import JobSpec
from pipelines.pnginfo import read_info
from pipelines.prompt_chunks import explain
from pipelines.prompts import parse_attention
from storage import jobs as job_rows
from storage.errors import InvalidRequestError, NotFoundError
from storage.tables import JobStatus

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = ["History", "explain_text", "weighted_text"]

log = logging.getLogger(__name__)

PAGE = 10
#: Most prompt-editing steps /prompt explain lists (``[a|b]`` changes every step).
SCHEDULE_LINES = 12


def weighted_text(text: str) -> str:
    """A prompt's attention as the webui reads it: ``a (red:1.3) circle`` (nesting multiplied out)."""
    pieces = [
        " BREAK " if t == "BREAK" and w < 0 else (t if w == 1 else f"({t.strip()}:{w:.3g})")
        for t, w in parse_attention(text)
    ]
    return " ".join("".join(pieces).split()) or "(empty)"


def explain_text(prompt: str, steps: int) -> str:
    """The explain-prompt report as a few readable lines.

    Prompt editing (``[cat:dog:0.5]``) is applied before attention, as in the webui, so each scheduled text
    gets its own weights line.
    """
    report = explain(prompt, steps=steps)
    schedule = report["schedule"]
    if len(schedule) == 1:
        lines = [f"**Weights**: {weighted_text(schedule[0][1])}"]
    else:
        shown = schedule[:SCHEDULE_LINES]
        lines = [f"**Until step {until}**: {weighted_text(text)}" for until, text in shown]
        if len(schedule) > SCHEDULE_LINES:
            lines.append(f"… and {len(schedule) - SCHEDULE_LINES} more changes")
    lines += [f"{net['type']} `{net['name']}` at {net['weight']:g}" for net in report["networks"]]
    lines.append(f"{report['tokens']} tokens in {report['chunks']} chunk(s) of 75")
    return "\n".join(lines)


class RemixWithThese(discord.ui.View):
    """Under /pnginfo's answer: open the remix form with the image's prompt and settings."""

    def __init__(self, bot: commands.Bot, spec: JobSpec) -> None:
        super().__init__(timeout=15 * 60)
        self.bot, self.spec = bot, spec

    @discord.ui.button(label="Remix with these", style=discord.ButtonStyle.primary)
    async def remix(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        from cogs.generate import RemixModal

        generate: Any = self.bot.get_cog("Generate")
        await interaction.response.send_modal(RemixModal(generate, self.spec, None))


class History(commands.Cog):
    """Your past jobs, a job again, an image's parameters, a prompt explained."""

    prompt = app_commands.Group(name="prompt", description="Understand the webui prompt language.")

    def __init__(self, bot: commands.Bot, engine: Engine) -> None:
        self.bot = bot
        self.engine = engine

    @app_commands.command(name="history")
    @app_commands.choices(status=[app_commands.Choice(name=s.value, value=s.value) for s in JobStatus])
    async def history(
        self,
        interaction: discord.Interaction,
        page: app_commands.Range[int, 1, 1000] = 1,
        status: str | None = None,
    ) -> None:
        """Your jobs, newest first.

        Args:
            page: Which page (10 jobs each).
            status: Only jobs with this status.
        """
        async with self.engine.db.sessions() as session:
            jobs = await job_rows.list_jobs(
                session,
                user_id=interaction.user.id,
                status=JobStatus(status) if status else None,
                limit=PAGE,
                offset=(page - 1) * PAGE,
            )
            total = await job_rows.count_jobs(
                session, user_id=interaction.user.id, status=JobStatus(status) if status else None
            )
        pages = (total + PAGE - 1) // PAGE
        if not jobs:
            if total:
                text = f"There is no page {page}; these jobs fill {pages} page{'s' if pages != 1 else ''}."
            else:
                text = f"You have no {status} jobs." if status else "You have no jobs yet; try `/imagine`."
            await answer(interaction, text)
            return
        lines = [
            f"`{job.id}` {job.status.value} · {job.kind} · {str(job.spec.get('prompt', ''))[:60]!r}"
            for job in jobs
        ]
        await answer(
            interaction, "\n".join(lines) + f"\npage {page} of {pages} · `/show job:<id>` to see one"
        )

    @app_commands.command(name="show")
    async def show(self, interaction: discord.Interaction, job: int) -> None:
        """Post one of your finished jobs again, with its buttons.

        Args:
            job: The job number.
        """
        async with self.engine.db.sessions() as session:
            row = await job_rows.get_job(session, job)
            images = await job_rows.list_images(session, job)
        # Your own jobs anywhere; others' only in the server they were made in (never across DMs); either
        # under this channel's NSFW rule, as a new job would be.
        visible = row is not None and (
            row.user_id == interaction.user.id
            or (row.guild_id is not None and row.guild_id == interaction.guild_id)
        )
        if row is None or not visible:
            raise NotFoundError(f"There is no job {job} that you can see here.")
        if row.status != JobStatus.DONE:
            await answer(
                interaction, f"Job {job} is {row.status.value}" + (f": {row.error}" if row.error else ".")
            )
            return
        spoiler = await self._nsfw_rule(interaction, JobSpec.from_dict(row.spec))
        files = [
            discord.File(
                io.BytesIO(self.engine.files.read_bytes(image.sha256)),
                filename=f"dreamcord-{job}-{image.index + 1}.png",
                spoiler=spoiler,
            )
            for image in images
        ]
        embed = discord.Embed(description=str(row.spec.get("prompt", ""))[:4000])
        embed.set_footer(text=f"job {job}")
        await interaction.response.send_message(embed=embed, files=files, view=result_view(job, len(images)))

    async def _nsfw_rule(self, interaction: discord.Interaction, spec: JobSpec) -> bool:
        """Whether a job shown here goes behind spoilers, under this channel's rules as a new job would
        (a job made in an age-restricted channel is refused elsewhere where the server blocks NSFW)."""
        channel = interaction.channel
        if channel is not None and getattr(channel, "is_nsfw", lambda: False)():
            return False
        policy = await guild_policy(self.engine, interaction.guild_id, interaction.channel_id)
        if not policy.is_nsfw(spec):
            return False
        if policy.nsfw == "block":
            raise InvalidRequestError(
                "That job is for age-restricted channels only on this server; use one of those."
            )
        return True

    @app_commands.command(name="pnginfo")
    async def pnginfo(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        """The generation parameters inside an image (A1111, ComfyUI, InvokeAI, NovelAI, Fooocus).

        Args:
            image: A PNG, JPEG or WebP made by a Stable Diffusion tool.
        """
        await interaction.response.defer(ephemeral=True, thinking=True)
        info = read_info(await read_image_attachment(image, "image"))
        if info.tool is None:
            await interaction.followup.send("This image carries no generation parameters.", ephemeral=True)
            return
        raw = info.raw[:1900].replace("```", "``\u200b`")  # the text cannot close the code block
        spec = spec_from_parameters(
            info.prompt or "",
            info.negative_prompt or "",
            dict(info.parameters),
            user_id=interaction.user.id,
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
        )
        view = RemixWithThese(self.bot, spec) if spec.prompt else discord.utils.MISSING
        await interaction.followup.send(f"Made with {info.tool}:\n```\n{raw}\n```", ephemeral=True, view=view)

    @prompt.command(name="explain")
    async def prompt_explain(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 1, 4000],
        steps: app_commands.Range[int, 1, 150] = 20,
    ) -> None:
        """How the webui reads a prompt: weights, BREAK, prompt editing, LoRA tags, chunks.

        Args:
            text: The prompt.
            steps: Sampling steps (for prompt editing).
        """
        try:
            report = await asyncio.to_thread(explain_text, text, steps)  # long prompts take ~1 s
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        await answer(interaction, report[:2000])
