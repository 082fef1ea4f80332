"""The ORM tables (SQLAlchemy 2 typed declarative).

Discord ids (users, guilds, channels) are snowflakes stored as ``BigInteger``. Every timestamp is a
timezone-aware UTC ``datetime`` (:class:`UTCDateTime` converts on the way in and out, so SQLite,
which has no time zones, reads back the same aware value). Enums are stored as their string values
in plain ``VARCHAR(16)`` columns (no native enum, no CHECK constraint), so adding a member later
needs no table rebuild; SQLAlchemy still rejects unknown values on write.

Relationships are ``lazy="raise"``: load them explicitly (``selectinload``) or query the child
table; an accidental lazy load in async code would otherwise fail obscurely.

Any change here needs a migration in ``storage/migrations/versions`` (a test compares the two).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Asset",
    "AssetKind",
    "Base",
    "Guild",
    "Image",
    "Job",
    "JobStatus",
    "UTCDateTime",
    "User",
    "Visibility",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that only accepts aware values and always returns aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given; use an aware one (storage.tables.utcnow())")
        value = value.astimezone(UTC)
        # SQLite has no time zones; store the UTC wall time and re-attach UTC when reading.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class AssetKind(enum.StrEnum):
    """What an uploaded asset is."""

    LORA = "lora"
    EMBEDDING = "embedding"
    HYPERNETWORK = "hypernetwork"
    VAE = "vae"
    CONTROLNET = "controlnet"
    CHECKPOINT = "checkpoint"
    UPSCALER = "upscaler"

    @property
    def label(self) -> str:
        """How sentences for users name the kind: ``LoRA``, ``embedding``, ``VAE``..."""
        return _KIND_LABELS.get(self.value, self.value)

    @property
    def with_article(self) -> str:
        """``a LoRA``, ``an embedding``."""
        return f"{'an' if self.label[0] in 'aeiou' else 'a'} {self.label}"


_KIND_LABELS = {"lora": "LoRA", "vae": "VAE", "controlnet": "ControlNet"}


class Visibility(enum.StrEnum):
    """Who may use an asset."""

    PRIVATE = "private"
    GUILD = "guild"
    PUBLIC = "public"


class JobStatus(enum.StrEnum):
    """Where a job is in its life: queued -> running -> exactly one of done, failed, cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether this is a final state."""
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


def _enum_values(enum_cls: type[enum.Enum]) -> list[str]:
    return [str(member.value) for member in enum_cls]


def _str_enum(enum_cls: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=_enum_values,
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Declarative base; its ``metadata`` is what the migrations must match."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class User(Base):
    """A Discord user who has used the bot; the id is their snowflake."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Guild(Base):
    """A Discord guild (server) the bot has been used in."""

    __tablename__ = "guilds"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Asset(Base):
    """A user-uploaded model file (LoRA, embedding, ...); the bytes live in the file store by sha256."""

    __tablename__ = "assets"
    __table_args__ = (UniqueConstraint("owner_id", "kind", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    kind: Mapped[AssetKind] = mapped_column(_str_enum(AssetKind, "asset_kind"))
    name: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str | None] = mapped_column(Text)
    family: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    short_hash: Mapped[str] = mapped_column(String(12))
    size: Mapped[int] = mapped_column(BigInteger)
    visibility: Mapped[Visibility] = mapped_column(
        _str_enum(Visibility, "visibility"), default=Visibility.PRIVATE
    )
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One generation request and its outcome; ``spec`` is the validated request as JSON."""

    __tablename__ = "jobs"
    # AUTOINCREMENT: ids are shown to users, so SQLite must never reuse one after a delete.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[JobStatus] = mapped_column(
        _str_enum(JobStatus, "job_status"), default=JobStatus.QUEUED, index=True
    )
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    seconds: Mapped[float | None] = mapped_column(Float)
    # When the bot posted the outcome (result, failure or cancel) to Discord, or gave up on doing so;
    # None while a Discord job's outcome is still owed (the bot redelivers those after a restart).
    delivered_at: Mapped[datetime | None] = mapped_column()

    images: Mapped[list[Image]] = relationship(
        back_populates="job",
        lazy="raise",
        order_by="Image.index",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Image(Base):
    """One output image of a job; the PNG lives in the file store by sha256."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images", lazy="raise")
