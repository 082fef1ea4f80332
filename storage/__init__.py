"""dreamcord: storage, the lowest layer (no imports from the other packages).

- :mod:`storage.db`: :class:`Database` (async engine, sessions, alembic migrations run from code).
- :mod:`storage.tables`: the ORM tables and their enums.
- :mod:`storage.jobs`, :mod:`storage.users`: queries; they flush, the caller owns the transaction
  (``async with db.sessions.begin() as session``).
- :mod:`storage.files`: :class:`FileStore`, content-addressed files on disk.
- :mod:`storage.errors`: the user-facing error tree.
"""

from __future__ import annotations

from storage.db import Database, sqlite_url
from storage.errors import (
    BotError,
    GenerationError,
    IncompatibleAssetError,
    InvalidRequestError,
    NotFoundError,
    QueueFullError,
    QuotaExceededError,
)
from storage.files import FileStore, StoredFile
from storage.jobs import (
    NewImage,
    count_jobs,
    create_job,
    get_job,
    list_images,
    list_jobs,
    mark_cancelled,
    mark_done,
    mark_failed,
    mark_running,
    requeue_running,
    require_job,
)
from storage.tables import Asset, AssetKind, Base, Guild, Image, Job, JobStatus, User, Visibility, utcnow
from storage.users import (
    delete_user_data,
    ensure_guild,
    ensure_user,
    get_guild_settings,
    get_user_settings,
    set_guild_settings,
    set_user_settings,
    update_guild_settings,
    update_user_settings,
)

__all__ = [
    "Asset",
    "AssetKind",
    "Base",
    "BotError",
    "Database",
    "FileStore",
    "GenerationError",
    "Guild",
    "Image",
    "IncompatibleAssetError",
    "InvalidRequestError",
    "Job",
    "JobStatus",
    "NewImage",
    "NotFoundError",
    "QueueFullError",
    "QuotaExceededError",
    "StoredFile",
    "User",
    "Visibility",
    "count_jobs",
    "create_job",
    "delete_user_data",
    "ensure_guild",
    "ensure_user",
    "get_guild_settings",
    "get_job",
    "get_user_settings",
    "list_images",
    "list_jobs",
    "mark_cancelled",
    "mark_done",
    "mark_failed",
    "mark_running",
    "require_job",
    "requeue_running",
    "set_guild_settings",
    "set_user_settings",
    "sqlite_url",
    "update_guild_settings",
    "update_user_settings",
    "utcnow",
]
