"""Fixtures for the adapter tests: the SD 1.5-shaped reference pipeline, built once per session."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionPipeline

from models.sd15_reference import sd15_reference_pipeline


@pytest.fixture(scope="session")
def sd15_reference() -> StableDiffusionPipeline:
    """SD 1.5's real shapes with random weights (about 20 s and 4.5 GB to build; never modify it for good)."""
    return sd15_reference_pipeline()
