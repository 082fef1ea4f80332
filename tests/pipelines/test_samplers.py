"""Webui sampler names map to the diffusers schedulers of diffusers' own mapping table."""

from __future__ import annotations

import pytest
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
)

from pipelines.samplers import SAMPLERS, make_scheduler

SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

REQUIRED = [
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE",
    "DDIM",
    "UniPC",
]


def test_issue_list_is_covered() -> None:
    assert set(REQUIRED) <= set(SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_keeps_the_models_noise_schedule(name: str) -> None:
    scheduler = make_scheduler(name, {**SD_SCHEDULE, "_class_name": "PNDMScheduler"})
    assert isinstance(scheduler, SAMPLERS[name].scheduler)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)
    karras = getattr(scheduler.config, "use_karras_sigmas", False)
    assert karras == name.endswith("Karras")


def test_specific_mappings() -> None:
    assert isinstance(make_scheduler("Euler a", SD_SCHEDULE), EulerAncestralDiscreteScheduler)
    sde = make_scheduler("DPM++ 2M SDE Karras", SD_SCHEDULE)
    assert isinstance(sde, DPMSolverMultistepScheduler)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_karras_sigmas
    assert isinstance(make_scheduler("DPM++ SDE Karras", SD_SCHEDULE), DPMSolverSinglestepScheduler)
    assert isinstance(make_scheduler("PLMS", SD_SCHEDULE), PNDMScheduler)


def test_karras_from_a_previous_choice_does_not_leak() -> None:
    karras = make_scheduler("DPM++ 2M Karras", SD_SCHEDULE)
    plain = make_scheduler("DPM++ 2M", dict(karras.config))
    assert not plain.config.use_karras_sigmas
    assert plain.config.algorithm_type == "dpmsolver++"
