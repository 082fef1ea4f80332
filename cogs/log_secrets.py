"""Keeps credentials out of the bot's log: the bot token, interaction tokens and webhook URLs.

discord.py logs each interaction's payload and each webhook route at DEBUG; an interaction token lets
whoever reads the log answer as the bot for 15 minutes, so every handler gets this filter.
"""

from __future__ import annotations

import logging
import re

__all__ = ["SecretFilter", "install_secret_filter"]

_WEBHOOK = re.compile(r"(/webhooks/\d+/)[A-Za-z0-9_.\-]+")
_INTERACTION = re.compile(r"(/interactions/\d+/)[A-Za-z0-9_.\-]+")
_TOKEN_FIELD = re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]+""")
MASK = "***"


class SecretFilter(logging.Filter):
    """Rewrites each record's message with tokens masked (never drops a record)."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secret for secret in secrets if secret)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        text = _WEBHOOK.sub(rf"\g<1>{MASK}", text)
        text = _INTERACTION.sub(rf"\g<1>{MASK}", text)
        return _TOKEN_FIELD.sub(rf"\g<1>{MASK}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_secret_filter(*secrets: str, logger: logging.Logger | None = None) -> SecretFilter:
    """Add the filter to every handler of ``logger`` (the root logger by default)."""
    target = logger or logging.getLogger()
    secret_filter = SecretFilter(secrets)
    for handler in target.handlers:
        handler.addFilter(secret_filter)
    return secret_filter
