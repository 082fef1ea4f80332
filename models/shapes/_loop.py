"""The training loop machinery shared by the shapes stages: EMA, clock, progress, RNG state, atomic
checkpoints (``DIR/ckpt/<stage>.pt``) and :class:`StageRun`, which resumes a stage and runs its loop."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.shapes._common import RunOptions, lr_at

__all__ = [
    "Clock",
    "Ema",
    "Progress",
    "StageRun",
    "load_checkpoint",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)


class Ema:
    """Exponential moving average of parameters (fp32 shadow), decay warmed up as (1+t)/(10+t)."""

    def __init__(self, params: Iterable[torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)


def rng_state(noise: torch.Generator, sampler: torch.Generator) -> dict[str, Any]:
    """Every random state the training loop uses (global torch/CUDA/numpy/python, noise and sampler)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "noise": noise.get_state(),
        "noise_device": noise.device.type,
        "sampler": sampler.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], noise: torch.Generator, sampler: torch.Generator) -> None:
    """Restore :func:`rng_state`; the noise generator only if it lives on the same kind of device."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    sampler.set_state(state["sampler"])
    if state["noise_device"] == noise.device.type:
        noise.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    log.info("checkpoint %s at step %d", path.name, state["step"])


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (on the CPU), or None if there is none."""
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)  # ours: holds RNG states
    return state


class Clock:
    """Wall time of this run against the ``--minutes`` limit, and when to save the next checkpoint."""

    def __init__(self, minutes: float | None, save_minutes: float) -> None:
        self.start = time.monotonic()
        self.limit = None if minutes is None else 60.0 * minutes
        self.save_every = 60.0 * save_minutes
        self._last_save = self.start

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def out_of_time(self) -> bool:
        return self.limit is not None and self.elapsed >= self.limit

    def save_due(self) -> bool:
        if time.monotonic() - self._last_save < self.save_every:
            return False
        self._last_save = time.monotonic()
        return True


class Progress:
    """Mean loss over a window of steps and the throughput; logs a line every ``every`` steps.

    Losses stay on the device until a line is due, so a GPU is not synchronised on every step.
    """

    def __init__(self, stage: str, every: int, loss: float = float("nan")) -> None:
        self.stage, self.every, self.loss = stage, every, loss
        self._window: list[torch.Tensor] = []
        self._t = time.monotonic()

    def update(self, step: int, total: int, loss: torch.Tensor, clock: Clock, extra: str = "") -> None:
        self._window.append(loss.detach())
        if step % self.every == 0 or step == total:
            self.flush(step, total, clock, extra)

    def flush(self, step: int, total: int, clock: Clock, extra: str = "") -> None:
        """Log the window's mean loss (raising if it is not finite) and start a new window."""
        if not self._window:
            return
        mean = float(torch.stack(self._window).float().mean())
        if not math.isfinite(mean):
            raise FloatingPointError(f"{self.stage}: the loss is {mean} near step {step}")
        rate = len(self._window) / max(time.monotonic() - self._t, 1e-9)
        self.loss = mean
        log.info(
            "%s step %d/%d loss %.5f%s %.2f steps/s elapsed %.0f s",
            self.stage,
            step,
            total,
            mean,
            extra,
            rate,
            clock.elapsed,
        )
        self._window, self._t = [], time.monotonic()


class StageRun:
    """One run of a training stage: what its checkpoint says (step, step target, batch, learning rate,
    commands), the random generators, the optimizer and EMA, and the loop that saves as it goes.

    ``--steps``/``--batch``/``--lr`` override the checkpoint's values, which override ``defaults``.
    """

    def __init__(
        self, opts: RunOptions, stage: str, device: torch.device, defaults: tuple[int, int, float]
    ) -> None:
        self.opts, self.stage, self.device = opts, stage, device
        self.path = opts.out / "ckpt" / f"{stage}.pt"
        self.ckpt = load_checkpoint(self.path)
        if self.ckpt is not None and self.ckpt["config"] != opts.config:
            raise SystemExit(f"{self.path} was made with another model config; use another --out")
        prev = self.ckpt or {}
        self.total: int = opts.steps or prev.get("total_steps", defaults[0])
        self.batch: int = opts.batch or prev.get("batch", defaults[1])
        self.lr: float = opts.lr or prev.get("lr", defaults[2])
        self.start: int = prev.get("step", 0)
        self.wall: float = prev.get("wall_seconds", 0.0)
        self.commands: list[dict[str, str]] = [*prev.get("commands", []), opts.record]
        self.progress = Progress(stage, opts.log_every, prev.get("loss", float("nan")))
        self.noise = torch.Generator(device).manual_seed(opts.seed + 1)
        self.sampler = torch.Generator().manual_seed(opts.seed + 2)
        self.pool = 0
        self.modules: dict[str, torch.nn.Module] = {}
        self.params: list[torch.nn.Parameter] = []

    def setup(self, modules: dict[str, torch.nn.Module], ema_decay: float, weight_decay: float) -> None:
        """AdamW and EMA over the modules' parameters (in order), restored from the checkpoint if any."""
        self.modules = modules
        self.params = [p for m in modules.values() for p in m.parameters()]
        self.ema = Ema(self.params, ema_decay)
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=weight_decay)
        if self.ckpt is not None:
            for name, module in modules.items():
                module.load_state_dict(self.ckpt[name])
            self.ema.load_state_dict(self.ckpt["ema"])
            self.opt.load_state_dict(self.ckpt["optimizer"])
            restore_rng(self.ckpt["rng"], self.noise, self.sampler)
            log.info("%s: resuming from step %d of %d", self.stage, self.start, self.total)
        sizes = ", ".join(
            f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M" for n, m in modules.items()
        )
        log.info(
            "%s: %s parameters, batch %d, %d scenes, device %s",
            self.stage,
            sizes,
            self.batch,
            self.pool,
            self.device,
        )

    def meta(self, step: int, clock: Clock) -> dict[str, Any]:
        """JSON-friendly facts of the run so far (for ``training.json`` and the model card)."""
        return {
            "stage": self.stage,
            "step": step,
            "total_steps": self.total,
            "batch": self.batch,
            "lr": self.lr,
            "loss": self.progress.loss,
            "device": self.device.type,
            "wall_seconds": self.wall + clock.elapsed,
            "seed": self.opts.seed,
            "pool": self.pool,
            "commands": self.commands,
        }

    def save(self, step: int, clock: Clock) -> None:
        state = self.meta(step, clock) | {name: m.state_dict() for name, m in self.modules.items()}
        state |= {
            "config": self.opts.config,
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": rng_state(self.noise, self.sampler),
        }
        save_checkpoint(self.path, state)

    def train(self, clock: Clock, warmup: int, loss_fn: Callable[[], torch.Tensor]) -> int:
        """Run steps of ``loss_fn`` (AdamW, gradient clipping at 1, warm-up + cosine, EMA) until the step
        target or the time limit, checkpointing on the way and at the end; returns the step reached."""
        step = self.start
        while step < self.total and not clock.out_of_time():
            lr = lr_at(step, self.total, self.lr, warmup)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss = loss_fn()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            step += 1
            self.ema.update(self.params, step)
            self.progress.update(step, self.total, loss, clock, f" lr {lr:.2e}")
            if clock.save_due():
                self.progress.flush(step, self.total, clock)
                self.save(step, clock)
        self.progress.flush(step, self.total, clock)
        self.save(step, clock)
        if step < self.total:
            log.info(
                "%s: stopped at the time limit at step %d of %d; run the same command to continue",
                self.stage,
                step,
                self.total,
            )
        return step
