"""Generation commands: /imagine, /img2img, /inpaint, /erase, /controlnet, /upscale, and the job buttons.

Thin: parse options and attachments -> a spec and input bytes -> ``engine.prepare`` (bad input: one
ephemeral sentence, nothing stored) -> defer -> ``engine.submit`` -> a message that follows the job.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs.admin import guild_policy, user_preferences
from cogs.common import SIZE_PRESETS, answer, error_text, read_image_attachment, refuse
from cogs.job_buttons import progress_view
from cogs.presenter import follow_job, queued_text
from pipelines import followups
from pipelines.inputs import JobInputs
from pipelines.jobs import CONTROL_TYPES, MAX_SEED, ControlUnit, JobKind, JobSpec
from pipelines.prompts import echo
from pipelines.samplers import DEFAULT_SAMPLER, SAMPLERS
from storage import jobs as job_rows
from storage.assets import list_usable_assets, usable_names
from storage.errors import BotError, InvalidRequestError, NotFoundError
from storage.tables import AssetKind

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = ["Generate"]

log = logging.getLogger(__name__)

SAMPLER_CHOICES = [app_commands.Choice(name=name, value=name) for name in list(SAMPLERS)[:25]]
SIZE_CHOICES = [app_commands.Choice(name=name, value=name) for name in SIZE_PRESETS]
CONTROL_CHOICES = [app_commands.Choice(name=name, value=name) for name in CONTROL_TYPES]


class RemixModal(discord.ui.Modal, title="Remix"):
    """Edit a finished job's prompt and numbers, then run it again."""

    prompt: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label="Prompt", style=discord.TextStyle.paragraph, max_length=4000
    )
    negative: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label="Negative prompt", style=discord.TextStyle.paragraph, required=False, max_length=4000
    )
    steps: discord.ui.TextInput[Any] = discord.ui.TextInput(label="Steps", required=False, max_length=3)
    cfg: discord.ui.TextInput[Any] = discord.ui.TextInput(label="CFG scale", required=False, max_length=5)
    seed: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label="Seed (-1: random)", required=False, max_length=12
    )

    def __init__(self, cog: Generate, spec: JobSpec, init: bytes | None) -> None:
        super().__init__(timeout=15 * 60)
        self.cog, self.spec, self.init = cog, spec, init
        self.prompt.default = spec.prompt[:4000]
        self.negative.default = spec.negative_prompt[:4000]
        self.steps.default, self.cfg.default, self.seed.default = str(spec.steps), f"{spec.cfg:g}", "-1"

    async def on_submit(self, interaction: discord.Interaction) -> None:
        values = {
            "prompt": self.prompt.value,
            "negative": self.negative.value,
            "steps": self.steps.value,
            "cfg": self.cfg.value,
            "seed": self.seed.value,
        }
        spec = followups.remix_spec(self.spec, values, **_who(interaction))
        if self.init is not None:
            spec = replace(followups.variation_spec(spec, "strong", **_who(interaction)), seed=spec.seed)
        await self.cog.run(interaction, spec, JobInputs(init=self.init))

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await answer(interaction, error_text(error))


def _who(interaction: discord.Interaction) -> followups.Who:
    return {
        "user_id": interaction.user.id,
        "guild_id": interaction.guild_id,
        "channel_id": interaction.channel_id,
    }


ACK_WITHIN_S = 2.0  # work that may take longer is acknowledged first (Discord allows 3 s)


async def _defer(interaction: discord.Interaction) -> None:
    if not interaction.response.is_done():
        await interaction.response.defer(thinking=True)


def _age_restricted(interaction: discord.Interaction) -> bool:
    channel = interaction.channel
    return bool(channel is not None and getattr(channel, "is_nsfw", lambda: False)())


def _is_admin(interaction: discord.Interaction) -> bool:
    return bool(interaction.guild_id and interaction.permissions.manage_guild)


class Generate(commands.Cog):
    """Image generation commands and the buttons on their results."""

    def __init__(self, bot: commands.Bot, engine: Engine) -> None:
        self.bot = bot
        self.engine = engine
        self._followers: set[asyncio.Task[None]] = set()

    async def cog_unload(self) -> None:
        for task in self._followers:
            task.cancel()

    # --- the path of every job -------------------------------------------------------------------

    async def run(
        self, interaction: discord.Interaction, spec: JobSpec, inputs: JobInputs | None = None
    ) -> None:
        """Acknowledge, check, queue, and follow a job; every error is one ephemeral sentence."""
        await _defer(interaction)
        age_restricted = _age_restricted(interaction)
        try:
            policy = await guild_policy(self.engine, interaction.guild_id, interaction.channel_id)
            spec = policy.apply(spec, age_restricted=age_restricted)  # the server's rules
            # bad input: one sentence, nothing stored; images are decoded off the event loop
            await asyncio.to_thread(self.engine.prepare, spec, inputs)
            submitted, notes = await self.engine.submit(spec, inputs)
        except BotError as exc:
            await refuse(interaction, str(exc))
            return
        spoiler = not age_restricted and policy.nsfw == "spoiler" and policy.is_nsfw(spec)
        message: discord.WebhookMessage | None
        try:
            message = await interaction.followup.send(
                queued_text(submitted.job_id, submitted.position, submitted.eta_s),
                view=progress_view(submitted.job_id),
                wait=True,
            )
        except discord.HTTPException as exc:  # the job is queued: its outcome will go to the channel
            log.info("could not post job %d's message: %s", submitted.job_id, exc)
            message = None
        task = asyncio.create_task(
            follow_job(self.engine, interaction, message, submitted.job_id, notes, spoiler=spoiler)
        )
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    def _size(self, model: str | None, size: str | None, width: int, height: int) -> tuple[int, int]:
        if size is None or width or height:
            return width, height
        if size not in SIZE_PRESETS:  # a stale preference, or a client that ignores the choices
            raise InvalidRequestError(
                f"There is no size called {echo(size)!r}; use one of {', '.join(SIZE_PRESETS)}."
            )
        entry = self.engine.registry.require(model)
        from models.families import family_info

        side = entry.default_size or (family_info(entry.family).default_size if entry.family else 512)
        fw, fh = SIZE_PRESETS[size]
        return int(side * fw) // 8 * 8, int(side * fh) // 8 * 8

    async def model_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = [entry.name for entry in self.engine.registry.list()]
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]

    # --- commands --------------------------------------------------------------------------------

    @app_commands.command(name="imagine")
    @app_commands.choices(sampler=SAMPLER_CHOICES, size=SIZE_CHOICES)
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 4000],
        negative: app_commands.Range[str, 0, 4000] | None = None,
        model: str | None = None,
        size: str | None = None,
        width: app_commands.Range[int, 0, 2048] = 0,
        height: app_commands.Range[int, 0, 2048] = 0,
        steps: app_commands.Range[int, 1, 150] | None = None,
        cfg: app_commands.Range[float, 0.0, 30.0] | None = None,
        sampler: str | None = None,
        seed: app_commands.Range[int, -1, MAX_SEED] = -1,
        count: app_commands.Range[int, 1, 4] = 1,
        vae: str | None = None,
        hires: app_commands.Range[float, 0.0, 4.0] = 0.0,
        lora: str | None = None,
        lora_weight: app_commands.Range[float, -5.0, 5.0] = 0.8,
        embedding: str | None = None,
        hypernet: str | None = None,
    ) -> None:
        """Draw images from a text prompt (webui prompt syntax, <lora:name:0.8> included).

        Args:
            prompt: What to draw.
            negative: What to keep out of the image (default: yours from /preferences).
            model: The model (default: yours, else the server's).
            size: An aspect preset at the model's native size (default: yours, else square).
            width: Width in pixels, a multiple of 8 (overrides size).
            height: Height in pixels, a multiple of 8 (overrides size).
            steps: Denoising steps, 1-150; more is slower (default: yours, else 20).
            cfg: How strictly to follow the prompt, 0-30 (default: yours, else 7).
            sampler: The sampler, by its webui name (default: yours, else DPM++ 2M Karras).
            seed: -1 for a random seed.
            count: How many images, 1-4.
            vae: One of your VAEs, by name.
            hires: Hires fix upscale factor (1.5-2 is typical; 0: off).
            lora: One of your LoRAs (or add <lora:name:weight> to the prompt).
            lora_weight: The LoRA's strength.
            embedding: One of your embeddings, added to the prompt (or write its name in the prompt).
            hypernet: One of your hypernetworks (or add <hypernet:name:1> to the prompt).
        """
        await _defer(interaction)  # acknowledge before the database: a burst of commands queues up there
        try:
            mine = await user_preferences(self.engine, interaction.user.id)
            model = model or mine.get("model")
            w, h = self._size(model, size or mine.get("size"), width, height)
        except BotError as exc:
            await refuse(interaction, str(exc))
            return
        if lora:
            prompt = f"{prompt} <lora:{lora.strip()}:{lora_weight:g}>"
        if embedding:
            prompt = f"{prompt}, {embedding.strip()}"
        if hypernet:
            prompt = f"{prompt} <hypernet:{hypernet.strip()}:1>"
        spec = JobSpec(
            prompt=prompt,
            negative_prompt=negative if negative is not None else str(mine.get("negative", "")),
            model=model,
            width=w,
            height=h,
            steps=steps if steps is not None else int(mine.get("steps", 20)),
            cfg=cfg if cfg is not None else float(mine.get("cfg", 7.0)),
            sampler=sampler or str(mine.get("sampler", DEFAULT_SAMPLER)),
            seed=seed,
            batch=count,
            vae=vae,
            hires_scale=hires,
            **_who(interaction),
        )
        await self.run(interaction, spec)

    imagine.autocomplete("model")(model_autocomplete)

    async def _asset_choices(
        self, interaction: discord.Interaction, current: str, kind: AssetKind
    ) -> list[app_commands.Choice[str]]:
        async with self.engine.db.sessions() as session:
            rows = await list_usable_assets(
                session, user_id=interaction.user.id, guild_id=interaction.guild_id, kind=kind
            )
        names = [n for n in usable_names(rows) if current.lower() in n.lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    @imagine.autocomplete("lora")
    async def lora_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await self._asset_choices(interaction, current, AssetKind.LORA)

    @imagine.autocomplete("embedding")
    async def embedding_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await self._asset_choices(interaction, current, AssetKind.EMBEDDING)

    @imagine.autocomplete("hypernet")
    async def hypernet_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await self._asset_choices(interaction, current, AssetKind.HYPERNETWORK)

    @imagine.autocomplete("vae")
    async def vae_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await self._asset_choices(interaction, current, AssetKind.VAE)

    @app_commands.command(name="img2img")
    async def img2img(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: app_commands.Range[str, 1, 4000],
        strength: app_commands.Range[float, 0.01, 1.0] = 0.75,
        negative: app_commands.Range[str, 0, 4000] = "",
        steps: app_commands.Range[int, 1, 150] = 20,
        seed: app_commands.Range[int, -1, MAX_SEED] = -1,
        model: str | None = None,
    ) -> None:
        """Redraw an image to match a prompt.

        Args:
            image: The starting image.
            prompt: What it should become.
            strength: How much to change it, 0.01-1.
            negative: What to keep out.
            steps: Denoising steps.
            seed: -1 for a random seed.
            model: The model (default: the server's).
        """
        await self._with_images(
            interaction,
            JobSpec(
                prompt=prompt,
                negative_prompt=negative,
                kind=JobKind.img2img,
                strength=strength,
                steps=steps,
                seed=seed,
                model=model,
                **_who(interaction),
            ),
            image,
        )

    @app_commands.command(name="inpaint")
    async def inpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: app_commands.Range[str, 1, 4000],
        mask: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.01, 1.0] = 1.0,
        negative: app_commands.Range[str, 0, 4000] = "",
        seed: app_commands.Range[int, -1, MAX_SEED] = -1,
        model: str | None = None,
    ) -> None:
        """Repaint the white part of a mask (or the transparent part of the image).

        Args:
            image: The image to change.
            prompt: What to paint there.
            mask: White = repaint; leave out to use the image's transparency.
            strength: How much to change the masked area.
            negative: What to keep out.
            seed: -1 for a random seed.
            model: The model (default: the server's).
        """
        spec = JobSpec(
            prompt=prompt,
            negative_prompt=negative,
            kind=JobKind.inpaint,
            strength=strength,
            seed=seed,
            model=model,
            **_who(interaction),
        )
        await self._with_images(interaction, spec, image, mask)

    @app_commands.command(name="erase")
    async def erase(
        self, interaction: discord.Interaction, image: discord.Attachment, mask: discord.Attachment
    ) -> None:
        """Remove what the mask covers and fill it from the surroundings.

        Args:
            image: The image.
            mask: White = erase.
        """
        await self._with_images(
            interaction, JobSpec(prompt="", kind=JobKind.erase, **_who(interaction)), image, mask
        )

    @app_commands.command(name="controlnet")
    @app_commands.choices(type=CONTROL_CHOICES)
    async def controlnet(
        self,
        interaction: discord.Interaction,
        control: discord.Attachment,
        prompt: app_commands.Range[str, 1, 4000],
        type: str = "scribble",
        weight: app_commands.Range[float, 0.0, 2.0] = 1.0,
        init: discord.Attachment | None = None,
        seed: app_commands.Range[int, -1, MAX_SEED] = -1,
        model: str | None = None,
    ) -> None:
        """Draw following a sketch, edges, depth or pose map.

        Args:
            control: The control image (a sketch, a photo to take edges from, ...).
            prompt: What to draw.
            type: How the control image is read.
            weight: How strongly it steers, 0-2.
            init: An optional starting image.
            seed: -1 for a random seed.
            model: The model (default: the server's).
        """
        await _defer(interaction)
        try:
            control_bytes = await read_image_attachment(control, "control image")
            init_bytes = await read_image_attachment(init, "init image") if init else None
        except BotError as exc:
            await refuse(interaction, str(exc))
            return
        spec = JobSpec(
            prompt=prompt,
            kind=JobKind.controlnet,
            seed=seed,
            model=model,
            controls=(ControlUnit(type=type, weight=weight),),
            **_who(interaction),
        )
        await self.run(interaction, spec, JobInputs(init=init_bytes, controls=(control_bytes,)))

    @app_commands.command(name="upscale")
    async def upscale(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        scale: app_commands.Range[float, 1.0, 4.0] = 2.0,
        upscaler: str | None = None,
    ) -> None:
        """Enlarge an image.

        Args:
            image: The image.
            scale: How much larger, 1-4.
            upscaler: An upscaler name (default: the server's).
        """
        spec = JobSpec(prompt="", kind=JobKind.upscale, scale=scale, upscaler=upscaler, **_who(interaction))
        await self._with_images(interaction, spec, image)

    async def _with_images(
        self,
        interaction: discord.Interaction,
        spec: JobSpec,
        image: discord.Attachment,
        mask: discord.Attachment | None = None,
    ) -> None:
        await _defer(interaction)  # downloads may take longer than Discord's 3 seconds
        try:
            init = await read_image_attachment(image, "image")
            mask_bytes = await read_image_attachment(mask, "mask") if mask else None
        except BotError as exc:
            await refuse(interaction, str(exc))
            return
        await self.run(interaction, spec, JobInputs(init=init, mask=mask_bytes))

    @app_commands.command(name="queue")
    async def queue(self, interaction: discord.Interaction) -> None:
        """Your queued and running jobs."""
        jobs = self.engine.queue.jobs_of(interaction.user.id)
        if not jobs:
            await answer(interaction, "You have no jobs waiting or running.")
            return
        lines = [
            f"job {j.job_id}: "
            + ("running" if j.position is None else f"#{j.position}, about {j.eta_s:.0f} s")
            for j in jobs
        ]
        await answer(interaction, "\n".join(lines)[:2000])

    @app_commands.command(name="cancel")
    async def cancel(self, interaction: discord.Interaction, job: int) -> None:
        """Cancel one of your jobs (admins: any job in this server).

        Args:
            job: The job number.
        """
        await self._cancel(interaction, job)

    async def _cancel(self, interaction: discord.Interaction, job_id: int) -> None:
        work = asyncio.ensure_future(
            self.engine.cancel(job_id, interaction.user.id, admin_guilds=self._admin_of(interaction))
        )
        try:  # usually instant; a locked database can make it wait past Discord's 3 s, so acknowledge then
            await asyncio.wait_for(asyncio.shield(work), ACK_WITHIN_S)
        except TimeoutError:
            await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            cancelled = await work
        except BotError as exc:
            await answer(interaction, str(exc))
            return
        await answer(
            interaction, f"Job {job_id} cancelled." if cancelled else f"Job {job_id} had already finished."
        )

    def _admin_of(self, interaction: discord.Interaction) -> list[int]:
        return [interaction.guild_id] if _is_admin(interaction) and interaction.guild_id else []

    # --- buttons ---------------------------------------------------------------------------------

    async def on_button(
        self, interaction: discord.Interaction, action: str, job_id: int, index: int | None
    ) -> None:
        """A result or progress button (after a restart too: the job is read back from the database)."""
        try:
            await self._button(interaction, action, job_id, index)
        except Exception as exc:  # the funnel: one ephemeral sentence
            await answer(interaction, error_text(exc))

    async def _button(
        self, interaction: discord.Interaction, action: str, job_id: int, index: int | None
    ) -> None:
        if action == "cancel":
            await self._cancel(interaction, job_id)
            return
        async with self.engine.db.sessions() as session:
            job = await job_rows.get_job(session, job_id)
            images = await job_rows.list_images(session, job_id)
        if job is None:
            raise NotFoundError(f"Job {job_id} no longer exists.")
        spec = JobSpec.from_dict(job.spec)
        owner_or_admin = job.user_id == interaction.user.id or (
            job.guild_id is not None and job.guild_id in self._admin_of(interaction)
        )
        if action == "delete":
            if not owner_or_admin:
                await answer(
                    interaction, "Only the person who made this image or a server admin can delete it."
                )
                return
            await interaction.response.defer()
            if interaction.message is not None:
                await interaction.message.delete()
            return
        if action == "info":
            text = (
                images
                and self.engine.stored_parameters(images[0].sha256)
                or "This job has no stored parameters."
            )
            await answer(interaction, f"```\n{text[:1900]}\n```")
            return
        await self._follow_up(interaction, action, spec, [image.sha256 for image in images], index)

    async def _follow_up(
        self,
        interaction: discord.Interaction,
        action: str,
        spec: JobSpec,
        images: list[str],
        index: int | None,
    ) -> None:
        """Reroll, variations, upscale, remix and use-as-init: a new job of the presser's."""
        chosen = None
        if index is not None:
            if index >= len(images):
                raise NotFoundError("That image is no longer stored.")
            chosen = self.engine.files.read_bytes(images[index])
        who = _who(interaction)
        if action == "reroll":
            await self.run(interaction, followups.reroll_spec(spec, **who))
        elif action in ("vs", "vS"):
            strength = "subtle" if action == "vs" else "strong"
            await self.run(
                interaction, followups.variation_spec(spec, strength, **who), JobInputs(init=chosen)
            )
        elif action == "up":
            await self.run(interaction, followups.upscale_spec(spec, **who), JobInputs(init=chosen))
        elif action in ("remix", "init"):
            await interaction.response.send_modal(RemixModal(self, spec, chosen))

    async def _delete(self, interaction: discord.Interaction, owner: int | None, guild: int | None) -> None:
        if owner != interaction.user.id and not (guild is not None and guild in self._admin_of(interaction)):
            await answer(interaction, "Only the person who made this image or a server admin can delete it.")
            return
        await interaction.response.defer()
        if interaction.message is not None:
            await interaction.message.delete()
