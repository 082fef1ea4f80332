"""The database handle: an async engine, a session factory, and migrations run from code.

Any SQLAlchemy async URL works; the default is SQLite through aiosqlite. SQLite connections get
``PRAGMA foreign_keys=ON`` and a busy timeout, and file databases are switched to WAL so readers
never block the writer (with ``synchronous=NORMAL``, WAL's usual pairing).
``sqlite+aiosqlite:///:memory:`` uses a single shared connection
(SQLAlchemy's StaticPool), so the schema that :meth:`Database.open` migrates is the one later
sessions see.

Migrations live in ``storage/migrations`` and are located from this file, so they work from a
checkout and from an installed wheel alike; no ``alembic.ini`` is needed. They run on the
engine's own connection (``run_sync``), in one transaction, with SQLite's foreign keys off
meanwhile (a batch migration's table rebuild would otherwise cascade deletes)::

    async with Database(sqlite_url(data_dir / "dreamcord.db")) as db:
        async with db.sessions.begin() as session:
            ...

Another process (a CLI command, an admin's ``sqlite3`` shell, a backup) may hold SQLite's write lock
for a while. Each connection waits up to :data:`BUSY_TIMEOUT_MS` for it; past that, SQLite answers
"database is locked", and :func:`retry_locked` runs the whole transaction again after a back-off:
for a bounded time on request paths (then :class:`DatabaseBusyError`, one sentence for the user,
nothing stored), or until it works for writes that must never be lost (a finished job's result)::

    await retry_locked(write_result, give_up_after_s=None, what="job 7's result")

To write a new migration: ``command.revision(alembic_config(url), autogenerate=True, message=...)``
against a database at head (``from alembic import command``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Connection, event, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from storage.errors import BotError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "DATABASE_BUSY",
    "MIGRATIONS_DIR",
    "Database",
    "DatabaseBusyError",
    "alembic_config",
    "is_locked",
    "retry_locked",
    "sqlite_url",
]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_MS = 15_000
DATABASE_BUSY = "The bot's database is busy right now, so nothing was saved; try again in a minute."

T = TypeVar("T")


class DatabaseBusyError(BotError):
    """Another writer kept the database locked for longer than a request may wait."""


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (SQLITE_BUSY or SQLITE_LOCKED), wrapped or not."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(cause, sqlite3.OperationalError):
        return False
    name = getattr(cause, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "is locked" in str(cause)


async def retry_locked(
    operation: Callable[[], Awaitable[T]],
    *,
    give_up_after_s: float | None,
    what: str = "a write",
    first_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
) -> T:
    """Run ``operation`` (one whole transaction), again after a back-off while the database is locked.

    Each try already waits up to the busy timeout for the lock; the back-off doubles from
    ``first_delay_s`` up to ``max_delay_s``. Other errors pass through at once.

    Args:
        operation: Opens, writes and commits its own transaction (a failed try rolled back fully).
        give_up_after_s: None: try until it works (writes that must not be lost). A number: raise
            :class:`DatabaseBusyError` once this many seconds have passed (request paths; the bound
            is this plus one busy timeout).
        what: What is written, for the log.
    """
    started = time.monotonic()
    delay = first_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except Exception as exc:
            if not is_locked(exc):
                raise
            waited = time.monotonic() - started
            if give_up_after_s is not None and waited >= give_up_after_s:
                log.warning("database locked: gave up %s after %d tries (%.1f s)", what, attempt, waited)
                raise DatabaseBusyError(DATABASE_BUSY) from exc
            log.warning(
                "database locked by another writer: %s failed (try %d, %.1f s); retrying in %.2f s",
                what,
                attempt,
                waited,
                delay,
            )
        pause = delay if give_up_after_s is None else min(delay, max(give_up_after_s - waited, 0.0))
        await asyncio.sleep(pause)
        delay = min(delay * 2, max_delay_s)


def sqlite_url(path: Path) -> str:
    """The aiosqlite URL of a database file (made absolute)."""
    return f"sqlite+aiosqlite:///{Path(path).expanduser().resolve()}"


def alembic_config(url: str | URL | None = None, connection: Connection | None = None) -> Config:
    """An alembic ``Config`` for ``storage/migrations``, built in code.

    Args:
        url: Database URL, used by ``env.py`` when no connection is given (CLI-style use).
        connection: An open sync connection the migrations should run on (shared, not closed).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        rendered = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL, or None for memory databases, URI forms and other backends."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(database)


def _sqlite_on_connect(wal: bool, busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms):d}")
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
                # In WAL mode NORMAL never corrupts and survives any process crash (SIGKILL included);
                # only an OS crash or power loss may roll back the last commits. It spares an fsync
                # per commit, which is most of the engine's per-job overhead on small jobs.
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    return on_connect


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


class Database:
    """An async engine plus session factory for one database URL.

    Args:
        url: A SQLAlchemy async URL, e.g. from :func:`sqlite_url`.
        migrate: Whether :meth:`open` upgrades the schema to head (tests may turn this off).
        echo: Log every SQL statement.
        busy_timeout_ms: How long a SQLite connection waits for another writer's lock (set before
            :meth:`open`).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        migrate: bool = True,
        echo: bool = False,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> None:
        self.url = make_url(url)
        self.migrate = migrate
        self.echo = echo
        self.busy_timeout_ms = busy_timeout_ms
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    @property
    def engine(self) -> AsyncEngine:
        """The async engine; only while open."""
        if self._engine is None:
            raise RuntimeError("the database is not open; call await db.open() first")
        return self._engine

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory (``expire_on_commit=False``); only while open."""
        if self._sessions is None:
            raise RuntimeError("the database is not open; call await db.open() first")
        return self._sessions

    async def open(self) -> None:
        """Create the engine and session factory, then migrate to head unless ``migrate`` is off."""
        if self._engine is not None:
            return
        sqlite_file = _sqlite_file(self.url)
        if sqlite_file is not None:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self.url, echo=self.echo)
        if self.url.get_backend_name() == "sqlite":
            on_connect = _sqlite_on_connect(sqlite_file is not None, self.busy_timeout_ms)
            event.listen(engine.sync_engine, "connect", on_connect)
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        log.info("opened database %s", self.url.render_as_string(hide_password=True))
        if self.migrate:
            try:
                await self.upgrade("head")
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Dispose of the engine (a memory database is gone afterwards). Safe to call twice."""
        engine, self._engine, self._sessions = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def upgrade(self, revision: str = "head") -> None:
        """Run the migrations up to ``revision`` on this engine (one connection, one transaction)."""
        await self._run_alembic(command.upgrade, revision)
        log.info("database schema upgraded to %s", revision)

    async def downgrade(self, revision: str) -> None:
        """Run the migrations down to ``revision`` (``"base"`` drops every table)."""
        await self._run_alembic(command.downgrade, revision)
        log.info("database schema downgraded to %s", revision)

    async def current_revision(self) -> str | None:
        """The revision the database is at, or None before the first migration."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(_current_revision)

    async def _run_alembic(self, func: Callable[[Config, str], None], revision: str) -> None:
        """Run an alembic command on one connection, in one transaction.

        On SQLite, foreign keys are off meanwhile: batch migrations rebuild a table by dropping
        it, which would otherwise fire ``ON DELETE CASCADE`` and empty its child tables.
        """

        def run(connection: Connection) -> None:
            func(alembic_config(self.url, connection=connection), revision)

        sqlite = self.url.get_backend_name() == "sqlite"
        async with self.engine.connect() as conn:
            if sqlite:
                await _set_foreign_keys(conn, on=False)
            try:
                await conn.run_sync(run)
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
            finally:
                if sqlite:
                    await _set_foreign_keys(conn, on=True)
            if sqlite:
                await _check_foreign_keys(conn)


async def _check_foreign_keys(conn: AsyncConnection) -> None:
    """Log rows a migration left pointing nowhere (SQLite only checks them on writes)."""
    problems = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
    await conn.commit()
    if problems:
        log.error("after migrating, %d row(s) break foreign keys: %s", len(problems), problems[:5])


async def _set_foreign_keys(conn: AsyncConnection, *, on: bool) -> None:
    """Switch SQLite's foreign keys (only possible outside a transaction, hence the commit)."""
    await conn.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    await conn.commit()
    if bool((await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar()) != on:
        await conn.invalidate()  # never hand a connection in the wrong state back to the pool
        raise RuntimeError(f"could not turn SQLite foreign keys {'on' if on else 'off'}")
    await conn.commit()
