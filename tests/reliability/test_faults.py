"""Engine-side faults injected under the real bot on the Discord double (issue 8, "Faults").

Each fault has a stable id (the pytest id) and one end-to-end test: the user-facing outcome is read
from the job's Discord message, what is stored is read from the database and the file store, and the
bot then serves the next request. Unit-level fault handling (OOM on a shared batch, a job past its time
limit, a stuck worker, failed file writes) is in tests/pipelines/test_queue.py and
tests/storage/test_files.py.

| id                 | fault injected                                                   |
| runner-exception   | the txt2img runner raises RuntimeError                           |
| oom-retry-succeeds | CUDA out of memory for any call of 2 images (1 fits)             |
| oom-persists       | CUDA out of memory for every call                                |
| db-locked-short    | a second sqlite3 connection holds the write lock < busy timeout  |
| db-locked-long     | ... holds it (EXCLUSIVE) > busy timeout                          |
| db-locked-cancel   | ... holds it > busy timeout while a queued job is cancelled      |
| disk-full-output   | ENOSPC writing the second PNG of a job (after a short write)     |
| disk-full-upload   | ENOSPC writing an uploaded LoRA into the file store              |
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

import pipelines.text_to_image as t2i
from pipelines.engine import Engine
from pipelines.events import Finished
from pipelines.execution import DISK_FULL, OUT_OF_MEMORY
from pipelines.jobs import JobSpec
from pipelines.settings import Settings
from storage.db import DATABASE_BUSY, DatabaseBusyError, retry_locked
from storage.files import STORAGE_FULL
from storage.tables import Asset, Job, JobStatus
from storage.tables import Image as ImageRow
from tests.cogs.conftest import PURPLE_LORA, upload_lora, wait_job_message
from tests.cogs.replies import count_rows, sentence, slash
from tests.discord_double import DiscordDouble, Guild, InteractionRecord, StoredMessage, User

BUSY_TIMEOUT_MS = 1000  # SQLite's wait for another writer's lock, shortened from 15 s for the tests
BUSY_WAIT_S = 0.5  # how long a submit retries after that
STEPS = 4


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    """The bot's engine (as in tests/cogs), with the database's waits shortened."""
    eng = Engine(settings, recover=True)
    eng.db.busy_timeout_ms = BUSY_TIMEOUT_MS
    eng.queue.limits = replace(eng.queue.limits, busy_wait_s=BUSY_WAIT_S)
    async with eng:
        yield eng


@dataclass
class Served:
    """The running bot's world: the Discord double, the engine, a guild and two members."""

    double: DiscordDouble
    engine: Engine
    guild: Guild
    alice: User
    bob: User

    async def imagine(self, seed: int, count: int = 1, user: User | None = None) -> InteractionRecord:
        return await slash(
            self.double, user or self.alice, self.guild, "imagine", prompt="a red circle", steps=STEPS,
            seed=seed, count=count,
        )  # fmt: skip

    async def message(self, record: InteractionRecord) -> StoredMessage:
        return await wait_job_message(self.double, record)

    async def still_serves(self, seed: int, user: User | None = None) -> None:
        """The bot still serves: a fresh /imagine comes back with its image."""
        message = await self.message(await self.imagine(seed, user=user))
        assert message.attachments and not message.content, message.content
        with Image.open(io.BytesIO(message.file_bytes(0))) as png:
            assert f"Seed: {seed}" in png.info["parameters"]


@pytest.fixture
def served(double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, bob: User) -> Served:
    return Served(double, engine, guild, alice, bob)


# ---- helpers ------------------------------------------------------------------------------------------


def _failed_job(message: StoredMessage) -> tuple[int, str]:
    """The job id and the sentence of a "Job N failed: <sentence>" message."""
    found = re.fullmatch(r"Job (\d+) failed: (.+)", message.content or "")
    assert found, message.content
    assert not message.attachments
    return int(found[1]), found[2]


async def _job(engine: Engine, job_id: int) -> tuple[Job, int]:
    """The job's row and how many image rows it has."""
    async with engine.db.sessions() as session:
        job = await session.get(Job, job_id)
        images = (await session.scalars(select(ImageRow).where(ImageRow.job_id == job_id))).all()
    assert job is not None
    return job, len(images)


def _store(engine: Engine) -> tuple[set[str], list[str]]:
    """The stored hashes and whatever lies in the store's temp folder."""
    temp = engine.files.temp_dir
    return set(engine.files.iter_hashes()), sorted(p.name for p in temp.iterdir()) if temp.is_dir() else []


def _seeds(message: StoredMessage) -> list[int]:
    """The seeds of the single images attached (the grid left out)."""
    texts = []
    for index, attachment in enumerate(message.attachments):
        with Image.open(io.BytesIO(message.file_bytes(index))) as png:
            texts.append("" if "grid" in attachment["filename"] else png.info["parameters"])
    return [int(found[1]) for text in texts if (found := re.search(r"Seed: (\d+)", text))]


# ---- runner exception ---------------------------------------------------------------------------------


async def test_runner_exception(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """id runner-exception: the job fails with the generic sentence and a ref; the traceback is logged."""
    real = t2i.run

    def run(ctx: Any) -> Any:
        if ctx.spec.seed == 666:
            raise RuntimeError("boom in /srv/dreamcord/secret.py")
        return real(ctx)

    monkeypatch.setattr(t2i, "run", run)
    caplog.set_level(logging.ERROR)
    job_id, reason = _failed_job(await served.message(await served.imagine(666)))
    found = re.fullmatch(
        r"Something broke on our side while generating \(ref ([0-9a-f]{6})\); the error was logged\.", reason
    )
    assert found, reason
    logged = [r for r in caplog.records if found[1] in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "boom" in str(logged[0].exc_info[1])  # the traceback is in the log, under the ref
    job, images = await _job(served.engine, job_id)
    assert job.status == JobStatus.FAILED and job.error == reason and images == 0
    assert _store(served.engine) == (set(), [])
    await served.still_serves(7)


# ---- CUDA out of memory ---------------------------------------------------------------------------------


OOM_CASES = [pytest.param(1, id="oom-retry-succeeds"), pytest.param(0, id="oom-persists")]


@pytest.mark.parametrize("fits", OOM_CASES)
async def test_out_of_memory(served: Served, monkeypatch: pytest.MonkeyPatch, fits: int) -> None:
    """A 2-image job on a GPU where ``fits`` images fit in memory: retried image by image, else a sentence."""
    real = t2i.generate_arrays
    calls: list[int] = []
    room = {"images": fits}

    def generate(model: Any, spec: JobSpec, on_step: Any = None) -> np.ndarray:
        calls.append(spec.batch)
        if spec.batch > room["images"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, spec, on_step)

    monkeypatch.setattr(t2i, "generate_arrays", generate)
    message = await served.message(await served.imagine(40, count=2))
    async with served.engine.db.sessions() as session:
        job_id = (await session.scalars(select(Job.id))).one()
    job, images = await _job(served.engine, job_id)
    if fits:
        assert calls == [2, 1, 1]  # the whole job, then image by image
        assert not message.content and sorted(_seeds(message)) == [40, 41]
        assert job.status == JobStatus.DONE and images == 2
    else:
        assert calls == [2, 1]  # the first single image failed too: given up
        assert _failed_job(message) == (job_id, OUT_OF_MEMORY)
        assert job.status == JobStatus.FAILED and images == 0
        assert _store(served.engine) == (set(), [])
    room["images"] = 4  # memory is back
    await served.still_serves(7)


# ---- the database locked by another writer ------------------------------------------------------------


class Locker:
    """A second, plain ``sqlite3`` connection to the bot's database file that takes its write lock."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.released_at = 0.0

    def lock(self, mode: str = "IMMEDIATE") -> None:
        self.conn.execute(f"BEGIN {mode}")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.released_at = time.monotonic()

    def close(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def locker(engine: Engine) -> Iterator[Locker]:
    assert engine.db.url.database
    held = Locker(engine.db.url.database)
    yield held
    held.close()


def _lock_retries(caplog: pytest.LogCaptureFixture, what: str = "") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "storage.db" and "database locked" in r.getMessage() and what in r.getMessage()
    ]


async def test_db_locked_short(
    served: Served, locker: Locker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """id db-locked-short: locks shorter than the busy timeout, over a submit and over the result's write."""
    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    real = t2i.generate_arrays

    def generate_then_lock(model: Any, spec: JobSpec, on_step: Any = None) -> np.ndarray:
        arrays = real(model, spec, on_step)
        locker.lock()  # held when the worker stores the PNG and writes the result
        loop.call_soon_threadsafe(loop.call_later, 0.3, locker.release)
        return arrays

    monkeypatch.setattr(t2i, "generate_arrays", generate_then_lock)
    finished: list[float] = []
    events = served.engine.hub.subscribe(None)
    await asyncio.to_thread(locker.lock)
    record = await served.imagine(11)
    await asyncio.sleep(0.3)
    assert await count_rows(served.engine, Job) == 0  # the submit waits for the lock…
    await asyncio.to_thread(locker.release)
    message = await served.message(record)  # …then goes through
    assert message.attachments and not message.content, message.content
    while not finished:
        if isinstance(await asyncio.wait_for(events.get(), 30), Finished):
            finished.append(time.monotonic())
    assert finished[0] >= locker.released_at  # the result's write waited for the second lock
    job, images = await _job(served.engine, 1)
    assert job.status == JobStatus.DONE and images == 1
    assert _lock_retries(caplog) == []  # SQLite's own busy wait absorbed both
    monkeypatch.setattr(t2i, "generate_arrays", real)
    await served.still_serves(12)


async def test_db_locked_long(
    served: Served, locker: Locker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """id db-locked-long: a lock longer than the busy timeout; a submit meanwhile is refused and stores
    nothing, the running job's result is written once the lock is gone (retried meanwhile)."""
    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    generating, locked = asyncio.Event(), threading.Event()
    real = t2i.generate_arrays

    def generate(model: Any, spec: JobSpec, on_step: Any = None) -> np.ndarray:
        if spec.seed == 21:
            loop.call_soon_threadsafe(generating.set)
            assert locked.wait(30)
        return real(model, spec, on_step)

    monkeypatch.setattr(t2i, "generate_arrays", generate)
    record = await served.imagine(21)
    await asyncio.wait_for(generating.wait(), 60)
    await asyncio.to_thread(locker.lock, "EXCLUSIVE")
    locked.set()
    started = time.monotonic()
    assert await sentence(await served.imagine(22, user=served.bob)) == DATABASE_BUSY
    assert time.monotonic() - started >= BUSY_TIMEOUT_MS / 1000
    assert await count_rows(served.engine, Job) == 1  # bob's job was not stored
    while not _lock_retries(caplog, "job 1's result"):  # the finished job's write is being retried
        assert time.monotonic() - started < 60
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # a few more tries, past the busy timeout
    await asyncio.to_thread(locker.release)
    message = await served.message(record)
    assert message.attachments and not message.content, message.content
    job, images = await _job(served.engine, 1)
    assert job.status == JobStatus.DONE and images == 1
    assert len(_lock_retries(caplog, "job 1's result")) >= 2
    await served.still_serves(22, user=served.bob)


async def test_db_locked_cancel(engine: Engine, locker: Locker) -> None:
    """id db-locked-cancel: a cancel the lock outlasts is refused and changes nothing; the job still runs.

    Engine level: through the bot, the Cancel button would outlast Discord's 3-second answer window.
    """
    engine.queue.pause()
    submitted, _ = await engine.submit(JobSpec(prompt="a red circle", steps=STEPS, seed=31, user_id=1))
    await asyncio.to_thread(locker.lock)
    with pytest.raises(DatabaseBusyError) as refused:
        await engine.cancel(submitted.job_id, by_user=1)
    assert str(refused.value) == DATABASE_BUSY
    status = engine.status(submitted.job_id)
    assert status is not None and status.status == JobStatus.QUEUED  # still in the queue…
    await asyncio.to_thread(locker.release)
    job, _ = await _job(engine, submitted.job_id)
    assert job.status == JobStatus.QUEUED  # …and in the database
    engine.queue.resume()
    assert len((await engine.wait(submitted.job_id)).images) == 1


async def test_db_locked_cancel_command(served: Served, locker: Locker) -> None:
    """id db-locked-cancel-command: /cancel during a lock it must wait out past Discord's 3 s: acknowledged in
    time, then the busy sentence; the job stays queued and runs."""
    engine = served.engine
    engine.queue.pause()
    engine.queue.limits = replace(engine.queue.limits, busy_wait_s=3.0)  # the cancel waits ~4 s in all
    alice, guild = served.alice.id, served.guild.id
    submitted, _ = await engine.submit(
        JobSpec(prompt="a red circle", steps=STEPS, seed=32, user_id=alice, guild_id=guild)
    )
    await asyncio.to_thread(locker.lock)
    record = await slash(served.double, served.alice, served.guild, "cancel", job=submitted.job_id)
    assert await sentence(record) == DATABASE_BUSY
    await asyncio.to_thread(locker.release)
    served.double.assert_clean()  # the first response came within Discord's 3 s
    status = engine.status(submitted.job_id)
    assert status is not None and status.status == JobStatus.QUEUED
    engine.queue.resume()
    assert len((await engine.wait(submitted.job_id)).images) == 1


async def test_retry_locked_bounds() -> None:
    """Request paths give up after their bound with the sentence; result writes try until it works."""
    tries = 0

    async def locked(times: int | None) -> str:
        nonlocal tries
        tries += 1
        if times is None or tries <= times:
            raise sqlite3.OperationalError("database is locked")
        return "written"

    started = time.monotonic()
    with pytest.raises(DatabaseBusyError, match="busy right now"):
        await retry_locked(lambda: locked(None), give_up_after_s=0.3, first_delay_s=0.01)
    assert 0.3 <= time.monotonic() - started < 1.5 and tries >= 3
    tries = 0
    assert await retry_locked(lambda: locked(8), give_up_after_s=None, first_delay_s=0.001) == "written"
    assert tries == 9
    tries = 0

    async def broken() -> None:
        nonlocal tries
        tries += 1
        raise sqlite3.OperationalError("no such table: jobs")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await retry_locked(broken, give_up_after_s=None)
    assert tries == 1  # anything else is not retried


# ---- disk full ----------------------------------------------------------------------------------------


class FullDisk:
    """The file store's disk: the next ``room`` new files fit; then a write is short and ENOSPC follows.

    Only files the store writes (its temp folder) are affected: ``tempfile.mkstemp`` and ``os.fdopen``
    are wrapped so the store's writes go through :class:`_FillingFile`.
    """

    def __init__(self, temp_dir: Path, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
        self.temp_dir = temp_dir
        self.room: int | None = room
        self.written = 0  # files completed while the disk was filling
        self.refused = 0
        self._fds: set[int] = set()
        real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

        def mkstemp(*args: Any, **kwargs: Any) -> Any:
            fd, name = real_mkstemp(*args, **kwargs)
            if Path(name).parent == self.temp_dir:
                self._fds.add(fd)
            return fd, name

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            handle = real_fdopen(fd, *args, **kwargs)
            if fd in self._fds:
                self._fds.discard(fd)
                return _FillingFile(handle, self)
            return handle

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fdopen", fdopen)

    def free(self) -> None:
        self.room = None


class _FillingFile:
    def __init__(self, real: Any, disk: FullDisk) -> None:
        self.real, self.disk = real, disk
        self.fits = disk.room is None or disk.room > 0
        if disk.room:
            disk.room -= 1

    def write(self, data: bytes) -> int:
        if self.fits:
            return int(self.real.write(data))
        self.disk.refused += 1
        self.real.write(data[: len(data) // 2])  # the half that still fitted
        self.real.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        if self.fits and self.disk.room is not None:
            self.disk.written += 1
        self.real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def test_disk_full_output(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """id disk-full-output: the disk fills while a 2-image job stores its PNGs (the first one fits)."""
    before = _store(served.engine)
    disk = FullDisk(served.engine.files.temp_dir, monkeypatch, room=1)
    job_id, reason = _failed_job(await served.message(await served.imagine(50, count=2)))
    assert reason == DISK_FULL
    assert (disk.written, disk.refused) == (1, 1)  # the first PNG was stored, the second half-written
    assert _store(served.engine) == before  # both gone again: no half file, no orphan, no temp file
    job, images = await _job(served.engine, job_id)
    assert job.status == JobStatus.FAILED and job.error == DISK_FULL and images == 0
    disk.free()  # an admin made room
    await served.still_serves(50)


async def test_disk_full_upload(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """id disk-full-upload: the disk is full when a /lora upload is copied into the file store."""
    engine, data = served.engine, PURPLE_LORA.read_bytes()
    before = _store(engine)
    disk = FullDisk(engine.files.temp_dir, monkeypatch, room=0)
    upload = await upload_lora(served.double, served.alice, served.guild, data)
    assert await sentence(upload) == STORAGE_FULL
    assert disk.refused == 1
    assert _store(engine) == before and await count_rows(engine, Asset) == 0
    disk.free()
    added = await upload_lora(served.double, served.alice, served.guild, data)
    await added.settled(quiet=0.3, timeout=30)
    assert await count_rows(engine, Asset) == 1


def test_an_unexpected_locked_database_still_gets_the_busy_sentence() -> None:
    """A write that was not wrapped in a retry, hitting a long lock, tells the user to retry, not 'broke'."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from cogs.common import error_text
    from storage.db import DATABASE_BUSY

    locked = OperationalError("UPDATE jobs ...", {}, sqlite3.OperationalError("database is locked"))
    assert error_text(locked) == DATABASE_BUSY
    assert error_text(RuntimeError("database is locked")).startswith("Something broke on our side (ref ")
