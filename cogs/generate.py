"""``/imagine``: text-to-image. Thin: parse -> check -> run through the engine -> reply."""

from __future__ import annotations

import io
import logging
import secrets
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from pipelines.jobs import JobSpec
from pipelines.samplers import DEFAULT_SAMPLER, SAMPLERS
from storage.errors import BotError

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = ["Generate"]

log = logging.getLogger(__name__)

SAMPLER_CHOICES = [app_commands.Choice(name=name, value=name) for name in list(SAMPLERS)[:25]]


class Generate(commands.Cog):
    """Image generation commands."""

    def __init__(self, bot: commands.Bot, engine: Engine) -> None:
        self.bot = bot
        self.engine = engine

    @app_commands.command(name="imagine")
    @app_commands.choices(sampler=SAMPLER_CHOICES)
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1000],
        negative: app_commands.Range[str, 0, 1000] = "",
        width: app_commands.Range[int, 64, 2048] = 0,
        height: app_commands.Range[int, 64, 2048] = 0,
        steps: app_commands.Range[int, 1, 150] = 20,
        cfg: app_commands.Range[float, 0.0, 30.0] = 7.0,
        sampler: str = DEFAULT_SAMPLER,
        seed: int = -1,
        count: app_commands.Range[int, 1, 4] = 1,
    ) -> None:
        """Draw images from a text prompt.

        Args:
            prompt: What to draw (webui syntax).
            negative: What to keep out of the image.
            width: Width in pixels, a multiple of 8 (default: the model's size).
            height: Height in pixels, a multiple of 8 (default: the model's size).
            steps: Denoising steps, 1-150; more is slower.
            cfg: How strictly to follow the prompt, 0-30.
            sampler: The sampler, by its webui name.
            seed: -1 for a random seed.
            count: How many images, 1-4.
        """
        spec = JobSpec(
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            sampler=sampler,
            seed=seed,
            batch=count,
            user_id=interaction.user.id,
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
        )
        try:
            self.engine.prepare(spec)  # bad input: one sentence, before anything is stored or deferred
        except BotError as exc:
            await interaction.response.send_message(str(exc), ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        try:
            result = await self.engine.generate(spec)
        except BotError as exc:
            await interaction.followup.send(str(exc), ephemeral=True)
            return
        except Exception:
            ref = secrets.token_hex(3)
            log.exception("imagine failed (ref %s)", ref)
            await interaction.followup.send(f"Something broke on our side (ref {ref}).", ephemeral=True)
            return
        files = [
            discord.File(
                io.BytesIO(image.path.read_bytes()), filename=f"dreamcord-{result.job_id}-{image.index}.png"
            )
            for image in result.images
        ]
        embed = discord.Embed(description=prompt[:4000])
        embed.add_field(name="Seed", value=str(result.spec.seed))
        embed.add_field(name="Size", value=f"{result.spec.width}×{result.spec.height}")
        embed.add_field(name="Model", value=str(result.spec.model))
        embed.set_footer(text=f"job {result.job_id} · {result.seconds:.1f} s")
        await interaction.followup.send(embed=embed, files=files)
