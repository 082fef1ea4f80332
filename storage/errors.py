"""The user-facing error tree, shared by every layer (storage is the lowest one).

``str(exc)`` of a :class:`BotError` is shown to the user verbatim: one or two sentences saying
what is wrong and what to do next. Any other exception is a bug.
"""

from __future__ import annotations

import unicodedata

__all__ = [
    "BotError",
    "GenerationError",
    "IncompatibleAssetError",
    "InvalidRequestError",
    "NotFoundError",
    "QueueFullError",
    "QuotaExceededError",
    "echo",
]


class BotError(Exception):
    """Base of every error whose message may be shown to a user as-is."""


class InvalidRequestError(BotError):
    """The request itself is wrong: a bad size, an unknown sampler, an empty prompt."""


class NotFoundError(BotError):
    """A named thing (model, asset, job) does not exist or is not visible to the user."""


class IncompatibleAssetError(InvalidRequestError):
    """An asset does not fit the model family (an SDXL LoRA on an SD 1.5 model)."""


class QueueFullError(BotError):
    """The queue is at its bound; try again later."""


class QuotaExceededError(BotError):
    """A per-user or per-guild limit is reached."""


class GenerationError(BotError):
    """Generation failed in a way the user can act on (out of memory, cancelled, blocked)."""


def echo(text: str, limit: int = 40) -> str:
    """User text to quote in a sentence: one line, invisible and direction-changing characters shown as
    "\ufffd", at most ``limit`` characters.

    Every refusal that repeats a user-given name or value goes through this: a newline would split the
    sentence and a 3,000-character name would outgrow a Discord message, so the user would see nothing.
    """
    shown = "".join(c if c.isspace() or unicodedata.category(c)[0] != "C" else "\ufffd" for c in text)
    flat = " ".join(shown.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
