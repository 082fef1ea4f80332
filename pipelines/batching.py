"""Cross-user batched txt2img: compatible queued jobs run as one diffusers call, each image as if alone.

Jobs share a call when their :func:`batch_key` is equal. The call gets one row per image: the rows' prompt
embeddings stacked (each job conditioned as the solo runner does, prompt editing switched per step for
each job on its own), and one CPU generator per image, so the initial noise and every noise draw of a
sampler come from the image's own seed. Rows do not interact in the UNet or the samplers, so each image
equals its solo run (within float rounding of batched kernels; the tests measure it).

A cancelled job's rows leave the batch after the step it was cancelled in: the latents, the stacked
embeddings, the scheduler's per-image state and the generator list are all sliced, and the other jobs go
on unchanged. Blocking: call only on the worker thread, with the jobs' adapters already applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.cache import LoadedModel
from models.families import Family
from pipelines.conditioning import Encoded, ScheduledConditioning
from pipelines.jobs import JobKind, JobSpec
from pipelines.prompts import extract_networks
from pipelines.samplers import check_sampler, make_scheduler
from pipelines.text_to_image import generators_for, to_pil
from storage.errors import InvalidRequestError

__all__ = ["UNBATCHABLE_SAMPLERS", "RowHooks", "batch_key", "run_batch", "run_batch_arrays"]

log = logging.getLogger(__name__)

#: Samplers that run alone. Every sampler that draws noise (Euler a, Euler, DPM++ 2M SDE) draws it per
#: row from the row's own generator (``randn_tensor`` with a generator list), so none needs this for its
#: seeding; but DDIM (diffusers' default config: ``clip_sample``, "leading" spacing) amplifies the ~1e-6
#: differences of batched kernels: on the tiny models a 1e-6 change of the initial noise moves a 20-step
#: image by 2e-2, and its batched images were up to 1.0 off their solo runs (the others: under 5e-6).
UNBATCHABLE_SAMPLERS: frozenset[str] = frozenset({"DDIM"})


def batch_key(spec: JobSpec) -> tuple[object, ...] | None:
    """What jobs must share to run as one call; None when ``spec`` must run alone.

    Only plain txt2img batches (hires fix and the image-conditioned modes run alone). The key holds:

    - ``kind`` and ``model``: one pipeline.
    - the VAE (the sha256 of the job's last VAE adapter, the one the runtime applies; else the ``vae``
      name; None for the model's own): it decodes every row.
    - the other adapters in the job's order, each as (kind, sha256, UNet weight, text-encoder weight),
      plus the name for embeddings (the prompt's word for it). Order is kept: the runtime sums LoRA
      deltas in that order (float sums depend on it), hypernetworks compose in it and embeddings get
      their tokens in it, so another order is not guaranteed to give the same bits.
    - ``width``, ``height``: the latents' shape; ``steps`` and ``sampler``: one scheduler for all rows;
      ``cfg``: one guidance scale in the pipeline.

    Prompt, negative prompt, seed, batch size and clip skip may differ: they only change a job's own
    rows (its embeddings and generators). Prompts needing different 75-token chunk counts share a key
    but :func:`run_batch` runs them in separate calls.
    """
    if spec.kind != JobKind.txt2img or spec.hires_scale or spec.controls or spec.init_image:
        return None
    try:
        sampler = check_sampler(spec.sampler)
    except InvalidRequestError:
        return None
    if sampler in UNBATCHABLE_SAMPLERS:
        return None
    vaes = spec.adapters_of("vae")
    vae = ("sha256", vaes[-1].sha256) if vaes else (None if spec.vae is None else ("name", spec.vae))
    adapters = tuple(
        (
            ref.kind,
            ref.sha256,
            ref.weight if ref.unet_weight is None else ref.unet_weight,
            ref.weight if ref.te_weight is None else ref.te_weight,
            ref.name if ref.kind == "embedding" else "",
        )
        for ref in spec.adapters
        if ref.kind != "vae"
    )
    size = (spec.width, spec.height)
    return (str(spec.kind), spec.model, vae, adapters, *size, spec.steps, sampler, float(spec.cfg))


@dataclass
class RowHooks:
    """One job's hooks inside a batched call (all optional).

    Attributes:
        on_step: ``(steps done, steps in all)`` after each completed sampling step.
        cancelled: Checked before the job's call and after every step (Heun: every half step); True
            removes the job's rows and its result is None.
        on_latents: ``(steps done, this job's rows of the latents)`` after each completed step, for
            previews; a view into the batch: read it, do not change it.

    The hooks must not raise: an exception stops the whole call, every job in it (use ``cancelled`` to
    stop one job).
    """

    on_step: Callable[[int, int], None] | None = None
    cancelled: Callable[[], bool] | None = None
    on_latents: Callable[[int, torch.Tensor], None] | None = None


class _AllCancelled(Exception):
    """Raised from the step callback to stop a call whose jobs were all cancelled."""


@dataclass(eq=False)
class _Job:
    spec: JobSpec
    hooks: RowHooks
    conditioning: ScheduledConditioning
    texts: tuple[str, str] = ("", "")
    images: np.ndarray | None = None

    def is_cancelled(self) -> bool:
        return self.hooks.cancelled is not None and bool(self.hooks.cancelled())


@dataclass
class _Call:
    """One pipeline call over jobs with the same chunk count: the live rows and the step callback."""

    jobs: list[_Job]
    xl: bool
    steps: int
    generators: list[torch.Generator] = field(default_factory=list)
    done: int = 0
    calls: int = 0  # callback invocations (Heun calls back twice per step)

    def __post_init__(self) -> None:
        for job in self.jobs:
            job.texts = job.conditioning.texts_at(0)
            self.generators.extend(generators_for(job.spec))

    @property
    def rows(self) -> int:
        return sum(job.spec.batch for job in self.jobs)

    def _encoded(self) -> tuple[list[Encoded], list[Encoded], list[int]]:
        pos = [job.conditioning.encoded(job.texts[0]) for job in self.jobs]
        neg = [job.conditioning.encoded(job.texts[1]) for job in self.jobs]
        return pos, neg, [job.spec.batch for job in self.jobs]

    def initial_kwargs(self) -> dict[str, Any]:
        pos, neg, batches = self._encoded()
        kwargs = {
            "prompt_embeds": _rows([e.embeds for e in pos], batches),
            "negative_prompt_embeds": _rows([e.embeds for e in neg], batches),
        }
        if self.xl:
            kwargs["pooled_prompt_embeds"] = _rows([_pooled(e) for e in pos], batches)
            kwargs["negative_pooled_prompt_embeds"] = _rows([_pooled(e) for e in neg], batches)
        return kwargs

    @property
    def tensor_inputs(self) -> list[str]:
        extra = ["add_text_embeds", "add_time_ids"] if self.xl else []
        return ["latents", "prompt_embeds", *extra]

    def callback(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``callback_on_step_end``: report progress, drop cancelled jobs, switch edited prompts."""
        self.calls += 1
        # the pipeline's own progress rule: Heun calls back twice a step, PLMS once more at the start
        order = int(getattr(pipe.scheduler, "order", 1))
        last = len(pipe.scheduler.timesteps) - 1
        warmup = last + 1 - self.steps * order
        if step == last or (step + 1 > warmup and (step + 1) % order == 0):
            self.done += 1
            self._report(kwargs["latents"])
        keep = [job for job in self.jobs if not job.is_cancelled()]
        if not keep:
            raise _AllCancelled
        dropped = len(keep) < len(self.jobs)
        if dropped:
            self._drop(pipe, keep, kwargs)
        changed = False
        for job in self.jobs:
            following = job.conditioning.texts_at(step + 1)
            changed |= following != job.texts
            job.texts = following
        if dropped or changed:
            self._restack(pipe, kwargs)
        return kwargs

    def _report(self, latents: torch.Tensor) -> None:
        start = 0
        for job in self.jobs:
            if job.hooks.on_step is not None:
                job.hooks.on_step(self.done, self.steps)
            if job.hooks.on_latents is not None:
                job.hooks.on_latents(self.done, latents[start : start + job.spec.batch])
            start += job.spec.batch

    def _drop(self, pipe: Any, keep: list[_Job], kwargs: dict[str, Any]) -> None:
        """Remove the rows of the jobs not in ``keep`` from everything that has a batch dimension."""
        rows: list[int] = []
        start = 0
        for job in self.jobs:
            if job in keep:
                rows.extend(range(start, start + job.spec.batch))
            start += job.spec.batch
        latents = kwargs["latents"]
        index = torch.tensor(rows, device=latents.device)
        _slice_scheduler_state(pipe.scheduler, latents.shape, index)
        kwargs["latents"] = latents.index_select(0, index)
        # the pipeline passes this very list to scheduler.step: row i keeps generator i
        self.generators[:] = [self.generators[i] for i in rows]
        log.debug("batch: %d of %d rows left after step %d", len(rows), start, self.done)
        self.jobs = keep

    def _restack(self, pipe: Any, kwargs: dict[str, Any]) -> None:
        """Rebuild the embeddings the UNet reads for the live rows and their current texts."""
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", True))
        pos, neg, batches = self._encoded()
        current = kwargs["prompt_embeds"]
        embeds = _stack([e.embeds for e in pos], [e.embeds for e in neg], batches, cfg)
        kwargs["prompt_embeds"] = embeds.to(current.device, current.dtype)
        if self.xl:
            current = kwargs["add_text_embeds"]
            pooled = _stack([_pooled(e) for e in pos], [_pooled(e) for e in neg], batches, cfg)
            kwargs["add_text_embeds"] = pooled.to(current.device, current.dtype)
            # the pipeline tiles its (negative, positive) time ids once per row: tile them for the rows left
            halves = 2 if cfg else 1
            kwargs["add_time_ids"] = kwargs["add_time_ids"][:halves].repeat(sum(batches), 1)


def _pooled(encoded: Encoded) -> torch.Tensor:
    if encoded.pooled is None:
        raise ValueError("an SDXL model's conditioning has no pooled embeddings")
    return encoded.pooled


def _rows(tensors: Sequence[torch.Tensor], batches: Sequence[int]) -> torch.Tensor:
    """Each job's one-row tensor repeated for its images, all jobs stacked in order."""
    return torch.cat([t.repeat(b, *(1,) * (t.dim() - 1)) for t, b in zip(tensors, batches, strict=True)])


def _stack(
    pos: Sequence[torch.Tensor], neg: Sequence[torch.Tensor], batches: Sequence[int], cfg: bool
) -> torch.Tensor:
    """What the pipeline's loop holds: ``cat([negatives..., positives...])`` under CFG, else positives."""
    if not cfg:
        return _rows(pos, batches)
    return torch.cat([_rows(neg, batches), _rows(pos, batches)])


def _slice_scheduler_state(scheduler: Any, shape: torch.Size, index: torch.Tensor) -> None:
    """Keep rows ``index`` of the scheduler's per-image state.

    Multistep samplers keep earlier model outputs and samples (DPM-Solver's ``model_outputs``, UniPC's
    ``last_sample``, LMS's ``derivatives``, Heun's ``prev_derivative``/``sample``, PLMS's ``ets``). They
    are found generically: tensors, or lists/tuples holding tensors, shaped exactly like the latents.
    Matching the whole shape, not just the first dimension, leaves the noise schedule alone (``sigmas``,
    ``timesteps`` are 1-D and could have as many entries as the batch has rows).
    """

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.shape == shape:
            return value.index_select(0, index.to(value.device))
        return value

    for name, value in list(vars(scheduler).items()):
        if isinstance(value, torch.Tensor):
            scheduler.__dict__[name] = cut(value)
        elif isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value):
            scheduler.__dict__[name] = type(value)(cut(v) for v in value)


def _check(specs: Sequence[JobSpec], hooks: Sequence[RowHooks] | None) -> list[RowHooks]:
    if not specs:
        raise ValueError("run_batch needs at least one job")
    keys = {batch_key(spec) for spec in specs}
    if None in keys or len(keys) > 1:
        raise ValueError("these jobs cannot share a call: their batch keys differ or one is not batchable")
    if hooks is None:
        return [RowHooks() for _ in specs]
    if len(hooks) != len(specs):
        raise ValueError(f"{len(hooks)} hooks for {len(specs)} jobs")
    return list(hooks)


def _run_call(model: LoadedModel, call: _Call) -> None:
    """One pipeline call; each surviving job gets its images, a cancelled one keeps None."""
    spec = call.jobs[0].spec
    pipe = model.pipeline(model.base_class_name)
    pipe.scheduler = make_scheduler(spec.sampler, model.default_scheduler_config)
    log.debug("batch call: %d jobs, %d rows", len(call.jobs), call.rows)
    try:
        output = pipe(
            **call.initial_kwargs(),
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.steps,
            guidance_scale=spec.cfg,
            generator=call.generators,
            output_type="np",
            callback_on_step_end=call.callback,
            callback_on_step_end_tensor_inputs=call.tensor_inputs,
        )
    except _AllCancelled:
        log.debug("batch call stopped: every job was cancelled after %d callbacks", call.calls)
        return
    images: np.ndarray = output.images
    start = 0
    for job in call.jobs:
        job.images = images[start : start + job.spec.batch]
        start += job.spec.batch


def run_batch_arrays(
    model: LoadedModel, specs: Sequence[JobSpec], hooks: Sequence[RowHooks] | None = None
) -> list[np.ndarray | None]:
    """Run jobs with one :func:`batch_key` together; per job its images or None if it was cancelled.

    Jobs whose prompts need different numbers of 75-token chunks run in separate calls, one after
    another (padding a prompt with empty chunks would change its image).

    Returns:
        Per job, in order: float32 ``(spec.batch, height, width, 3)`` in [0, 1], or None.

    Raises:
        ValueError: the jobs do not share one batch key, or ``hooks`` does not match ``specs``.
    """
    row_hooks = _check(specs, hooks)
    jobs = []
    for spec, hook in zip(specs, row_hooks, strict=True):
        prompt, negative = extract_networks(spec.prompt)[0], extract_networks(spec.negative_prompt)[0]
        conditioning = ScheduledConditioning(model, prompt, negative, spec.steps, spec.batch, spec.clip_skip)
        jobs.append(_Job(spec, hook, conditioning))
    by_chunks: dict[int, list[_Job]] = {}
    for job in jobs:
        by_chunks.setdefault(job.conditioning.n_chunks, []).append(job)
    xl = model.family == Family.sdxl
    for group in by_chunks.values():
        live = [job for job in group if not job.is_cancelled()]
        if live:
            _run_call(model, _Call(live, xl, live[0].spec.steps))
    return [job.images for job in jobs]


def run_batch(
    model: LoadedModel, specs: Sequence[JobSpec], hooks: Sequence[RowHooks] | None = None
) -> list[list[Image.Image] | None]:
    """:func:`run_batch_arrays` as PIL images: per job exactly ``spec.batch`` images, or None if cancelled."""
    return [None if arrays is None else to_pil(arrays) for arrays in run_batch_arrays(model, specs, hooks)]
