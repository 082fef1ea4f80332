"""``/history``, ``/show``, ``/pnginfo`` and ``/prompt explain``: looking back and looking inside."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from cogs.common import answer, read_image_attachment
from cogs.job_buttons import result_view
from pipelines.pnginfo import read_info
from pipelines.prompt_chunks import explain
from storage import jobs as job_rows
from storage.errors import InvalidRequestError, NotFoundError
from storage.tables import JobStatus

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = ["History", "explain_text"]

log = logging.getLogger(__name__)

PAGE = 10


def explain_text(prompt: str, steps: int) -> str:
    """The explain-prompt report as a few readable lines."""
    report = explain(prompt, steps=steps)
    weights = "  ".join(
        "BREAK" if w == -1 else (t if w == 1 else f"({t}:{w:.3g})") for t, w in report["weights"]
    )
    lines = [f"**Weights**: {weights or '(empty)'}"]
    if len(report["schedule"]) > 1:
        lines += [f"until step {until}: {text}" for until, text in report["schedule"]]
    lines += [f"{net['type']} `{net['name']}` at {net['weight']:g}" for net in report["networks"]]
    lines.append(f"{report['tokens']} tokens in {report['chunks']} chunk(s) of 75")
    return "\n".join(lines)


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
        if not jobs:
            await answer(
                interaction, "No jobs there." if page > 1 else "You have no jobs yet; try `/imagine`."
            )
            return
        lines = [
            f"`{job.id}` {job.status.value} · {job.kind} · {str(job.spec.get('prompt', ''))[:60]!r}"
            for job in jobs
        ]
        pages = (total + PAGE - 1) // PAGE
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
        visible = row is not None and (
            row.user_id == interaction.user.id or row.guild_id == interaction.guild_id
        )
        if row is None or not visible:
            raise NotFoundError(f"There is no job {job} that you can see here.")
        if row.status != JobStatus.DONE:
            await answer(
                interaction, f"Job {job} is {row.status.value}" + (f": {row.error}" if row.error else ".")
            )
            return
        files = [
            discord.File(
                io.BytesIO(self.engine.files.read_bytes(image.sha256)),
                filename=f"dreamcord-{job}-{image.index + 1}.png",
            )
            for image in images
        ]
        embed = discord.Embed(description=str(row.spec.get("prompt", ""))[:4000])
        embed.set_footer(text=f"job {job}")
        await interaction.response.send_message(embed=embed, files=files, view=result_view(job, len(images)))

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
        await interaction.followup.send(
            f"Made with {info.tool}:\n```\n{info.raw[:1900]}\n```", ephemeral=True
        )

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
            report = explain_text(text, steps)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        await answer(interaction, report[:2000])
