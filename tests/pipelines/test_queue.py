"""The queue and the worker through the engine, on the tiny models: durability, limits, fairness,
batching, cancel, progress and previews, faults."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from pipelines.engine import Engine, JobResult
from pipelines.events import Cancelled, Finished, JobEvent, Progress, Queued, Started
from pipelines.execution import OUT_OF_MEMORY
from pipelines.jobs import JobSpec
from pipelines.settings import Settings
from pipelines.worker import STUCK, WorkerOptions
from storage import jobs as job_rows
from storage.errors import GenerationError, NotFoundError, QueueFullError, QuotaExceededError
from storage.tables import Job

SMALL: dict[str, Any] = {"model": "tiny-sd15", "width": 64, "height": 64, "steps": 4}


def _spec(user: int, seed: int, prompt: str = "a red circle", **kw: Any) -> JobSpec:
    return JobSpec(prompt=prompt, seed=seed, user_id=user, **{**SMALL, **kw})


@pytest.fixture
async def make_engine(settings: Settings) -> AsyncIterator[Any]:
    engines: list[Engine] = []

    async def make(**changes: Any) -> Engine:
        start_worker = changes.pop("start_worker", True)
        engine = Engine(settings.model_copy(update=changes), start_worker=start_worker)
        await engine.open()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


def _pixels(result: JobResult) -> list[np.ndarray]:
    return [np.asarray(Image.open(image.path).convert("RGB"), dtype=np.int16) for image in result.images]


async def _status(engine: Engine, job_id: int) -> Job:
    async with engine.db.sessions() as session:
        job = await job_rows.get_job(session, job_id)
    assert job is not None
    return job


async def test_submit_is_durable_and_answers_with_a_position(make_engine: Any) -> None:
    engine = await make_engine(start_worker=False)
    first, _ = await engine.submit(_spec(1, 1))
    second, _ = await engine.submit(_spec(1, 2))
    third, _ = await engine.submit(_spec(2, 3))
    assert (first.position, second.position, third.position) == (1, 2, 2)  # user 2 goes before user 1's 2nd
    assert (await _status(engine, second.job_id)).status == "queued"
    status, before = engine.status(second.job_id), engine.status(third.job_id)
    assert status is not None and status.position == 3
    assert before is not None and status.eta_s is not None and before.eta_s is not None
    assert status.eta_s >= before.eta_s >= 0


async def test_limits_refuse_politely_and_store_nothing(make_engine: Any) -> None:
    engine = await make_engine(start_worker=False, queue_per_user=2, queue_max=3)
    await engine.submit(_spec(1, 1))
    await engine.submit(_spec(1, 2))
    with pytest.raises(QuotaExceededError, match="2 jobs waiting or running"):
        await engine.submit(_spec(1, 3))
    await engine.submit(_spec(2, 4))
    with pytest.raises(QueueFullError, match="The queue is full"):
        await engine.submit(_spec(3, 5))
    async with engine.db.sessions() as session:
        assert len((await session.scalars(select(Job))).all()) == 3


async def test_cancel_queued_only_by_owner_or_guild_admin(make_engine: Any) -> None:
    engine = await make_engine(start_worker=False)
    submitted, _ = await engine.submit(_spec(1, 1, guild_id=50))
    with pytest.raises(NotFoundError):
        await engine.cancel(submitted.job_id, by_user=2)
    with pytest.raises(NotFoundError):
        await engine.cancel(submitted.job_id, by_user=2, admin_guilds=[51])
    assert await engine.cancel(submitted.job_id, by_user=2, admin_guilds=[50])
    assert (await _status(engine, submitted.job_id)).status == "cancelled"
    assert engine.status(submitted.job_id) is None
    assert not await engine.cancel(submitted.job_id, by_user=1)  # already over


async def test_batched_images_equal_solo_runs(make_engine: Any) -> None:
    specs = [
        _spec(1, 11, "a red circle"),
        _spec(2, 12, "a (blue:1.3) square", negative_prompt="blurry"),
        _spec(3, 13, "a [cat:dog:0.5]", batch=2),
        _spec(4, 14, "a green star"),
    ]
    solo = await make_engine(batch_max_images=1)
    solo_results = [await solo.generate(spec) for spec in specs]
    batched = await make_engine(start_worker=False)
    submitted = [(await batched.submit(spec))[0].job_id for spec in specs]
    listeners = [batched.hub.subscribe(job_id) for job_id in submitted]
    batched.worker.start()
    results = [await batched.wait(job_id) for job_id in submitted]
    for listener in listeners:
        started = [e for e in _drain(listener) if isinstance(e, Started)]
        assert started and started[0].batch_jobs == 4  # one pipeline call for all four
    for alone, together in zip(solo_results, results, strict=True):
        for a, b in zip(_pixels(alone), _pixels(together), strict=True):
            assert np.abs(a - b).max() <= 1  # uint8 rounding of values equal within 1e-5


def _drain(queue: asyncio.Queue[JobEvent]) -> list[JobEvent]:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


async def test_fairness_newcomers_finish_before_the_heavy_users_fifth_job(make_engine: Any) -> None:
    engine = await make_engine(start_worker=False, queue_per_user=40, batch_max_images=2)
    heavy = [(await engine.submit(_spec(1, i, steps=2)))[0].job_id for i in range(40)]
    listener = engine.hub.subscribe(None)
    engine.worker.start()
    while not engine.queue.running():  # the heavy user's first batch has started
        await asyncio.sleep(0.01)
    newcomers = [(await engine.submit(_spec(100 + n, n, steps=2)))[0].job_id for n in range(10)]
    finished: list[int] = []
    while len(finished) < 50:
        event = await asyncio.wait_for(listener.get(), 120)
        if isinstance(event, Finished):
            finished.append(event.job_id)
    fifth = finished.index(heavy[4])
    assert all(finished.index(job) < fifth for job in newcomers), finished


async def test_cancel_a_running_solo_job_within_a_step(make_engine: Any) -> None:
    engine = await make_engine()
    steps: list[int] = []
    cancelled = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_step(done: int, total: int) -> None:
        steps.append(done)
        if done == 3:
            loop.call_soon_threadsafe(cancelled.set)
            time.sleep(0.3)  # let the cancel land while this step is still "running"

    submitted, _ = await engine.submit(_spec(1, 1, steps=40), on_step=on_step)
    events = engine.hub.subscribe(submitted.job_id)
    await cancelled.wait()
    assert await engine.cancel(submitted.job_id, by_user=1)
    with pytest.raises(GenerationError, match="cancelled"):
        await engine.wait(submitted.job_id)
    await asyncio.sleep(0.5)
    assert max(steps) <= 4  # stopped at the next step
    job = await _status(engine, submitted.job_id)
    assert job.status == "cancelled"
    assert any(isinstance(e, Cancelled) for e in _drain(events))
    assert engine.status(submitted.job_id) is None and not engine.queue.running()
    later = await engine.generate(_spec(1, 2))  # the worker carries on
    assert later.images


async def test_cancel_one_job_inside_a_running_batch(make_engine: Any) -> None:
    engine = await make_engine(start_worker=False)
    specs = [
        _spec(1, 21, steps=12),
        _spec(2, 22, "a blue square", steps=12),
        _spec(3, 23, "a star", steps=12),
    ]
    victim_steps: list[int] = []
    go = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_step(done: int, total: int) -> None:
        victim_steps.append(done)
        if done == 2:
            loop.call_soon_threadsafe(go.set)
            time.sleep(0.3)

    ids = []
    for i, spec in enumerate(specs):
        submitted, _ = await engine.submit(spec, on_step=on_step if i == 1 else None)
        ids.append(submitted.job_id)
    engine.worker.start()
    await go.wait()
    assert await engine.cancel(ids[1], by_user=2)
    kept = [await engine.wait(ids[0]), await engine.wait(ids[2])]
    assert max(victim_steps) <= 3
    assert (await _status(engine, ids[1])).status == "cancelled"
    solo = await make_engine(batch_max_images=1)
    for spec, result in zip([specs[0], specs[2]], kept, strict=True):
        alone = await solo.generate(spec)
        for a, b in zip(_pixels(alone), _pixels(result), strict=True):
            assert np.abs(a - b).max() <= 1


async def test_progress_events_and_previews(make_engine: Any) -> None:
    engine = await make_engine(preview_every=2)
    submitted, _ = await engine.submit(
        JobSpec(prompt="a red circle", model="shapes", steps=10, seed=3, user_id=1)
    )
    events = [event async for event in engine.events(submitted.job_id)]
    kinds = [type(e) for e in events]
    assert kinds[-1] is Finished and Started in kinds
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and progress[-1].step == progress[-1].total == 10
    previews = [e.preview for e in progress if e.preview is not None]
    assert previews
    with Image.open(io.BytesIO(previews[-1])) as image:
        assert image.mode == "RGB" and max(image.size) <= 256


async def test_queued_jobs_hear_their_position_change(make_engine: Any) -> None:
    engine = await make_engine(start_worker=False, batch_max_images=1)
    first, _ = await engine.submit(_spec(1, 1))
    second, _ = await engine.submit(_spec(1, 2))
    listener = engine.hub.subscribe(second.job_id)
    engine.worker.start()
    await engine.wait(second.job_id)
    positions = [e.position for e in _drain(listener) if isinstance(e, Queued)]
    assert positions and positions[0] == 1  # announced when the first job started


async def test_recovery_requeues_interrupted_jobs_and_gives_up_after_the_attempts(
    make_engine: Any, settings: Settings
) -> None:
    engine = await make_engine(start_worker=False, job_attempts=2)
    ids = [(await engine.submit(_spec(1, seed)))[0].job_id for seed in (1, 2, 3)]
    async with engine.db.sessions.begin() as session:  # two were running when the process died
        for job_id in ids[:2]:
            await job_rows.mark_running(session, job_id)
        job = await session.get(Job, ids[1])
        assert job is not None
        job.attempts = 2
    await engine.close()
    restarted = Engine(settings.model_copy(update={"job_attempts": 2}), recover=True)
    async with restarted:
        first = await restarted.wait(ids[0])
        third = await restarted.wait(ids[2])
        with pytest.raises(GenerationError, match="interrupted 2 times"):
            await restarted.wait(ids[1])
    assert first.images and third.images
    assert (await _status_of(restarted, settings, ids[0])).attempts == 2


async def _status_of(engine: Engine, settings: Settings, job_id: int) -> Job:
    async with Engine(settings, start_worker=False) as fresh:
        return await _status(fresh, job_id)


async def test_out_of_memory_batch_reruns_one_by_one(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine(start_worker=False)

    def no_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.worker.executor, "run_batch", no_memory)
    ids = [(await engine.submit(_spec(user, user)))[0].job_id for user in (1, 2)]
    engine.worker.start()
    results = [await engine.wait(job_id) for job_id in ids]
    assert all(len(r.images) == 1 for r in results)


async def test_out_of_memory_alone_retries_image_by_image_then_gives_a_sentence(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.text_to_image as t2i

    engine = await make_engine()
    expected = _pixels(await engine.generate(_spec(1, 7, batch=2)))
    real = t2i.generate_arrays

    def small_only(model: Any, spec: JobSpec, on_step: Any = None) -> np.ndarray:
        if spec.batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real(model, spec, on_step)

    monkeypatch.setattr(t2i, "generate_arrays", small_only)
    retried = await engine.generate(_spec(1, 7, batch=2))
    assert [r.seed for r in retried.images] == [7, 8]
    for a, b in zip(expected, _pixels(retried), strict=True):
        assert np.abs(a - b).max() <= 1

    def never(*args: Any, **kwargs: Any) -> np.ndarray:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(t2i, "generate_arrays", never)
    with pytest.raises(GenerationError, match="ran out of memory") as caught:
        await engine.generate(_spec(1, 9))
    assert str(caught.value) == OUT_OF_MEMORY


async def test_a_job_past_its_time_limit_fails_and_the_next_runs(make_engine: Any) -> None:
    engine = await make_engine(job_timeout_s=0.05)

    def slow(done: int, total: int) -> None:
        time.sleep(0.03)

    with pytest.raises(GenerationError, match="second limit"):
        await engine.generate(_spec(1, 1, steps=20), on_step=slow)
    assert (await _status(engine, 1)).status == "failed"
    engine.worker.options = WorkerOptions(job_timeout_s=600)
    assert (await engine.generate(_spec(1, 2))).images


async def test_watchdog_gives_up_a_stuck_job_and_the_queue_goes_on(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.text_to_image as t2i

    engine = await make_engine(worker_stuck_s=0.4)
    real = t2i.generate_arrays

    def hang_once(model: Any, spec: JobSpec, on_step: Any = None) -> np.ndarray:
        if spec.seed == 666:
            time.sleep(3)  # no step for longer than the watchdog allows
        return real(model, spec, on_step)

    monkeypatch.setattr(t2i, "generate_arrays", hang_once)
    started = time.monotonic()
    with pytest.raises(GenerationError) as caught:
        await engine.generate(_spec(1, 666))
    assert str(caught.value) == STUCK and engine.worker.stuck
    assert time.monotonic() - started < 2.5  # the user heard before the thread came back
    job = await _status(engine, 1)
    assert job.status == "failed" and job.error == STUCK
    result = await engine.generate(_spec(2, 5))  # the queue goes on once the thread is back
    assert result.images and not engine.worker.stuck
    assert (await _status(engine, 1)).status == "failed"  # the late thread changed nothing


async def test_the_event_loop_stays_responsive_while_the_worker_generates(make_engine: Any) -> None:
    engine = await make_engine()
    await engine.generate(_spec(1, 1))  # warm
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await engine.generate(_spec(1, 2, steps=30))
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    # the loop kept ticking through the whole job: far more ticks than a blocked loop could make
    assert len(lags) >= elapsed / 0.1, (len(lags), elapsed)


async def test_sync_racing_submits_indexes_each_job_once(make_engine: Any) -> None:
    """The worker's poll for other processes' jobs runs beside submits: no job is indexed twice, no error."""
    engine = await make_engine(start_worker=False, queue_per_user=100, queue_per_guild=1000)
    stop = asyncio.Event()

    async def poll() -> int:
        found = 0
        while not stop.is_set():
            found += await engine.queue.sync()
            await asyncio.sleep(0)
        return found

    poller = asyncio.create_task(poll())
    submitted = await asyncio.gather(*(engine.submit(_spec(user % 7, user)) for user in range(60)))
    stop.set()
    assert await poller == 0  # every job was this process's own: none may be "found" by the poll
    ids = [entry.job_id for entry, _ in submitted]
    assert len(set(ids)) == 60
    assert sorted(job.job_id for job in engine.queue.scheduler.order()) == sorted(ids)


async def test_a_refused_submit_leaves_no_input_images(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input images are stored only for queued jobs: a refusal (a limit, a busy database) removes them."""
    from pipelines.inputs import JobInputs
    from storage.db import DATABASE_BUSY, DatabaseBusyError

    engine = await make_engine(start_worker=False, queue_per_user=1)
    await engine.submit(_spec(1, 1))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buffer, format="PNG")
    img2img = _spec(1, 2, kind="img2img")
    with pytest.raises(QuotaExceededError):  # refused before anything is stored
        await engine.submit(img2img, JobInputs(init=buffer.getvalue()))
    assert not list(engine.files.iter_hashes())

    async def busy(spec: JobSpec) -> None:
        raise DatabaseBusyError(DATABASE_BUSY)

    monkeypatch.setattr(engine.queue, "submit", busy)
    with pytest.raises(DatabaseBusyError):  # refused after the images were stored: they go again
        await engine.submit(_spec(2, 3, kind="img2img"), JobInputs(init=buffer.getvalue()))
    assert not list(engine.files.iter_hashes())
