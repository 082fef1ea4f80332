"""A server's rules for jobs: default and allowed models, banned words, a forced negative prompt, NSFW.

NSFW: outside age-restricted channels a prompt matching the server's NSFW words is either refused
("block") or its images are sent behind spoilers ("spoiler", the default); in age-restricted channels
it is allowed. Banned words apply everywhere. (Our models carry no safety checker, so the prompt is what
is judged.)

Stored in the guild's settings JSON (``storage.users``); applied to every job from that server before it
is checked, so a refused prompt stores nothing. No Discord here: the cogs pass the guild id and whether the
channel is age-restricted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from pipelines.jobs import JobSpec
from storage.errors import InvalidRequestError

__all__ = [
    "DEFAULT_NSFW_WORDS",
    "NSFW_POLICIES",
    "POLICY_KEYS",
    "UPLOAD_POLICIES",
    "GuildPolicy",
    "parse_banned",
]

POLICY_KEYS = (
    "default_model",
    "allowed_models",
    "banned_words",
    "forced_negative",
    "nsfw",
    "nsfw_words",
    "uploads",
    "max_steps",
    "max_size",
    "max_count",
)
UPLOAD_POLICIES = ("everyone", "admins")
NSFW_POLICIES = ("spoiler", "block")
#: A starting list; admins replace it with /settings set nsfw_words:
DEFAULT_NSFW_WORDS = (
    "nsfw",
    "nude",
    "naked",
    "nudity",
    "explicit",
    "porn",
    "sex",
    "topless",
    "lingerie",
    "gore",
)
MAX_BANNED = 200


@dataclass(frozen=True)
class GuildPolicy:
    """What a server's admins decided (Manage Server)."""

    default_model: str | None = None
    allowed_models: tuple[str, ...] = ()  # empty: every model
    banned_words: tuple[str, ...] = ()  # words, or /regex/ patterns
    forced_negative: str = ""
    nsfw: str = "spoiler"
    nsfw_words: tuple[str, ...] = DEFAULT_NSFW_WORDS
    uploads: str = "everyone"  # who may upload or import files: everyone, or admins (Manage Server)
    max_steps: int | None = None  # tighter than the bot's own limits, or None
    max_size: int | None = None  # the longest side in pixels
    max_count: int | None = None  # images per job

    @classmethod
    def from_settings(cls, settings: dict[str, Any], channel_id: int | None = None) -> GuildPolicy:
        """The guild's rules, with the channel's own overrides (``settings["channels"][id]``) on top."""
        overrides = (settings.get("channels") or {}).get(str(channel_id)) if channel_id is not None else None
        if overrides:
            settings = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
        policy = cls(
            default_model=settings.get("default_model") or None,
            allowed_models=tuple(settings.get("allowed_models") or ()),
            banned_words=tuple(settings.get("banned_words") or ()),
            forced_negative=str(settings.get("forced_negative") or ""),
            nsfw=str(settings.get("nsfw") or "spoiler"),
            nsfw_words=tuple(settings.get("nsfw_words") or DEFAULT_NSFW_WORDS),
            uploads=str(settings.get("uploads") or "everyone"),
            max_steps=settings.get("max_steps"),
            max_size=settings.get("max_size"),
            max_count=settings.get("max_count"),
        )
        return policy

    @cached_property
    def _patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile(word) for word in self.banned_words)

    @cached_property
    def _nsfw_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile(word) for word in self.nsfw_words)

    def to_settings(self) -> dict[str, Any]:
        return {
            "default_model": self.default_model,
            "allowed_models": list(self.allowed_models),
            "banned_words": list(self.banned_words),
            "forced_negative": self.forced_negative,
            "nsfw": self.nsfw,
            "nsfw_words": list(self.nsfw_words),
            "uploads": self.uploads,
            "max_steps": self.max_steps,
            "max_size": self.max_size,
            "max_count": self.max_count,
        }

    def _check_limits(self, spec: JobSpec) -> None:
        if self.max_steps is not None and spec.steps > self.max_steps:
            raise InvalidRequestError(f"This server allows at most {self.max_steps} steps; ask for fewer.")
        if self.max_count is not None and spec.batch > self.max_count:
            raise InvalidRequestError(f"This server allows at most {self.max_count} image(s) per job.")
        if self.max_size is not None and max(spec.width, spec.height) > self.max_size:
            raise InvalidRequestError(
                f"This server allows images up to {self.max_size} pixels on a side; ask for a smaller size."
            )

    def is_nsfw(self, spec: JobSpec) -> bool:
        """Whether the prompt matches the server's NSFW words."""
        return any(pattern.search(spec.prompt) for pattern in self._nsfw_patterns)

    def apply(self, spec: JobSpec, *, age_restricted: bool = False) -> JobSpec:
        """The job under this server's rules; raises with one sentence when a rule forbids it."""
        for pattern in self._patterns:
            if pattern.search(spec.prompt):
                raise InvalidRequestError("Your prompt uses a word this server does not allow; rephrase it.")
        if not age_restricted and self.nsfw == "block" and self.is_nsfw(spec):
            raise InvalidRequestError(
                "That prompt is for age-restricted channels only on this server; use one of those."
            )
        self._check_limits(spec)
        model = spec.model or self.default_model
        if self.allowed_models and model is not None and model not in self.allowed_models:
            raise InvalidRequestError(
                f"This server allows only these models: {', '.join(self.allowed_models)}."
            )
        negative = spec.negative_prompt
        if self.forced_negative and self.forced_negative not in negative:
            negative = f"{self.forced_negative}, {negative}" if negative else self.forced_negative
        return replace(spec, model=model, negative_prompt=negative)


def _compile(word: str) -> re.Pattern[str]:
    """``/regex/`` is a pattern; anything else a whole word, case-insensitively."""
    if len(word) > 2 and word.startswith("/") and word.endswith("/"):
        try:
            return re.compile(word[1:-1], re.IGNORECASE)
        except re.error as exc:
            raise InvalidRequestError(
                f"The banned pattern {word} is not a valid regular expression: {exc}."
            ) from None
    return re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)


def parse_banned(text: str) -> tuple[str, ...]:
    """A comma-separated list from the settings command, checked (patterns compile, at most 200)."""
    words = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    if len(words) > MAX_BANNED:
        raise InvalidRequestError(f"Keep the banned list to {MAX_BANNED} entries.")
    for word in words:
        _compile(word)
    return words
