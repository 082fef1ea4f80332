"""Fixtures shared by the pipeline tests: an engine on a fresh data folder with the tiny models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pipelines.engine import Engine
from pipelines.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, tiny_models: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", builtin_models_dir=tiny_models)


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    async with Engine(settings) as eng:
        yield eng
