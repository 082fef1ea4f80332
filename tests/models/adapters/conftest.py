"""Fixtures for the adapter tests: the SD 1.5-shaped reference pipeline, the tiny SD 1.5 one, one thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from models.sd15_reference import sd15_reference_pipeline
from models.tiny import tiny_path


@pytest.fixture(scope="session")
def sd15_reference() -> StableDiffusionPipeline:
    """SD 1.5's real shapes with random weights (about 20 s and 4.5 GB to build; never modify it for good)."""
    return sd15_reference_pipeline()


@pytest.fixture(scope="module")
def tiny_sd15(tiny_models: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_path(tiny_models, "sd15"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One torch thread: two stall on a shared two-core machine (use with ``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
