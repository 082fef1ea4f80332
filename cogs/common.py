"""What every cog shares: the one error funnel, attachment reading, and the ephemeral answer.

Errors reach the user as one ephemeral sentence: a :class:`~storage.errors.BotError` verbatim; anything
else as "Something broke on our side (ref abc123)" with the traceback only in the log, under that ref.
"""

from __future__ import annotations

import logging
import secrets

import discord
from discord import app_commands

from storage.db import DATABASE_BUSY, is_locked
from storage.errors import BotError, InvalidRequestError

__all__ = [
    "IMAGE_TYPES",
    "SIZE_PRESETS",
    "MAX_IMAGE_BYTES",
    "answer",
    "error_text",
    "install_error_handler",
    "read_image_attachment",
    "refuse",
]

log = logging.getLogger(__name__)

#: aspect presets, as fractions of the model's native side (webui-style sizes)
SIZE_PRESETS = {
    "square": (1.0, 1.0),
    "portrait 2:3": (0.8125, 1.1875),
    "landscape 3:2": (1.1875, 0.8125),
    "portrait 9:16": (0.75, 1.3125),
    "landscape 16:9": (1.3125, 0.75),
}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
MAX_IMAGE_BYTES = 25 * 2**20


def error_text(exc: BaseException) -> str:
    """The sentence a user sees for ``exc`` (unexpected ones: a reference id; the traceback is logged)."""
    if isinstance(exc, app_commands.CommandInvokeError):
        exc = exc.original
    if isinstance(exc, BotError):
        return str(exc)
    if is_locked(exc):  # a write the code did not expect to wait on: still not the user's fault
        return DATABASE_BUSY
    if isinstance(exc, app_commands.CheckFailure):
        return "You are not allowed to use this command here."
    ref = secrets.token_hex(3)
    log.error("unexpected error (ref %s)", ref, exc_info=exc)
    return f"Something broke on our side (ref {ref}); the error was logged — please try again."


async def answer(interaction: discord.Interaction, text: str, *, ephemeral: bool = True) -> None:
    """Reply once, whether or not the interaction was already acknowledged."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=ephemeral)
    else:
        await interaction.response.send_message(text, ephemeral=ephemeral)


async def refuse(interaction: discord.Interaction, text: str) -> None:
    """The sentence privately, also after a public "thinking…" defer (whose placeholder is removed first:
    a follow-up would otherwise take its place, public)."""
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True)
        return
    try:
        await interaction.delete_original_response()
    except discord.HTTPException:
        pass
    await interaction.followup.send(text, ephemeral=True)


def install_error_handler(tree: app_commands.CommandTree[discord.Client]) -> None:
    """Every slash command's uncaught error goes through :func:`error_text`."""

    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        try:
            await answer(interaction, error_text(error))
        except discord.HTTPException:
            log.warning("could not tell the user about an error", exc_info=True)

    tree.on_error = on_error  # type: ignore[method-assign]


async def read_image_attachment(
    attachment: discord.Attachment, role: str, *, max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    """Download an image attachment now (CDN links expire), refusing what is too big or not an image."""
    if attachment.size > max_bytes:
        raise InvalidRequestError(
            f"The {role} is {attachment.size / 2**20:.1f} MB; attach one under {max_bytes // 2**20} MB."
        )
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type and content_type not in IMAGE_TYPES:
        raise InvalidRequestError(f"The {role} must be an image (PNG, JPEG or WebP), not {content_type}.")
    try:
        data = await attachment.read()
    except discord.HTTPException:
        raise InvalidRequestError(f"Could not download the {role}; attach it again.") from None
    if len(data) > max_bytes:
        raise InvalidRequestError(f"The {role} is too big; attach one under {max_bytes // 2**20} MB.")
    return data
