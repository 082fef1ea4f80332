"""Fixtures for the storage tests: migrated databases, a file one and an in-memory one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.db import Database, sqlite_url

MEMORY_URL = "sqlite+aiosqlite:///:memory:"


@pytest.fixture
async def file_db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated SQLite file database in a fresh temp folder."""
    async with Database(sqlite_url(tmp_path / "data" / "dreamcord.db")) as db:
        yield db


@pytest.fixture(params=["file", "memory"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database: a SQLite file, then an in-memory one."""
    url = sqlite_url(tmp_path / "dreamcord.db") if request.param == "file" else MEMORY_URL
    async with Database(url) as database:
        yield database
