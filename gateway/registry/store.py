"""PromptRegistry: persistent prompts, adapter versions and training jobs (SQLAlchemy).

The data layer: it raises the system's own errors (`core.errors`), which the gateway maps to HTTP in
one place, and it is the one place where adapter version numbers are made.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, create_engine, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from core.adapter_store import AdapterStore
from core.errors import ConflictError, InvalidInput, NotFoundError
from gateway.registry.db import (
    AdapterVersionRow,
    DiscoveryClusterRow,
    DiscoveryRegisteredRow,
    PromptRow,
    RegistryChangeRow,
    RegistryStateRow,
    TrafficRow,
    TrainJobRow,
    database_url,
    enable_sqlite_foreign_keys,
    prepare_sqlite_file,
    utcnow,
)
from gateway.registry.migrate import Migration, upgrade_to_head

PROMPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = frozenset({"candidates"})  # `/v1/prompts/candidates` lists discovered prompts
VERSION_STATUSES = ("training", "loading", "ready", "failed", "rejected")
JOB_ACTIVE = ("queued", "running")
VERSION_ATTEMPTS = 100  # each failed attempt means another writer took a number: progress, not a stall
CLAIM_CANDIDATES = 10  # jobs a runner tries per look when others take them first
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
    lease_owner: str | None = None  # the runner that holds the job (while it runs)
    lease_expires: datetime | None = None


@dataclass(frozen=True)
class JobLease:
    """A job claimed by a runner: the token that every write of the runner for this job must match."""

    job: JobRecord
    token: str
    expires: datetime
    taken_over: bool  # the job was running under a runner whose lease expired


@dataclass(frozen=True)
class PromptRecord:
    name: str
    tenant: str | None  # None: a global prompt, matched for every tenant
    kind: str
    template: Any
    examples: list[dict[str, str]]
    created: datetime
    versions: list[VersionRecord] = field(default_factory=list)
    jobs: list[JobRecord] = field(default_factory=list)
    record: dict[str, Any] | None = None  # recording of its fallback answers: {rate, max_rows}; None: off
    guard: dict[str, Any] | None = None  # shadow guard: {shadow_rate, min_agreement, window, metric}; None: off
    serving: dict[str, Any] | None = None  # merged serving: {mode, url, engine: {...}}; None: LoRA

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
class TrafficRecord:
    """One recorded answer: the request's slot values and the answer served."""

    tenant: str | None
    slots: dict[str, str]
    response: str
    model: str
    created: datetime


@dataclass(frozen=True)
class DiscoveredPrompt:
    """A recurring prompt found in passthrough traffic: one replica's counts, or (read back) every replica's added
    up. `chars_total` counts the characters of every request; `static_chars` the template's without slots."""

    id: str
    tenant: str | None
    kind: str
    template: Any
    slots: list[str]
    requests: int
    chars_total: int
    static_chars: int
    examples: list[dict[str, str]]
    first_seen: datetime
    last_seen: datetime


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
                     row.created_at, row.started_at, row.finished_at, row.lease_owner, row.lease_expires_at)


def _prompt(row: PromptRow) -> PromptRecord:
    return PromptRecord(row.name, row.tenant, row.kind, row.template, list(row.examples or []), row.created_at,
                        [_version(v) for v in row.versions], [_job(j, row.name) for j in row.jobs], row.record,
                        row.guard, row.serving)


def check_prompt_name(name: str) -> None:
    if not PROMPT_NAME.fullmatch(name):
        raise InvalidInput(
            "a prompt name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            param="name", code="invalid_name")
    if name in RESERVED_NAMES:
        raise InvalidInput(f"'{name}' is a reserved name (GET /v1/prompts/{name} is a route of its own)",
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

    def create(self, name: str, kind: str, template: Any, examples: list[dict[str, str]],
               tenant: str | None = None, record: dict[str, Any] | None = None) -> PromptRecord:
        check_prompt_name(name)
        with self._session() as s:
            row = PromptRow(name=name, tenant=tenant, kind=kind, template=template, examples=examples,
                            record=record, created_at=utcnow())
            s.add(row)
            try:
                s.flush()  # a name taken shows here, before the change is logged
                self._changed(s, name)
                s.commit()
            except IntegrityError as exc:
                raise ConflictError(f"prompt '{name}' already exists", param="name", code="prompt_exists") from exc
            return self.get(name)

    @contextmanager
    def _snapshot(self) -> Iterator[Session]:
        """A read-only session whose SELECTs all see one snapshot of the database: a prompt read with its versions
        and jobs (three SELECTs) never mixes states from before and after another writer's commit. PostgreSQL
        runs it at REPEATABLE READ (a read-only transaction there never fails to serialise); SQLite's driver
        starts no transaction for a SELECT by itself, so this one begins it (in WAL mode readers never block
        writers). The session's end rolls it back."""
        with self._session() as s:
            if self.engine.dialect.name == "sqlite":
                s.execute(text("BEGIN"))
            else:
                s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield s

    def get(self, name: str) -> PromptRecord:
        with self._snapshot() as s:
            return _prompt(self._load(s, name))

    def all(self) -> list[PromptRecord]:
        with self._snapshot() as s:
            rows = s.scalars(
                select(PromptRow).order_by(PromptRow.name)
                .options(selectinload(PromptRow.versions), selectinload(PromptRow.jobs))
            ).all()
            return [_prompt(r) for r in rows]

    def routing_records(self) -> list[PromptRecord]:
        """Every prompt with its versions, no jobs and no examples: what a replica routes by, read with two plain
        selects (no ORM objects), so a start-up with 100,000 prompts reads them in seconds."""
        with self._session() as s:
            versions: dict[int, list[VersionRecord]] = {}
            for row in s.execute(
                select(AdapterVersionRow.prompt_id, AdapterVersionRow.version, AdapterVersionRow.status,
                       AdapterVersionRow.source, AdapterVersionRow.path, AdapterVersionRow.manifest,
                       AdapterVersionRow.error, AdapterVersionRow.created_at)
                .order_by(AdapterVersionRow.prompt_id, AdapterVersionRow.version)
            ):
                versions.setdefault(row[0], []).append(VersionRecord(*row[1:]))
            return [PromptRecord(name, tenant, kind, template, [], created, versions.get(prompt_id, []), [], record,
                                 serving=serving)
                    for prompt_id, name, tenant, kind, template, created, record, serving in s.execute(
                        select(PromptRow.id, PromptRow.name, PromptRow.tenant, PromptRow.kind, PromptRow.template,
                               PromptRow.created_at, PromptRow.record, PromptRow.serving).order_by(PromptRow.name))]

    def delete(self, name: str) -> PromptRecord:
        with self._session() as s:
            row = self._load(s, name)
            record = _prompt(row)
            s.delete(row)
            self._changed(s, name)
            s.commit()
            return record

    def set_record(self, name: str, record: dict[str, Any] | None) -> PromptRecord:
        """Replace the prompt's recording setting (None: off); every replica follows it through the change log."""
        return self._set_setting(name, record=record)

    def set_guard(self, name: str, guard: dict[str, Any] | None) -> PromptRecord:
        """Replace the prompt's shadow guard setting (None: off); every replica follows it."""
        return self._set_setting(name, guard=guard)

    def _set_setting(self, name: str, **setting: dict[str, Any] | None) -> PromptRecord:
        with self._session() as s:
            prompt_id = self._lock_prompt(s, name)
            s.execute(update(PromptRow).where(PromptRow.id == prompt_id).values(**setting)
                      .execution_options(synchronize_session=False))
            self._changed(s, name)
            s.commit()
        return self.get(name)

    def reject_active(self, name: str, version: int, reason: str) -> bool:
        """Roll the prompt back from `version`: mark it `rejected` with `reason`, only if it is still the prompt's
        active version (its newest ready one). A compare-and-set under the prompt's lock, so replicas judging the
        same version at once roll back once: the others get False. The previous ready version (or, with none,
        the fallback route) takes over on every replica through the change log."""
        with self._session() as s:
            try:
                prompt_id = self._lock_prompt(s, name)
            except NotFoundError:
                return False
            newest = s.scalar(select(func.max(AdapterVersionRow.version))
                              .where(AdapterVersionRow.prompt_id == prompt_id, AdapterVersionRow.status == "ready"))
            if newest != version:
                s.rollback()
                return False
            s.execute(update(AdapterVersionRow)
                      .where(AdapterVersionRow.prompt_id == prompt_id, AdapterVersionRow.version == version)
                      .values(status="rejected", error=reason).execution_options(synchronize_session=False))
            self._changed(s, name)
            s.commit()
            return True

    # -- merged serving: the setting, and its engine under one replica's lease ------------------------
    # `serving` is `{mode, url, engine: {owner, expires, endpoint, version, error}}`; None: LoRA. The replica
    # whose name is `engine.owner` (until `engine.expires`) merges the active version and, without `url`, runs
    # its engine; every replica routes to `engine.endpoint` (or `url`) once it answers there.

    def set_serving(self, name: str, serving: dict[str, Any] | None) -> PromptRecord:
        """Replace the prompt's serving setting (`{mode, url}`; None: LoRA). The engine state stays when the setting
        is unchanged (a repeated PATCH), else it starts afresh; every replica follows through the change log."""
        with self._session() as s:
            prompt_id = self._lock_prompt(s, name)
            old = s.scalar(select(PromptRow.serving).where(PromptRow.id == prompt_id)) or {}
            value = None
            if serving is not None:
                value = dict(serving)
                same = (old.get("mode"), old.get("url")) == (serving.get("mode"), serving.get("url"))
                if same and old.get("engine"):
                    value["engine"] = old["engine"]
            s.execute(update(PromptRow).where(PromptRow.id == prompt_id).values(serving=value)
                      .execution_options(synchronize_session=False))
            self._changed(s, name)
            s.commit()
        return self.get(name)

    def merged_prompts(self) -> dict[str, dict[str, Any]]:
        """The serving setting of every prompt served merged (what a replica's supervisor looks after)."""
        with self._session() as s:
            rows = s.execute(select(PromptRow.name, PromptRow.serving).where(PromptRow.serving.is_not(None))).all()
            return {name: dict(serving) for name, serving in rows if serving and serving.get("mode") == "merged"}

    def claim_serving(self, name: str, owner: str, ttl: timedelta) -> dict[str, Any] | None:
        """Take (or renew) the lease on the prompt's merged engine; its serving setting if this replica holds it now,
        None if another does, or the prompt is not (or no longer) served merged. Taking over an expired lease drops
        the endpoint of the engine that went with it."""
        now = utcnow()
        with self._locked_serving(name) as locked:
            if locked is None:
                return None
            s, prompt_id, serving = locked
            if serving.get("mode") != "merged":
                return None
            engine = dict(serving.get("engine") or {})
            expires = engine.get("expires")
            held_by_other = (engine.get("owner") not in (None, owner) and expires is not None
                             and datetime.fromisoformat(expires) > now)
            if held_by_other:
                return None
            changed = engine.get("owner") != owner and bool(engine.get("endpoint"))
            if engine.get("owner") != owner:
                engine = {"owner": owner, "endpoint": None, "version": None, "error": None}
            engine["expires"] = (now + ttl).isoformat()
            serving["engine"] = engine
            self._save_serving(s, prompt_id, name, serving, changed)
            return serving

    def update_serving_engine(self, name: str, owner: str, ttl: timedelta, **fields: Any) -> bool:
        """Record the merged engine's `endpoint`, `version` or `error` (and renew the lease), only while `owner` holds
        it; a change other replicas route by goes through the change log. False when the lease is lost."""
        with self._locked_serving(name) as locked:
            if locked is None:
                return False
            s, prompt_id, serving = locked
            engine = dict(serving.get("engine") or {})
            if serving.get("mode") != "merged" or engine.get("owner") != owner:
                return False
            changed = any(engine.get(key) != value for key, value in fields.items())
            engine.update(fields, expires=(utcnow() + ttl).isoformat())
            serving["engine"] = engine
            self._save_serving(s, prompt_id, name, serving, changed)
            return True

    def release_serving(self, name: str, owner: str) -> None:
        """Give up the lease on the prompt's merged engine (its engine stopped), if `owner` holds it."""
        with self._locked_serving(name) as locked:
            if locked is None:
                return
            s, prompt_id, serving = locked
            if (serving.get("engine") or {}).get("owner") != owner:
                return
            serving.pop("engine")
            self._save_serving(s, prompt_id, name, serving, changed=True)

    @contextmanager
    def _locked_serving(self, name: str) -> Iterator[tuple[Session, int, dict[str, Any]] | None]:
        """A transaction holding the prompt's row lock, with its serving setting (a copy); None: no such prompt."""
        with self._session() as s:
            try:
                prompt_id = self._lock_prompt(s, name)
            except NotFoundError:
                yield None
                return
            yield s, prompt_id, dict(s.scalar(select(PromptRow.serving).where(PromptRow.id == prompt_id)) or {})

    def _save_serving(self, s: Session, prompt_id: int, name: str, serving: dict[str, Any], changed: bool) -> None:
        """Write the serving setting (None once empty) and commit; `changed`: other replicas route by the change."""
        s.execute(update(PromptRow).where(PromptRow.id == prompt_id).values(serving=serving or None)
                  .execution_options(synchronize_session=False))
        if changed:
            self._changed(s, name)
        s.commit()

    # -- recorded traffic (a ring buffer per prompt; not a routing change: no change log) ---------

    def add_traffic(self, name: str, tenant: str | None, slots: dict[str, str], response: str, model: str,
                    max_rows: int) -> bool:
        """Keep one recorded answer, dropping the prompt's oldest beyond `max_rows`; False if the prompt is gone."""
        with self._session() as s:
            prompt_id = s.scalar(select(PromptRow.id).where(PromptRow.name == name))
            if prompt_id is None:
                return False
            try:
                s.add(TrafficRow(prompt_id=prompt_id, tenant=tenant, slots=slots, response=response, model=model,
                                 created_at=utcnow()))
                s.flush()
                newest_dropped = s.scalar(select(TrafficRow.id).where(TrafficRow.prompt_id == prompt_id)
                                          .order_by(TrafficRow.id.desc()).offset(max_rows).limit(1))
                if newest_dropped is not None:
                    s.execute(delete(TrafficRow)
                              .where(TrafficRow.prompt_id == prompt_id, TrafficRow.id <= newest_dropped)
                              .execution_options(synchronize_session=False))
                s.commit()
            except IntegrityError:  # the prompt was deleted meanwhile
                s.rollback()
                return False
            return True

    def traffic(self, name: str, limit: int | None = None) -> tuple[int, list[TrafficRecord]]:
        """How many answers the prompt has recorded, and the newest `limit` of them (all: None), newest first."""
        with self._session() as s:
            prompt_id = self._prompt_id(s, name)
            total = int(s.scalar(select(func.count()).select_from(TrafficRow)
                                 .where(TrafficRow.prompt_id == prompt_id)) or 0)
            query = (select(TrafficRow.tenant, TrafficRow.slots, TrafficRow.response, TrafficRow.model,
                            TrafficRow.created_at)
                     .where(TrafficRow.prompt_id == prompt_id).order_by(TrafficRow.id.desc()))
            if limit is not None:
                query = query.limit(limit)
            return total, [TrafficRecord(*row) for row in s.execute(query)]

    def purge_traffic(self, name: str) -> int:
        """Delete the prompt's recorded answers; how many there were."""
        with self._session() as s:
            prompt_id = self._prompt_id(s, name)
            result = s.execute(delete(TrafficRow).where(TrafficRow.prompt_id == prompt_id)
                               .execution_options(synchronize_session=False))
            s.commit()
            return int(getattr(result, "rowcount", 0) or 0)

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

    # -- job leases ----------------------------------------------------------------------------
    # A runner holds a job under a fenced lease: a random token set by compare-and-set. Every later write of the
    # runner for that job matches the token in its WHERE clause, so a runner that lost the job (its lease expired
    # and another took the job over, or the prompt was deleted) changes nothing: its UPDATE finds no row.

    @staticmethod
    def _held(job_id: int, token: str) -> tuple[ColumnElement[bool], ...]:
        return TrainJobRow.id == job_id, TrainJobRow.lease_token == token, TrainJobRow.status == "running"

    @staticmethod
    def _lock_prompt_of_job(s: Session, job_id: int) -> bool:
        """Lock the job's prompt row first, as every writer of a prompt's versions does (`_lock_prompt`), so a
        fenced write and a delete of the prompt take turns instead of deadlocking; False if the job is gone."""
        prompt_id = s.scalar(
            select(PromptRow.id)
            .where(PromptRow.id == select(TrainJobRow.prompt_id).where(TrainJobRow.id == job_id).scalar_subquery())
            .with_for_update(key_share=True))
        return prompt_id is not None

    @staticmethod
    def _expired(now: datetime) -> ColumnElement[bool]:
        """A running job's lease that ran out (or a job left running without one, by an older release)."""
        return or_(TrainJobRow.lease_expires_at.is_(None), TrainJobRow.lease_expires_at <= now)

    def claim_job(self, owner: str, ttl: timedelta, max_attempts: int) -> JobLease | None:
        """Take the oldest job that is queued, or running under an expired lease (its runner died: a takeover);
        None when there is none. A job already started `max_attempts` times is given up (`interrupted`)
        instead of taken over. Comparing each runner's clock with the expiry another wrote: hosts' clocks must
        agree to well within the lease's time to live."""
        for _ in range(CLAIM_CANDIDATES):
            now = utcnow()
            with self._session() as s:
                candidates = s.execute(
                    select(TrainJobRow.id, TrainJobRow.status, TrainJobRow.lease_token, TrainJobRow.attempts)
                    .where(or_(TrainJobRow.status == "queued",
                               (TrainJobRow.status == "running") & self._expired(now)))
                    .order_by(TrainJobRow.id).limit(CLAIM_CANDIDATES)
                ).all()
            if not candidates:
                return None
            for job_id, status, token, attempts in candidates:
                lease = self._try_claim(job_id, status, token, attempts, owner, ttl, max_attempts)
                if lease is not None:
                    return lease
        return None  # others keep taking what this runner sees: it looks again at its next tick

    def _try_claim(self, job_id: int, status: str, token: str | None, attempts: int, owner: str, ttl: timedelta,
                   max_attempts: int) -> JobLease | None:
        """Compare-and-set one candidate as it was seen; None if it changed meanwhile or was not taken."""
        now = utcnow()
        fence = [TrainJobRow.id == job_id, TrainJobRow.status == status, TrainJobRow.attempts == attempts,
                 TrainJobRow.lease_token.is_(None) if token is None else TrainJobRow.lease_token == token]
        takeover = status == "running"
        if takeover:
            fence.append(self._expired(now))
        no_lease = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}
        with self._session() as s:
            if not self._lock_prompt_of_job(s, job_id):
                return None
            if takeover and attempts >= max_attempts:
                reason = f"interrupted: its training runner stopped {attempts} times; giving up"
                if self._cas_job(s, fence, status="interrupted", finished_at=now, error=reason, **no_lease):
                    self._fail_job_version(s, job_id, reason)
                    s.commit()
                return None
            new_token = secrets.token_hex(16)
            claimed = self._cas_job(
                s, fence, status="running", attempts=attempts + 1, started_at=now, finished_at=None,
                lease_owner=owner, lease_token=new_token, lease_expires_at=now + ttl,
                error="taken over: its previous runner stopped" if takeover else None,
                **({} if takeover else {"progress": {"phase": "starting"}, "version": None}))
            if not claimed:
                s.rollback()
                return None
            row = s.get(TrainJobRow, job_id)
            assert row is not None
            if takeover and row.version is not None:
                previous = self._job_version(s, row)
                if previous is not None and previous.status == "ready":
                    # Published, but its runner stopped before recording the job's end: the job is done.
                    self._cas_job(s, self._held(job_id, new_token), status="succeeded", finished_at=now,
                                  error=None, progress={"phase": "done"}, attempts=attempts, **no_lease)
                    s.commit()
                    return None
                self._fail_job_version(s, job_id, "interrupted: its training runner stopped; the job was taken over")
                row.version, row.progress = None, {"phase": "starting"}
            s.commit()
            return JobLease(_job(row, row.prompt.name), new_token, now + ttl, takeover)

    @staticmethod
    def _cas_job(s: Session, where: Any, **values: Any) -> bool:
        """One compare-and-set UPDATE of a job row; whether it matched."""
        result = s.execute(update(TrainJobRow).where(*where).values(**values)
                           .execution_options(synchronize_session=False))
        return bool(getattr(result, "rowcount", 0) == 1)

    @staticmethod
    def _job_version(s: Session, row: TrainJobRow) -> AdapterVersionRow | None:
        if row.version is None:
            return None
        return s.scalars(select(AdapterVersionRow).where(AdapterVersionRow.prompt_id == row.prompt_id,
                                                         AdapterVersionRow.version == row.version)).first()

    def _fail_job_version(self, s: Session, job_id: int, reason: str) -> None:
        """Fail the version a job was making, if still unfinished (in the caller's transaction)."""
        row = s.get(TrainJobRow, job_id)
        version = self._job_version(s, row) if row is not None else None
        if row is not None and version is not None and version.status in ("training", "loading"):
            version.status, version.error = "failed", reason
            self._changed(s, row.prompt.name)

    def renew_job_lease(self, job_id: int, token: str, ttl: timedelta, progress: dict[str, Any] | None = None) -> bool:
        """Extend the lease (and record the newest progress); False when the job is no longer this runner's."""
        values: dict[str, Any] = {"lease_expires_at": utcnow() + ttl}
        if progress is not None:
            values["progress"] = progress
        with self._session() as s:
            held = self._cas_job(s, self._held(job_id, token), **values)
            s.commit()
            return held

    def allocate_job_version(self, job_id: int, token: str, name: str, store: AdapterStore | None = None) -> int | None:
        """`allocate_version` for the job this runner holds: the new `training` version and the job's pointer to it
        are written together, only under the token; None when the job is no longer this runner's."""
        for _ in range(VERSION_ATTEMPTS):
            floor = store.highest_version(name) if store is not None else 0
            with self._session() as s:
                try:
                    prompt_id = self._lock_prompt(s, name)
                except NotFoundError:
                    return None  # deleted, and its jobs with it
                highest = s.scalar(select(func.max(AdapterVersionRow.version))
                                   .where(AdapterVersionRow.prompt_id == prompt_id))
                number = max(floor, highest or 0) + 1
                if not self._cas_job(s, self._held(job_id, token), version=number):
                    s.rollback()
                    return None
                s.add(AdapterVersionRow(prompt_id=prompt_id, version=number, status="training", source="train",
                                        created_at=utcnow()))
                try:
                    s.flush()
                    self._changed(s, name)
                    s.commit()
                except IntegrityError:
                    s.rollback()  # the number was taken meanwhile: the next one
                    continue
                return number
        raise ConflictError(f"no free version number for '{name}' after {VERSION_ATTEMPTS} attempts",
                            param="name", code="version_conflict")

    def stage_job_version(self, job_id: int, token: str, path: str, manifest: dict[str, Any]) -> bool:
        """The held job's version is trained: `loading`, with its folder and manifest; False when not held."""
        with self._session() as s:
            if not self._lock_prompt_of_job(s, job_id) or not self._cas_job(s, self._held(job_id, token),
                                                                            progress={"phase": "activating"}):
                s.rollback()
                return False
            row = s.get(TrainJobRow, job_id)
            version = self._job_version(s, row) if row is not None else None
            if row is None or version is None:
                s.rollback()
                return False
            version.status, version.path, version.manifest = "loading", path, manifest
            self._changed(s, row.prompt.name)
            s.commit()
            return True

    def finish_job(self, job_id: int, token: str, *, status: str, error: str | None = None,
                   progress: dict[str, Any] | None = None, version_status: str | None = None,
                   version_error: str | None = None) -> bool:
        """End the held job (`succeeded` or `failed`) and, with `version_status`, set its version's status in the
        same transaction (`ready`: published); False, and nothing written, when the job is not held."""
        values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow(), "lease_owner": None,
                                  "lease_token": None, "lease_expires_at": None}
        if progress is not None:
            values["progress"] = progress
        with self._session() as s:
            if not self._lock_prompt_of_job(s, job_id):
                return False
            row = s.get(TrainJobRow, job_id)  # read before the update: the fence below still decides
            version = self._job_version(s, row) if row is not None else None
            if row is None or not self._cas_job(s, self._held(job_id, token), **values):
                s.rollback()
                return False
            if version is not None and version_status is not None:
                version.status, version.error = version_status, version_error
                self._changed(s, row.prompt.name)
            s.commit()
            return True

    def release_job(self, job_id: int, token: str, reason: str) -> bool:
        """Hand a held job back (its runner is stopping): queued again without counting the attempt, its
        unfinished version failed (or, when its version was published already, the job succeeded); False when it
        was not held."""
        with self._session() as s:
            if not self._lock_prompt_of_job(s, job_id):
                return False
            row = s.get(TrainJobRow, job_id)
            version = self._job_version(s, row) if row is not None else None
            if version is not None and version.status == "ready":
                done = self._cas_job(s, self._held(job_id, token), status="succeeded", error=None,
                                     finished_at=utcnow(), progress={"phase": "done"}, lease_owner=None,
                                     lease_token=None, lease_expires_at=None)
                s.commit()
                return done
            if row is None or not self._cas_job(
                    s, self._held(job_id, token), status="queued", attempts=TrainJobRow.attempts - 1, error=reason,
                    started_at=None, progress=None, lease_owner=None, lease_token=None, lease_expires_at=None):
                s.rollback()
                return False
            self._fail_job_version(s, job_id, f"interrupted: {reason}")
            s.execute(update(TrainJobRow).where(TrainJobRow.id == job_id).values(version=None)
                      .execution_options(synchronize_session=False))
            s.commit()
            return True

    # -- prompt discovery (each replica's mined templates; not a routing change: no change log) ---------------

    def save_discovered(self, replica: str, found: list[DiscoveredPrompt], keep_requests: int) -> frozenset[str]:
        """Replace this replica's rows with what it found now (its counts since it started). Its rows for templates
        it no longer holds are dropped unless they reached `keep_requests`. Returns the registered candidates'
        ids, which the replica stops counting."""
        with self._session() as s:
            existing = {row.candidate_id: row for row in s.scalars(
                select(DiscoveryClusterRow).where(DiscoveryClusterRow.replica == replica))}
            for item in found:
                row = existing.pop(item.id, None)
                if row is None:
                    row = DiscoveryClusterRow(candidate_id=item.id, replica=replica)
                    s.add(row)
                row.tenant, row.kind, row.template, row.slots = item.tenant, item.kind, item.template, item.slots
                row.requests, row.chars_total, row.static_chars = item.requests, item.chars_total, item.static_chars
                row.examples, row.first_seen, row.last_seen = item.examples, item.first_seen, item.last_seen
            stale = [cid for cid, row in existing.items() if row.requests < keep_requests]
            if stale:
                s.execute(delete(DiscoveryClusterRow).where(DiscoveryClusterRow.replica == replica,
                                                            DiscoveryClusterRow.candidate_id.in_(stale)))
            registered = frozenset(s.scalars(select(DiscoveryRegisteredRow.candidate_id)))
            s.commit()
            return registered

    def discovered(self, candidate_id: str | None = None) -> list[DiscoveredPrompt]:
        """Every replica's rows added up per candidate (one candidate: `candidate_id`), registered ones left out."""
        with self._session() as s:
            query = select(DiscoveryClusterRow).where(DiscoveryClusterRow.candidate_id.not_in(
                select(DiscoveryRegisteredRow.candidate_id)))
            if candidate_id is not None:
                query = query.where(DiscoveryClusterRow.candidate_id == candidate_id)
            merged: dict[str, DiscoveredPrompt] = {}
            for row in s.scalars(query.order_by(DiscoveryClusterRow.candidate_id, DiscoveryClusterRow.replica)):
                seen = merged.get(row.candidate_id)
                if seen is None:
                    merged[row.candidate_id] = DiscoveredPrompt(
                        row.candidate_id, row.tenant, row.kind, row.template, list(row.slots), row.requests,
                        row.chars_total, row.static_chars, list(row.examples)[:3], row.first_seen, row.last_seen)
                    continue
                merged[row.candidate_id] = DiscoveredPrompt(
                    seen.id, seen.tenant, seen.kind, seen.template, seen.slots, seen.requests + row.requests,
                    seen.chars_total + row.chars_total, seen.static_chars, (seen.examples + list(row.examples))[:3],
                    min(seen.first_seen, row.first_seen), max(seen.last_seen, row.last_seen))
            return list(merged.values())

    def claim_discovered(self, candidate_id: str, prompt: str) -> bool:
        """Mark a candidate registered as `prompt`; False when it already was (by another request or replica)."""
        with self._session() as s:
            s.add(DiscoveryRegisteredRow(candidate_id=candidate_id, prompt=prompt, created_at=utcnow()))
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return False
            return True

    def release_discovered(self, candidate_id: str) -> None:
        """Undo `claim_discovered` (the registration it was for failed)."""
        with self._session() as s:
            s.execute(delete(DiscoveryRegisteredRow).where(DiscoveryRegisteredRow.candidate_id == candidate_id))
            s.commit()
