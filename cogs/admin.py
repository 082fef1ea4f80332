"""``/settings`` (server rules), ``/admin`` (sync, pause, resume, stats) and ``/forget-me``.

Admin commands are hidden from members without Manage Server *and* checked again on the server side:
Discord's default permissions can be changed by a server's owner, so they are not trusted alone.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs.common import SIZE_PRESETS, answer
from pipelines.guild_policy import NSFW_POLICIES, UPLOAD_POLICIES, GuildPolicy, parse_banned
from pipelines.jobs import Limits
from pipelines.prompts import echo
from pipelines.samplers import SAMPLERS, check_sampler
from storage import jobs as job_rows
from storage.errors import InvalidRequestError
from storage.tables import JobStatus
from storage.users import (
    delete_user_data,
    ensure_guild,
    ensure_user,
    get_guild_settings,
    get_user_settings,
    update_guild_settings,
    update_user_settings,
)

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = [
    "PREFERENCE_KEYS",
    "Admin",
    "checked_limits",
    "checked_preferences",
    "guild_policy",
    "user_preferences",
]

log = logging.getLogger(__name__)

NOT_ADMIN = "Only members with Manage Server can do that."
SIZE_NAMES = tuple(SIZE_PRESETS)
SAMPLER_NAMES = tuple(SAMPLERS)[:25]


async def guild_policy(engine: Engine, guild_id: int | None, channel_id: int | None = None) -> GuildPolicy:
    """The server's rules, with the channel's overrides (defaults outside a server)."""
    if guild_id is None:
        return GuildPolicy.from_settings({})
    async with engine.db.sessions() as session:
        return GuildPolicy.from_settings(await get_guild_settings(session, guild_id), channel_id)


PREFERENCE_KEYS = ("model", "size", "negative", "steps", "cfg", "sampler")


async def user_preferences(engine: Engine, user_id: int) -> dict[str, Any]:
    """A user's own defaults for /imagine (empty when they set none)."""
    async with engine.db.sessions() as session:
        return {k: v for k, v in (await get_user_settings(session, user_id)).items() if k in PREFERENCE_KEYS}


def _whole(name: str, value: object, low: int, high: int) -> int:
    """``value`` if it is a whole number in ``low..high`` (a modified client may send anything)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be a whole number between {low} and {high}.")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, not {value}.")
    return value


def _number(name: str, value: object, low: float, high: float) -> float:
    """``value`` as a float if it is a number in ``low..high`` (NaN and infinities are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequestError(f"{name} must be a number between {low:g} and {high:g}.")
    return float(value)


def _choice(name: str, value: str, choices: Collection[str]) -> str:
    if value not in choices:
        raise InvalidRequestError(
            f"There is no {name} called {echo(str(value))!r}; use one of {', '.join(choices)}."
        )
    return value


def _text(name: str, value: str, most: int) -> str:
    if len(value) > most:
        raise InvalidRequestError(f"{name} is {len(value):,} characters long; keep it under {most:,}.")
    if "\x00" in value:
        raise InvalidRequestError(f"{name} contains a NUL character; remove it and try again.")
    return value


def checked_preferences(values: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The /preferences values that are set, checked as /imagine checks them (one sentence otherwise)."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key == "steps":
            value = _whole("The default steps", value, 1, limits.max_steps)
        elif key == "cfg":
            value = _number("The default CFG scale", value, 0.0, limits.max_cfg)
        elif key == "size":
            value = _choice("size", value, SIZE_PRESETS)
        elif key == "sampler":
            value = check_sampler(value)
        elif key == "negative":
            value = _text("The default negative prompt", value, 1000)
        checked[key] = value
    return checked


def checked_limits(values: dict[str, Any], limits: Limits) -> dict[str, int]:
    """The /settings limits that are set, each within the bot's own (one sentence otherwise)."""
    bounds = {
        "max_steps": (1, limits.max_steps),
        "max_size": (limits.min_size, limits.max_size),
        "max_count": (1, limits.max_batch),
    }
    return {
        key: _whole(f"The {key} limit", value, *bounds[key])
        for key, value in values.items()
        if value is not None
    }


def _require_admin(interaction: discord.Interaction) -> int:
    """The guild id, if the user may administer it here (checked server-side)."""
    if interaction.guild_id is None:
        raise InvalidRequestError("This only works in a server.")
    if not interaction.permissions.manage_guild:
        raise InvalidRequestError(NOT_ADMIN)
    return interaction.guild_id


class ForgetMeView(discord.ui.View):
    """The confirmation of /forget-me (only its user can press it)."""

    def __init__(self, cog: Admin, user_id: int) -> None:
        super().__init__(timeout=120)
        self.cog, self.user_id = cog, user_id

    @discord.ui.button(label="Delete everything", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        if interaction.user.id != self.user_id:
            await answer(interaction, "This button is not yours.")
            return
        removed = await self.cog.forget(self.user_id)
        await interaction.response.edit_message(
            content=f"Done: your jobs, images and uploads are deleted ({removed} file(s) removed).", view=None
        )


class Admin(commands.Cog):
    """Server settings, bot administration and users' data rights."""

    settings = app_commands.Group(
        name="settings",
        description="This server's rules for image generation (Manage Server).",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )
    admin = app_commands.Group(
        name="admin",
        description="Run the bot (Manage Server).",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )

    preferences = app_commands.Group(name="preferences", description="Your own defaults for /imagine.")

    def __init__(self, bot: commands.Bot, engine: Engine) -> None:
        self.bot = bot
        self.engine = engine

    # --- /settings -------------------------------------------------------------------------------

    @settings.command(name="show")
    async def settings_show(
        self, interaction: discord.Interaction, channel: discord.TextChannel | None = None
    ) -> None:
        """This server's rules (in one channel, with its overrides).

        Args:
            channel: Show the rules as they apply in this channel.
        """
        policy = await guild_policy(
            self.engine, _require_admin(interaction), channel.id if channel is not None else None
        )
        await answer(
            interaction,
            f"Default model: {policy.default_model or '(the bot default)'}\n"
            f"Allowed models: {', '.join(policy.allowed_models) or 'all'}\n"
            f"Banned words: {len(policy.banned_words)}\n"
            f"Forced negative prompt: {policy.forced_negative or '(none)'}\n"
            f"NSFW prompts outside age-restricted channels: {policy.nsfw} ({len(policy.nsfw_words)} words)\n"
            f"Who may upload files: {policy.uploads}\n"
            f"Limits: steps {policy.max_steps or 'bot default'}, side {policy.max_size or 'bot default'} px, "
            f"images {policy.max_count or 'bot default'}",
        )

    @settings.command(name="set")
    @app_commands.choices(
        nsfw=[app_commands.Choice(name=p, value=p) for p in NSFW_POLICIES],
        uploads=[app_commands.Choice(name=p, value=p) for p in UPLOAD_POLICIES],
    )
    async def settings_set(
        self,
        interaction: discord.Interaction,
        default_model: str | None = None,
        allowed_models: str | None = None,
        banned_words: str | None = None,
        forced_negative: str | None = None,
        nsfw: str | None = None,
        nsfw_words: str | None = None,
        uploads: str | None = None,
        max_steps: app_commands.Range[int, 1, 150] | None = None,
        max_size: app_commands.Range[int, 64, 2048] | None = None,
        max_count: app_commands.Range[int, 1, 4] | None = None,
        channel: discord.TextChannel | None = None,
    ) -> None:
        """Change this server's rules (leave an option out to keep it; "-" clears it).

        Args:
            default_model: The model jobs use when none is named.
            allowed_models: Comma-separated model names (empty: all).
            banned_words: Comma-separated words or /regex/ patterns refused in prompts.
            forced_negative: Text always added to the negative prompt.
            nsfw: Outside age-restricted channels: spoiler NSFW prompts' images, or block them.
            nsfw_words: Comma-separated words or /regex/ patterns that make a prompt NSFW.
            uploads: Who may upload and import LoRAs, embeddings, hypernetworks and VAEs.
            max_steps: The most steps a job may ask for here.
            max_size: The longest side in pixels a job may ask for here.
            max_count: The most images per job here.
            channel: Set these for one channel only (overrides the server's rules there).
        """
        guild_id = _require_admin(interaction)
        changes: dict[str, Any] = {}
        if default_model is not None:
            name = None if default_model == "-" else self.engine.registry.require(default_model).name
            changes["default_model"] = name
        if allowed_models is not None:
            names = (
                [] if allowed_models == "-" else [m.strip() for m in allowed_models.split(",") if m.strip()]
            )
            changes["allowed_models"] = [self.engine.registry.require(m).name for m in names]
        if banned_words is not None:
            changes["banned_words"] = [] if banned_words == "-" else list(parse_banned(banned_words))
        if forced_negative is not None:
            negative = "" if forced_negative == "-" else forced_negative[:1000]
            changes["forced_negative"] = _text("The forced negative prompt", negative, 1000)
        if nsfw is not None:
            changes["nsfw"] = _choice("NSFW policy", nsfw, NSFW_POLICIES)
        if uploads is not None:
            changes["uploads"] = _choice("upload policy", uploads, UPLOAD_POLICIES)
        limits = {"max_steps": max_steps, "max_size": max_size, "max_count": max_count}
        changes.update(checked_limits(limits, self.engine.limits))
        if nsfw_words is not None:
            changes["nsfw_words"] = None if nsfw_words == "-" else list(parse_banned(nsfw_words))
        async with self.engine.db.sessions.begin() as session:
            await ensure_guild(session, guild_id)
            if channel is not None and changes:
                current = await get_guild_settings(session, guild_id)
                channels = dict(current.get("channels") or {})
                channels[str(channel.id)] = {**channels.get(str(channel.id), {}), **changes}
                changes = {"channels": channels}
            await update_guild_settings(session, guild_id, changes)
        where = f" for #{channel.name}" if channel is not None else ""
        await answer(interaction, f"Saved{where}." if changes else "Nothing to change; name an option.")

    # --- /admin ----------------------------------------------------------------------------------

    @admin.command(name="sync")
    async def admin_sync(self, interaction: discord.Interaction) -> None:
        """Register the slash commands with Discord (after an update; never done on every start)."""
        _require_admin(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        synced = await self.bot.tree.sync()
        await interaction.followup.send(f"Synced {len(synced)} commands.", ephemeral=True)

    @admin.command(name="models")
    async def admin_models(self, interaction: discord.Interaction) -> None:
        """Look for new or removed checkpoints in the models folder (no restart needed)."""
        _require_admin(interaction)
        before = {entry.name for entry in self.engine.registry.list()}
        self.engine.registry.refresh()
        after = {entry.name for entry in self.engine.registry.list()}
        added, gone = sorted(after - before), sorted(before - after)
        parts = [f"{len(after)} models"]
        if added:
            parts.append("new: " + ", ".join(added))
        if gone:
            parts.append("gone: " + ", ".join(gone))
        await answer(interaction, "; ".join(parts)[:2000] + ".")

    @admin.command(name="pause")
    async def admin_pause(self, interaction: discord.Interaction) -> None:
        """Stop starting new jobs (running ones finish; new ones still queue)."""
        _require_admin(interaction)
        self.engine.queue.pause()
        await answer(interaction, "The queue is paused; `/admin resume` starts it again.")

    @admin.command(name="resume")
    async def admin_resume(self, interaction: discord.Interaction) -> None:
        """Start jobs again."""
        _require_admin(interaction)
        self.engine.queue.resume()
        await answer(interaction, "The queue is running.")

    @admin.command(name="stats")
    async def admin_stats(self, interaction: discord.Interaction) -> None:
        """Jobs by status, the queue, the worker's health."""
        _require_admin(interaction)
        async with self.engine.db.sessions() as session:
            counts = {status: await job_rows.count_jobs(session, status=status) for status in JobStatus}
        worker = "stuck (a job made no progress; see the log)" if self.engine.worker.stuck else "healthy"
        lines = [f"{status.value}: {count}" for status, count in counts.items()]
        lines.append(
            f"queue: {len(self.engine.queue.scheduler)} waiting, {len(self.engine.queue.running())} running"
            + (" (paused)" if self.engine.queue.paused else "")
        )
        lines.append(f"worker: {worker}")
        await answer(interaction, "\n".join(lines))

    # --- /preferences (anyone) ------------------------------------------------------------------

    @preferences.command(name="set")
    @app_commands.choices(
        size=[app_commands.Choice(name=n, value=n) for n in SIZE_NAMES],
        sampler=[app_commands.Choice(name=n, value=n) for n in SAMPLER_NAMES],
    )
    async def preferences_set(
        self,
        interaction: discord.Interaction,
        model: str | None = None,
        size: str | None = None,
        negative: app_commands.Range[str, 0, 1000] | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        cfg: app_commands.Range[float, 0.0, 30.0] | None = None,
        sampler: str | None = None,
    ) -> None:
        """Your own defaults for /imagine (what you leave out keeps its value; "-" as model clears all).

        Args:
            model: Your default model.
            size: Your default aspect preset.
            negative: Your default negative prompt.
            steps: Your default steps.
            cfg: Your default CFG scale.
            sampler: Your default sampler.
        """
        changes: dict[str, Any] = {}
        if model == "-":
            changes = dict.fromkeys(PREFERENCE_KEYS)
        else:
            if model is not None:
                changes["model"] = self.engine.registry.require(model).name
            values = {"size": size, "negative": negative, "steps": steps, "cfg": cfg, "sampler": sampler}
            changes.update(checked_preferences(values, self.engine.limits))
        async with self.engine.db.sessions.begin() as session:
            await ensure_user(session, interaction.user.id)
            await update_user_settings(session, interaction.user.id, changes)
        await answer(interaction, "Saved your defaults." if changes else "Nothing to change; name an option.")

    @preferences.command(name="show")
    async def preferences_show(self, interaction: discord.Interaction) -> None:
        """Your own defaults for /imagine."""
        mine = await user_preferences(self.engine, interaction.user.id)
        text = "\n".join(f"{key}: {mine[key]}" for key in PREFERENCE_KEYS if key in mine)
        await answer(interaction, text or "You have no defaults of your own; `/preferences set` some.")

    # --- /forget-me ------------------------------------------------------------------------------

    @app_commands.command(name="forget-me")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        """Delete everything the bot keeps about you: jobs, images, uploads, settings."""
        await interaction.response.send_message(
            "This deletes all your jobs, images and uploaded files, for good. Sure?",
            view=ForgetMeView(self, interaction.user.id),
            ephemeral=True,
        )

    async def forget(self, user_id: int) -> int:
        """Cancel the user's jobs, delete their rows and the files nobody else uses; returns files removed."""
        for status in self.engine.queue.jobs_of(user_id):
            await self.engine.cancel(status.job_id, user_id)
        async with self.engine.db.sessions.begin() as session:
            orphans = await delete_user_data(session, user_id)
        for sha in orphans:
            self.engine.files.delete(sha)
        log.info("forgot user %d (%d files)", user_id, len(orphans))
        return len(orphans)
