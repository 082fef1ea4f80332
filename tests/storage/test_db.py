"""Database: engine setup, SQLite pragmas, migrations up and down, schema == ORM metadata."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Connection, Integer, MetaData, String, inspect, select, text

import storage
from storage.db import MIGRATIONS_DIR, Database, alembic_config, sqlite_url
from storage.tables import Base, User

from .conftest import MEMORY_URL

APP_TABLES = {"users", "guilds", "assets", "jobs", "images"}


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


def _diff(connection: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def _pragma(db: Database, name: str) -> Any:
    async with db.engine.connect() as conn:
        return (await conn.execute(text(f"PRAGMA {name}"))).scalar_one()


def test_sqlite_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_url(Path("sub/x.db")) == f"sqlite+aiosqlite:///{tmp_path.resolve()}/sub/x.db"


async def test_open_creates_parent_folders_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "bot.db"
    async with Database(sqlite_url(path)) as db:
        assert path.is_file()
        assert await _pragma(db, "journal_mode") == "wal"
        assert await _pragma(db, "foreign_keys") == 1
        assert await _pragma(db, "busy_timeout") >= 1000
        assert await _tables(db) >= APP_TABLES
        assert await db.current_revision() == "0002"


async def test_memory_database_keeps_its_schema_across_sessions() -> None:
    async with Database(MEMORY_URL) as db:
        assert await _pragma(db, "foreign_keys") == 1
        async with db.sessions.begin() as session:
            session.add(User(id=7))
        async with db.sessions() as session:
            assert (await session.scalars(select(User.id))).all() == [7]


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "bot.db")
    async with Database(url) as db:
        async with db.sessions.begin() as session:
            session.add(User(id=42, settings={"sampler": "euler"}))
    async with Database(url) as db:  # migrating again at head is a no-op
        async with db.sessions() as session:
            user = await session.get(User, 42)
            assert user is not None and user.settings == {"sampler": "euler"}


async def test_engine_and_sessions_need_open() -> None:
    db = Database(MEMORY_URL)
    with pytest.raises(RuntimeError):
        _ = db.engine
    with pytest.raises(RuntimeError):
        _ = db.sessions
    await db.open()
    await db.close()
    await db.close()  # twice is fine
    with pytest.raises(RuntimeError):
        _ = db.engine


@pytest.mark.parametrize("where", ["file", "memory"])
async def test_upgrade_downgrade_upgrade(tmp_path: Path, where: str) -> None:
    url = sqlite_url(tmp_path / "bot.db") if where == "file" else MEMORY_URL
    async with Database(url, migrate=False) as db:
        assert await db.current_revision() is None
        assert not (await _tables(db) & APP_TABLES)

        await db.upgrade()
        assert await db.current_revision() == "0002"
        assert await _tables(db) >= APP_TABLES

        await db.downgrade("base")
        assert await db.current_revision() is None
        assert not (await _tables(db) & APP_TABLES)

        await db.upgrade("head")
        assert await db.current_revision() == "0002"
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff, Base.metadata) == []
        async with db.sessions.begin() as session:  # the re-created schema is usable
            session.add(User(id=1))


async def test_migrated_schema_matches_orm_metadata(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff, Base.metadata) == []


async def test_metadata_comparison_detects_drift(file_db: Database) -> None:
    """The check above would catch a model change without a migration (added column, new type)."""
    drifted = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["jobs"].append_column(Column("priority", Integer, nullable=True))
    drifted.tables["assets"].c.name.type = String(32)
    async with file_db.engine.connect() as conn:
        diffs = await conn.run_sync(_diff, drifted)
    flat = [d for diff in diffs for d in (diff if isinstance(diff, list) else [diff])]
    assert any(d[0] == "add_column" and d[3].name == "priority" for d in flat)
    assert any(d[0] == "modify_type" and d[2:4] == ("assets", "name") for d in flat)


def test_alembic_config_runs_without_a_connection(tmp_path: Path) -> None:
    """CLI-style use: env.py makes its own (async) engine from the URL."""
    url = sqlite_url(tmp_path / "cli.db")
    command.upgrade(alembic_config(url), "head")

    import sqlite3

    with sqlite3.connect(tmp_path / "cli.db") as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    conn.close()
    assert tables >= APP_TABLES
    assert version == [("0002",)]


def test_migrations_found_from_the_package_not_the_working_dir(tmp_path: Path) -> None:
    """As when installed: a copy of the package elsewhere, run from an unrelated folder."""
    assert MIGRATIONS_DIR == Path(storage.__file__).parent / "migrations"
    site = tmp_path / "site"
    shutil.copytree(
        Path(storage.__file__).parent, site / "storage", ignore=shutil.ignore_patterns("__pycache__")
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = (
        "import asyncio, sys, storage\n"
        "from storage.db import Database, sqlite_url\n"
        "from pathlib import Path\n"
        "assert Path(storage.__file__).parent == Path(sys.argv[1]), storage.__file__\n"
        "async def main():\n"
        "    async with Database(sqlite_url(Path('x.db'))) as db:\n"
        "        print(await db.current_revision())\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(site / "storage")],
        cwd=work,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0002"
    assert (work / "x.db").is_file()


async def test_foreign_keys_are_enforced(db: Database) -> None:
    from sqlalchemy.exc import IntegrityError

    from storage.tables import Image

    with pytest.raises(IntegrityError):
        async with db.sessions.begin() as session:
            session.add(Image(job_id=999, index=0, seed=1, sha256="a" * 64, width=8, height=8))


TABLE_REBUILD_MIGRATION = """
from alembic import op

revision = "9999"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("jobs", recreate="always"):
        pass


def downgrade():
    pass
"""


@pytest.mark.parametrize("where", ["file", "memory"])
async def test_table_rebuild_keeps_child_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A batch migration drops and re-creates a table: ON DELETE CASCADE must not fire meanwhile."""
    from storage import db as db_module
    from storage.jobs import NewImage, create_job, mark_done, mark_running
    from storage.tables import Image

    extra = tmp_path / "extra_versions"
    extra.mkdir()
    (extra / "9999_rebuild_jobs.py").write_text(TABLE_REBUILD_MIGRATION)
    real_config = db_module.alembic_config

    def config_with_extra(*args: Any, **kwargs: Any) -> Any:
        cfg = real_config(*args, **kwargs)
        cfg.set_main_option("version_locations", f"{MIGRATIONS_DIR / 'versions'}{os.pathsep}{extra}")
        return cfg

    monkeypatch.setattr(db_module, "alembic_config", config_with_extra)
    url = sqlite_url(tmp_path / "bot.db") if where == "file" else MEMORY_URL
    async with Database(url, migrate=False) as db:  # with the extra folder, head is 9999
        await db.upgrade("0002")
        async with db.sessions.begin() as session:
            job = await create_job(session, kind="txt2img", spec={})
            await mark_running(session, job.id)
            await mark_done(session, job.id, [NewImage(0, 1, "a" * 64, 8, 8)], seconds=1.0)
        await db.upgrade("9999")
        assert await db.current_revision() == "9999"
        assert await _pragma(db, "foreign_keys") == 1  # back on afterwards
        async with db.sessions() as session:
            assert (await session.scalars(select(Image.job_id))).all() == [job.id]
        await db.downgrade("0002")


async def test_file_database_uses_wal_with_normal_sync(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from storage.db import Database, sqlite_url

    async with Database(sqlite_url(tmp_path / "w.db")) as db:
        async with db.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 1  # NORMAL


async def test_delivered_at_backfills_finished_jobs_only(tmp_path: Path) -> None:
    """0002: jobs finished before it count as delivered; unfinished ones stay owed to their users."""
    async with Database(sqlite_url(tmp_path / "bot.db"), migrate=False) as db:
        await db.upgrade("0001")
        async with db.engine.begin() as conn:
            for status in ("done", "failed", "cancelled", "queued", "running"):
                await conn.execute(
                    text(
                        "INSERT INTO jobs (kind, status, spec, attempts, created_at) "
                        "VALUES ('txt2img', :status, '{}', 0, '2026-11-01 10:00:00.000000')"
                    ),
                    {"status": status},
                )
        await db.upgrade("0002")
        async with db.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT status, delivered_at FROM jobs"))).all()
    owed = {status for status, delivered in rows if delivered is None}
    assert owed == {"queued", "running"}, rows
