"""The `double` pytest fixture, importable by any test folder's conftest.py.

Other folders use it with `from tests.discord_double.fixtures import double` and `__all__ = ["double"]`
in their conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import discord
import pytest

from .server import DiscordDouble

__all__ = ["double"]


@pytest.fixture
async def double() -> AsyncIterator[DiscordDouble]:
    """A running DiscordDouble, installed into discord.py (Route.BASE, DEFAULT_GATEWAY) for one test."""
    async with DiscordDouble() as started:
        with started.install(discord):
            yield started
