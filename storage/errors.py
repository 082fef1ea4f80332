"""The user-facing error tree, shared by every layer (storage is the lowest one).

``str(exc)`` of a :class:`BotError` is shown to the user verbatim: one or two sentences saying
what is wrong and what to do next. Any other exception is a bug.
"""

from __future__ import annotations

__all__ = [
    "BotError",
    "GenerationError",
    "IncompatibleAssetError",
    "InvalidRequestError",
    "NotFoundError",
    "QueueFullError",
    "QuotaExceededError",
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
