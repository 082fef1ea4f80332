"""Fixtures for the reliability and security suite (issue 8): the Discord end-to-end fixtures of
tests/cogs (the real bot on the local Discord double, a real engine on the tiny models)."""

from __future__ import annotations

from tests.cogs.conftest import (
    admin,
    alice,
    bob,
    bot,
    double,
    engine,
    guild,
    running_bot,
    scratch,
    settings,
)

__all__ = [
    "admin", "alice", "bob", "bot", "double", "engine", "guild", "running_bot", "scratch", "settings",
]  # fmt: skip
