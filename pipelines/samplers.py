"""The webui's sampler names, mapped to diffusers schedulers.

The mapping follows the table in diffusers' documentation ("A1111/k-diffusion → diffusers"): the
multistep DPM-Solver covers DPM++ 2M (and its SDE variant), the singlestep one stands in for
DPM++ SDE (diffusers' true SDE sampler needs torchsde), Karras variants switch on Karras sigmas.
DPM2 / DPM2 a are left out: diffusers 0.42.1's KDPM2 schedulers fail to build with numpy 2.4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from storage.errors import InvalidRequestError, echo

__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "Sampler", "check_sampler", "make_scheduler"]


@dataclass(frozen=True)
class Sampler:
    """One webui sampler: its name, the diffusers class and the config overrides that make it."""

    name: str
    scheduler: type[SchedulerMixin]
    overrides: Mapping[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
_SDE_2M = {"algorithm_type": "sde-dpmsolver++"}

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("Euler a", EulerAncestralDiscreteScheduler),
        Sampler("Euler", EulerDiscreteScheduler),
        Sampler("LMS", LMSDiscreteScheduler),
        Sampler("LMS Karras", LMSDiscreteScheduler, _KARRAS),
        Sampler("Heun", HeunDiscreteScheduler),
        Sampler("DPM++ 2M", DPMSolverMultistepScheduler),
        Sampler("DPM++ 2M Karras", DPMSolverMultistepScheduler, _KARRAS),
        Sampler("DPM++ SDE", DPMSolverSinglestepScheduler),
        Sampler("DPM++ SDE Karras", DPMSolverSinglestepScheduler, _KARRAS),
        Sampler("DPM++ 2M SDE", DPMSolverMultistepScheduler, _SDE_2M),
        Sampler("DPM++ 2M SDE Karras", DPMSolverMultistepScheduler, {**_SDE_2M, **_KARRAS}),
        Sampler("DDIM", DDIMScheduler),
        Sampler("PLMS", PNDMScheduler),
        Sampler("UniPC", UniPCMultistepScheduler),
    )
}

DEFAULT_SAMPLER = "DPM++ 2M Karras"
_BY_LOWER = {name.lower(): name for name in SAMPLERS}

# Keys that one scheduler type sets and another would misread (e.g. PNDM's skip_prk_steps is harmless,
# but a Karras flag or an SDE algorithm must come only from the chosen sampler).
_RESET_KEYS = ("use_karras_sigmas", "algorithm_type", "use_exponential_sigmas", "use_beta_sigmas")


def check_sampler(name: str) -> str:
    """Return the canonical sampler name for ``name`` (case-insensitive) or raise a user error."""
    canonical = _BY_LOWER.get(name.strip().lower())
    if canonical is None:
        known = ", ".join(SAMPLERS)
        raise InvalidRequestError(f"There is no sampler called {echo(name)!r}; pick one of: {known}.")
    return canonical


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for sampler ``name``, keeping the model's noise schedule from ``base_config``."""
    sampler = SAMPLERS[check_sampler(name)]
    config = {k: v for k, v in base_config.items() if k not in _RESET_KEYS}
    config.update(sampler.overrides)
    scheduler: SchedulerMixin = sampler.scheduler.from_config(config)
    return scheduler
