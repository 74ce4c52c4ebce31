"""Tables of the registry: prompts, their adapter versions, training jobs (each under its own fenced lease), the
job-runner lease, and the change log through which every replica follows every other's writes."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.engine import Engine as SQLEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

log = logging.getLogger(__name__)

# The PostgreSQL driver the gateway installs (psycopg 3). Providers hand out `postgres://` and
# `postgresql://` URLs, which SQLAlchemy would give to psycopg2 (not installed) or reject.
POSTGRES_DRIVER = "postgresql+psycopg"
POSTGRES_SCHEMES = ("postgres", "postgresql")
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")  # made by SQLite beside the database, with its mode
OWNER_ONLY = 0o600
# How long a SQLite writer waits for another's write lock before "database is locked" (the API then answers 503).
# PostgreSQL waits on a row lock without a limit; 5 s was seen to run out for one gateway process whose threads
# shared the GIL with a busy registry poller, each lock holder waiting its turn for the interpreter.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def database_url(url: str) -> URL:
    """The SQLAlchemy URL to open: `postgres://` and `postgresql://` mean psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in POSTGRES_SCHEMES:
        parsed = parsed.set(drivername=POSTGRES_DRIVER)
    return parsed


def prepare_sqlite_file(url: URL) -> None:
    """Make a SQLite database's folder, and the file itself readable by its owner only (0600) before SQLite
    opens it: SQLite gives its -wal and -shm files the database file's mode. A file made earlier with a wider
    mode is narrowed, with the side files it has."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, OWNER_ONLY))  # an existing file keeps its mode here
    for file in (path, *(path.with_name(path.name + side) for side in SQLITE_SIDE_FILES)):
        try:
            if file.stat().st_mode & 0o077:
                file.chmod(OWNER_ONLY)
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("%s is readable by others and not ours to narrow to 0600", file)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC when read: SQLite keeps no zone, so without this a row
    read back would be naive (and serialised without its `Z`) while the same row just written is aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the registry: use an aware UTC time (utcnow())")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class PromptRow(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # None: every tenant's
    kind: Mapped[str] = mapped_column(String(16))
    template: Mapped[Any] = mapped_column(JSON)
    examples: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    record: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {rate, max_rows}; None: off
    guard: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # shadow guard setting; None: off
    serving: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # None: LoRA
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    versions: Mapped[list[AdapterVersionRow]] = relationship(
        back_populates="prompt", cascade="all, delete-orphan", order_by="AdapterVersionRow.version",
        passive_deletes=True,
    )
    jobs: Mapped[list[TrainJobRow]] = relationship(
        back_populates="prompt", cascade="all, delete-orphan", order_by="TrainJobRow.id", passive_deletes=True,
    )


class AdapterVersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("prompt_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    prompt: Mapped[PromptRow] = relationship(back_populates="versions")


class TrainJobRow(Base):
    __tablename__ = "train_jobs"
    # AUTOINCREMENT: a deleted job's id is never given to a new one.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The job's fenced lease: the runner holding `lease_token` may write its progress and publish its version;
    # one whose compare-and-set on the token fails has lost the job and stops. Expired: another may take it.
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    prompt: Mapped[PromptRow] = relationship(back_populates="jobs")


class TrafficRow(Base):
    """One recorded `fallback` answer of a prompt: its slot values and the answer served (a training row).
    A ring buffer per prompt: an insert beyond the prompt's `max_rows` drops the oldest."""

    __tablename__ = "traffic"
    __table_args__ = (Index("ix_traffic_prompt_id_id", "prompt_id", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slots: Mapped[dict[str, str]] = mapped_column(JSON)
    response: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RunnerLeaseRow(Base):
    """One row per database: the gateway replica whose job runner may train right now."""

    __tablename__ = "runner_lease"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RegistryStateRow(Base):
    """One row: the registry's revision, raised by every write that changes what replicas serve. Writers
    take this row's lock first, so revisions are committed in order and the change log has no gaps."""

    __tablename__ = "registry_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)


class RegistryChangeRow(Base):
    """The change log: at `revision`, prompt `prompt` changed (registered, versions, settings, deleted).
    Replicas read the rows above the revision they last applied and reload those prompts."""

    __tablename__ = "registry_changes"

    revision: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    prompt: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class DiscoveryClusterRow(Base):
    """A recurring prompt one replica found in its passthrough traffic (its counts since it started), flushed
    periodically; the candidates are the rows of every replica added up per candidate id."""

    __tablename__ = "discovery_clusters"

    candidate_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    replica: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    template: Mapped[Any] = mapped_column(JSON)
    slots: Mapped[list[str]] = mapped_column(JSON)
    requests: Mapped[int] = mapped_column(Integer)
    chars_total: Mapped[int] = mapped_column(BigInteger)
    static_chars: Mapped[int] = mapped_column(Integer)
    examples: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())


class DiscoveryRegisteredRow(Base):
    """A candidate registered as a prompt: it leaves the list, and replicas stop counting it."""

    __tablename__ = "discovery_registered"

    candidate_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    prompt: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def enable_sqlite_foreign_keys(engine: SQLEngine) -> None:
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_MS)}")
        cursor.close()
