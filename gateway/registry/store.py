"""PromptRegistry: persistent prompts, adapter versions and training jobs (SQLAlchemy).

The data layer: it raises the system's own errors (`core.errors`), which the gateway maps to HTTP in
one place, and it is the one place where adapter version numbers are made.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from core.adapter_store import AdapterStore
from core.errors import ConflictError, InvalidInput, NotFoundError
from gateway.registry.db import (
    AdapterVersionRow,
    PromptRow,
    RegistryChangeRow,
    RegistryStateRow,
    RunnerLeaseRow,
    TrainJobRow,
    database_url,
    enable_sqlite_foreign_keys,
    prepare_sqlite_file,
    utcnow,
)
from gateway.registry.migrate import Migration, upgrade_to_head

PROMPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VERSION_STATUSES = ("training", "loading", "ready", "failed")
JOB_ACTIVE = ("queued", "running")
VERSION_ATTEMPTS = 100  # each failed attempt means another writer took a number: progress, not a stall
CHANGE_LOG_KEEP = timedelta(days=1)  # a replica further behind than this reloads every prompt
CHANGE_LOG_PRUNE_EVERY = 500  # revisions between two prunings of the change log


@dataclass(frozen=True)
class VersionRecord:
    version: int
    status: str
    source: str
    path: str | None
    manifest: dict[str, Any] | None
    error: str | None
    created: datetime


@dataclass(frozen=True)
class JobRecord:
    id: int
    prompt: str
    status: str
    spec: dict[str, Any]
    progress: dict[str, Any] | None
    error: str | None
    attempts: int
    version: int | None
    created: datetime
    started: datetime | None
    finished: datetime | None


@dataclass(frozen=True)
class PromptRecord:
    name: str
    kind: str
    template: Any
    examples: list[dict[str, str]]
    created: datetime
    versions: list[VersionRecord] = field(default_factory=list)
    jobs: list[JobRecord] = field(default_factory=list)

    @property
    def active_version(self) -> VersionRecord | None:
        """The newest ready version: a new one takes over only once it is ready."""
        ready = [v for v in self.versions if v.status == "ready"]
        return ready[-1] if ready else None

    @property
    def status(self) -> str:
        active = self.active_version
        return active.status if active else "registered"


@dataclass(frozen=True)
class Changes:
    """What changed in the registry after a revision: the prompts to reload, or `None` when the change log no
    longer reaches back that far (then every prompt is reloaded)."""

    revision: int
    prompts: frozenset[str] | None


def _version(row: AdapterVersionRow) -> VersionRecord:
    return VersionRecord(row.version, row.status, row.source, row.path, row.manifest, row.error, row.created_at)


def _job(row: TrainJobRow, prompt: str) -> JobRecord:
    return JobRecord(row.id, prompt, row.status, row.spec, row.progress, row.error, row.attempts, row.version,
                     row.created_at, row.started_at, row.finished_at)


def _prompt(row: PromptRow) -> PromptRecord:
    return PromptRecord(row.name, row.kind, row.template, list(row.examples or []), row.created_at,
                        [_version(v) for v in row.versions], [_job(j, row.name) for j in row.jobs])


def check_prompt_name(name: str) -> None:
    if not PROMPT_NAME.fullmatch(name):
        raise InvalidInput(
            "a prompt name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            param="name", code="invalid_name")


class PromptRegistry:
    """The registry's only door to the database; every method is one short transaction.

    Opening it brings the schema to the newest migration (under a lock), so every process that uses
    the database, gateway replica or test, sees the same tables.
    """

    def __init__(self, url: str) -> None:
        parsed = database_url(url)  # SQLite (a file, made 0600 here) or PostgreSQL (psycopg 3)
        prepare_sqlite_file(parsed)
        self.engine = create_engine(parsed, pool_pre_ping=True)
        enable_sqlite_foreign_keys(self.engine)
        self.migration: Migration = upgrade_to_head(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._session() as s:
            s.execute(select(1))

    # -- the change log: how every replica follows every other's writes -----------------------------

    @staticmethod
    def _changed(s: Session, name: str) -> None:
        """Log, in the writer's transaction, that `name` changed. Raising the one revision row locks it until
        the commit, so revisions are committed in the order they were given and readers never miss one."""
        revision = s.execute(
            update(RegistryStateRow).where(RegistryStateRow.id == 1)
            .values(revision=RegistryStateRow.revision + 1).returning(RegistryStateRow.revision)
        ).scalar_one()
        now = utcnow()
        s.add(RegistryChangeRow(revision=revision, prompt=name, changed_at=now))
        if revision % CHANGE_LOG_PRUNE_EVERY == 0:
            s.execute(delete(RegistryChangeRow).where(RegistryChangeRow.changed_at < now - CHANGE_LOG_KEEP))

    def revision(self) -> int:
        """The registry's current revision (one cheap read: what a replica polls)."""
        with self._session() as s:
            return int(s.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0)

    def changes_since(self, revision: int) -> Changes:
        """The prompts changed after `revision`, and the revision that brings the reader up to date."""
        with self._session() as s:
            current = int(s.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0)
            if current <= revision:
                return Changes(current, frozenset())
            rows = s.execute(
                select(RegistryChangeRow.revision, RegistryChangeRow.prompt)
                .where(RegistryChangeRow.revision > revision, RegistryChangeRow.revision <= current)
            ).all()
            if len(rows) < current - revision:  # pruned away: the reader is too far behind for the log
                return Changes(current, None)
            return Changes(current, frozenset(name for _, name in rows))

    def mark_changed(self, name: str) -> None:
        """Log a change of `name` that is not a row of its own here (for instance: its adapter files changed)."""
        with self._session() as s:
            self._changed(s, name)
            s.commit()

    def _load(self, s: Session, name: str) -> PromptRow:
        row = s.scalars(
            select(PromptRow).where(PromptRow.name == name)
            .options(selectinload(PromptRow.versions), selectinload(PromptRow.jobs))
        ).first()
        if row is None:
            raise NotFoundError(f"prompt '{name}' is not registered", param="name", code="prompt_not_found")
        return row

    def _lock_prompt(self, s: Session, name: str) -> int:
        """The prompt's id, its row locked until the commit: on PostgreSQL, writers that number one prompt's
        versions take turns instead of colliding on the unique constraint and retrying (16 threads: ten
        attempts per version). SQLite has one writer at a time already and ignores the lock."""
        prompt_id = s.scalar(select(PromptRow.id).where(PromptRow.name == name).with_for_update(key_share=True))
        if prompt_id is None:
            raise NotFoundError(f"prompt '{name}' is not registered", param="name", code="prompt_not_found")
        return prompt_id

    def _prompt_id(self, s: Session, name: str) -> int:
        prompt_id = s.scalar(select(PromptRow.id).where(PromptRow.name == name))
        if prompt_id is None:
            raise NotFoundError(f"prompt '{name}' is not registered", param="name", code="prompt_not_found")
        return prompt_id

    # -- prompts -------------------------------------------------------------------------------

    def create(self, name: str, kind: str, template: Any, examples: list[dict[str, str]]) -> PromptRecord:
        check_prompt_name(name)
        with self._session() as s:
            row = PromptRow(name=name, kind=kind, template=template, examples=examples, created_at=utcnow())
            s.add(row)
            try:
                s.flush()  # a name taken shows here, before the change is logged
                self._changed(s, name)
                s.commit()
            except IntegrityError as exc:
                raise ConflictError(f"prompt '{name}' already exists", param="name", code="prompt_exists") from exc
            return self.get(name)

    def get(self, name: str) -> PromptRecord:
        with self._session() as s:
            return _prompt(self._load(s, name))

    def all(self) -> list[PromptRecord]:
        with self._session() as s:
            rows = s.scalars(
                select(PromptRow).order_by(PromptRow.name)
                .options(selectinload(PromptRow.versions), selectinload(PromptRow.jobs))
            ).all()
            return [_prompt(r) for r in rows]

    def delete(self, name: str) -> PromptRecord:
        with self._session() as s:
            row = self._load(s, name)
            record = _prompt(row)
            s.delete(row)
            self._changed(s, name)
            s.commit()
            return record

    # -- adapter versions ----------------------------------------------------------------------

    def allocate_version(self, name: str, status: str, source: str, store: AdapterStore | None = None) -> int:
        """Insert a prompt's next version and return its number: above every version in the database and
        every `v<N>` folder in the adapter store (the trainer's CLI writes some outside the registry)."""
        return self._insert_next_version(name, status, source,
                                         (lambda: store.highest_version(name)) if store is not None else (lambda: 0))

    def _insert_next_version(self, name: str, status: str, source: str, on_disk: Callable[[], int]) -> int:
        """Two writers that pick the same number collide on the (prompt, version) unique constraint: the
        loser rolls back and takes the next number, so concurrent uploads and trainings never clash."""
        for _ in range(VERSION_ATTEMPTS):
            floor = on_disk()
            with self._session() as s:
                prompt_id = self._lock_prompt(s, name)
                highest = s.scalar(select(func.max(AdapterVersionRow.version))
                                   .where(AdapterVersionRow.prompt_id == prompt_id))
                number = max(floor, highest or 0) + 1
                s.add(AdapterVersionRow(prompt_id=prompt_id, version=number, status=status, source=source,
                                        created_at=utcnow()))
                try:
                    s.flush()
                    self._changed(s, name)
                    s.commit()
                except IntegrityError:
                    s.rollback()  # taken meanwhile (or the prompt deleted: the next look-up says so)
                    continue
                return number
        raise ConflictError(f"no free version number for '{name}' after {VERSION_ATTEMPTS} attempts",
                            param="name", code="version_conflict")

    def get_version(self, name: str, version: int) -> VersionRecord:
        with self._session() as s:
            row = s.scalars(
                select(AdapterVersionRow).join(PromptRow)
                .where(PromptRow.name == name, AdapterVersionRow.version == version)
            ).first()
            if row is None:
                self._prompt_id(s, name)
                raise NotFoundError(f"prompt '{name}' has no version {version}", code="version_not_found")
            return _version(row)

    def update_version(self, name: str, version: int, **changes: Any) -> None:
        with self._session() as s:
            row = self._load(s, name)
            match = next((v for v in row.versions if v.version == version), None)
            if match is None:
                raise NotFoundError(f"prompt '{name}' has no version {version}", code="version_not_found")
            for key, value in changes.items():
                setattr(match, key, value)
            self._changed(s, name)
            s.commit()

    def adapter_counts(self) -> dict[str, int]:
        with self._session() as s:
            rows = s.execute(
                select(AdapterVersionRow.status, func.count()).group_by(AdapterVersionRow.status)
            ).all()
            return dict(Counter({status: int(count) for status, count in rows}))

    # -- training jobs -------------------------------------------------------------------------

    def create_job(self, name: str, spec: dict[str, Any]) -> JobRecord:
        with self._session() as s:
            row = self._load(s, name)
            job = TrainJobRow(prompt_id=row.id, status="queued", spec=spec, created_at=utcnow())
            s.add(job)
            s.commit()
            return _job(job, name)

    def get_job(self, job_id: int) -> JobRecord | None:
        with self._session() as s:
            row = s.get(TrainJobRow, job_id)
            return None if row is None else _job(row, row.prompt.name)

    def next_queued_job(self) -> JobRecord | None:
        with self._session() as s:
            row = s.scalars(
                select(TrainJobRow).where(TrainJobRow.status == "queued").order_by(TrainJobRow.id)
            ).first()
            return None if row is None else _job(row, row.prompt.name)

    def running_jobs(self) -> list[JobRecord]:
        with self._session() as s:
            rows = s.scalars(select(TrainJobRow).where(TrainJobRow.status == "running")).all()
            return [_job(r, r.prompt.name) for r in rows]

    def update_job(self, job_id: int, **changes: Any) -> None:
        with self._session() as s:
            row = s.get(TrainJobRow, job_id)
            if row is None:
                return
            for key, value in changes.items():
                setattr(row, key, value)
            s.commit()

    def acquire_lease(self, owner: str, ttl: timedelta) -> bool:
        """Take or renew the single job-runner lease; False while another live runner holds it."""
        now = utcnow()
        with self._session() as s:
            row = s.get(RunnerLeaseRow, 1, with_for_update=True)
            if row is None:
                s.add(RunnerLeaseRow(id=1, owner=owner, heartbeat_at=now))
            else:
                beat = row.heartbeat_at if row.heartbeat_at.tzinfo else row.heartbeat_at.replace(tzinfo=now.tzinfo)
                if row.owner != owner and now - beat < ttl:
                    return False
                row.owner, row.heartbeat_at = owner, now
            try:
                s.commit()
            except IntegrityError:
                return False
            return True

    def release_lease(self, owner: str) -> None:
        with self._session() as s:
            row = s.get(RunnerLeaseRow, 1)
            if row is not None and row.owner == owner:
                s.delete(row)
                s.commit()
