"""Fixtures for the double's own tests."""

from __future__ import annotations

from tests.discord_double.fixtures import double

__all__ = ["double"]
