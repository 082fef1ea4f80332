"""Restart safety: SIGKILL the worker process mid-job, start it again, every job is delivered exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.settings import Settings
from storage.files import FileStore
from tests.conftest import REPO_ROOT

WORKER = "import sys; from pipelines.cli import main; sys.exit(main(['worker', '--until-idle']))"


def _env(data: Path, tiny_models: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "DREAMCORD_DATA_DIR": str(data),
        "DREAMCORD_BUILTIN_MODELS_DIR": str(tiny_models),
        "DREAMCORD_CONFIG": str(data / "none.toml"),
        "OMP_NUM_THREADS": "1",
    }


async def _submit(settings: Settings) -> dict[int, int]:
    """Five jobs from three users: two that batch together, three that run alone. Returns id -> images."""
    specs = [
        JobSpec(prompt="a red circle", model="tiny-sd15", width=64, height=64, steps=80, seed=1, user_id=1),
        JobSpec(prompt="a blue square", model="tiny-sd15", width=64, height=64, steps=80, seed=2, user_id=2),
        JobSpec(
            prompt="a star", model="tiny-sd15", width=64, height=64, steps=70, seed=3, batch=2, user_id=3
        ),
        JobSpec(prompt="a ring", model="tiny-sd15", width=64, height=64, steps=60, seed=4, user_id=1),
        JobSpec(prompt="a cross", model="tiny-sdxl", width=64, height=64, steps=60, seed=5, user_id=2),
    ]
    async with Engine(settings, start_worker=False) as engine:  # only queues: nothing runs here
        ids = {}
        for spec in specs:
            submitted, _ = await engine.submit(spec)
            ids[submitted.job_id] = spec.batch
    return ids


def _rows(db: Path) -> dict[int, tuple[str, int, str | None]]:
    with sqlite3.connect(db, timeout=15) as conn:
        return {
            job_id: (status, attempts, finished)
            for job_id, status, attempts, finished in conn.execute(
                "SELECT id, status, attempts, finished_at FROM jobs"
            )
        }


def _images(db: Path) -> list[tuple[int, int, str]]:
    with sqlite3.connect(db, timeout=15) as conn:
        return list(conn.execute('SELECT job_id, "index", sha256 FROM images ORDER BY job_id, "index"'))


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_sigkill_mid_job_then_restart_delivers_every_job_exactly_once(
    tmp_path: Path, tiny_models: Path
) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, builtin_models_dir=tiny_models)
    jobs = asyncio.run(_submit(settings))
    db = data / "dreamcord.db"
    assert {status for status, _, _ in _rows(db).values()} == {"queued"}  # durable before any worker ran

    env = _env(data, tiny_models)
    first = subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:

        def one_done_one_running() -> bool:
            statuses = [status for status, _, _ in _rows(db).values()]
            return "done" in statuses and "running" in statuses

        _wait_for(one_done_one_running, 240, "a finished job and a running one")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    before = _rows(db)
    done_before = {job_id: row for job_id, row in before.items() if row[0] == "done"}
    killed = {job_id for job_id, row in before.items() if row[0] == "running"}
    assert done_before and killed

    second = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-2000:]
    after = _rows(db)
    assert {job_id: row[0] for job_id, row in after.items()} == dict.fromkeys(jobs, "done")
    for job_id, row in done_before.items():
        assert after[job_id] == row  # finished before the kill: not run again
    for job_id in killed:
        assert after[job_id][1] == 2  # interrupted once, then run to the end
    delivered = [json.loads(line)["job"] for line in second.stdout.splitlines() if line.startswith("{")]
    assert sorted(delivered) == sorted(set(jobs) - set(done_before))  # each remaining job once, no other

    images = _images(db)
    assert len(images) == len(set(images)) == sum(jobs.values())
    for job_id, count in jobs.items():
        assert [index for j, index, _ in images if j == job_id] == list(range(count))
    store = FileStore(settings.files_dir)
    for _, _, sha in images:
        with Image.open(store.path_for(sha)) as image:
            assert image.size == (64, 64)
