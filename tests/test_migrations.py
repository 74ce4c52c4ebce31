"""Schema migrations, on SQLite and on a real PostgreSQL: a fresh database reaches head, an older one keeps its
rows, the migrations go down and up again, and however many processes start at once, one migrates."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from gateway.registry.db import Base
from gateway.registry.migrate import (
    BASELINE,
    PG_LOCK_KEY,
    Migration,
    alembic_config,
    head_revision,
    migration_lock,
    upgrade_to_head,
)
from gateway.registry.store import PromptRegistry
from tests.pg import PostgresServer

# The DDL wave 1's `Base.metadata.create_all` left in a SQLite file (sqlite_master at 8f08c39, lines joined).
WAVE1_SCHEMA = """
CREATE TABLE prompts (
	id INTEGER NOT NULL, name VARCHAR(64) NOT NULL, kind VARCHAR(16) NOT NULL, template JSON NOT NULL,
	examples JSON NOT NULL, created_at DATETIME NOT NULL, PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_prompts_name ON prompts (name);
CREATE TABLE runner_lease (
	id INTEGER NOT NULL, owner VARCHAR(128) NOT NULL, heartbeat_at DATETIME NOT NULL, PRIMARY KEY (id)
);
CREATE TABLE adapter_versions (
	id INTEGER NOT NULL, prompt_id INTEGER NOT NULL, version INTEGER NOT NULL, status VARCHAR(16) NOT NULL,
	source VARCHAR(16) NOT NULL, path TEXT, manifest JSON, error TEXT, created_at DATETIME NOT NULL,
	PRIMARY KEY (id), UNIQUE (prompt_id, version),
	FOREIGN KEY(prompt_id) REFERENCES prompts (id) ON DELETE CASCADE
);
CREATE INDEX ix_adapter_versions_prompt_id ON adapter_versions (prompt_id);
CREATE TABLE train_jobs (
	id INTEGER NOT NULL, prompt_id INTEGER NOT NULL, status VARCHAR(16) NOT NULL, spec JSON NOT NULL,
	progress JSON, error TEXT, attempts INTEGER NOT NULL, version INTEGER, created_at DATETIME NOT NULL,
	started_at DATETIME, finished_at DATETIME, PRIMARY KEY (id),
	FOREIGN KEY(prompt_id) REFERENCES prompts (id) ON DELETE CASCADE
);
CREATE INDEX ix_train_jobs_prompt_id ON train_jobs (prompt_id);
CREATE INDEX ix_train_jobs_status ON train_jobs (status);
"""

WAVE1_ROWS = """
INSERT INTO prompts VALUES (1, 'shell', 'chat', '[{"role": "user", "content": "Q: {query}"}]', '[]',
                            '2026-11-20 10:00:00.000000');
INSERT INTO adapter_versions VALUES (1, 1, 1, 'ready', 'upload', '/adapters/shell/v1', '{"prompt": "shell"}', NULL,
                                     '2026-11-20 10:01:00.000000');
INSERT INTO adapter_versions VALUES (2, 1, 2, 'failed', 'train', NULL, NULL, 'the trained adapter did not load',
                                     '2026-11-21 09:00:00.000000');
INSERT INTO train_jobs VALUES (1, 1, 'failed', '{"rows": []}', NULL, 'boom', 1, 2, '2026-11-21 08:59:00.000000',
                               '2026-11-21 09:00:00.000000', '2026-11-21 09:05:00.000000');
INSERT INTO runner_lease VALUES (1, 'old-replica', '2026-11-21 09:05:00.000000');
"""


def schema_differences(url: str) -> list[Any]:
    """What Alembic's autogenerate would still have to change to make the database match the models."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


def migrate(url: str, revision: str, down: bool = False) -> None:
    """Alembic's own upgrade or downgrade to `revision`, as `alembic upgrade` would run it."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(connection)
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def test_a_fresh_database_migrates_to_head_and_matches_the_models(database_url: str) -> None:
    url = database_url
    registry = PromptRegistry(url)
    assert registry.migration == Migration(before=None, stamped_wave1=False, after=head_revision())
    registry.close()
    assert schema_differences(url) == []
    again = PromptRegistry(url)  # the usual restart: already at head, nothing to do
    assert again.migration == Migration(before=head_revision(), stamped_wave1=False, after=head_revision())
    again.close()


def test_the_migrations_go_down_to_nothing_and_up_again(database_url: str) -> None:
    migrate(database_url, "head")
    migrate(database_url, "base", down=True)
    engine = create_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    migrate(database_url, "head")
    assert schema_differences(database_url) == []


def test_a_baseline_database_with_rows_upgrades_and_numbering_continues(database_url: str) -> None:
    """A database at 0001 (what a replica of the first release made) keeps its rows through 0002, and new rows
    are numbered after them: on PostgreSQL each id sequence carries on from where it was."""
    migrate(database_url, BASELINE)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":  # wave 1 wrote UTC times without a zone
                connection.execute(text("SET LOCAL TIME ZONE 'UTC'"))
            for statement in WAVE1_ROWS.strip().split(";\n"):
                if statement.strip():
                    connection.execute(text(statement.strip().rstrip(";")))
            if engine.dialect.name == "postgresql":  # explicit ids, as wave 1 wrote them: the sequences follow
                for table in ("prompts", "adapter_versions", "train_jobs", "runner_lease"):
                    connection.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                            f"(SELECT max(id) FROM {table}))"))
    finally:
        engine.dispose()

    registry = PromptRegistry(database_url)
    try:
        assert registry.migration == Migration(before=BASELINE, stamped_wave1=False, after=head_revision())
        record = registry.get("shell")
        assert [(v.version, v.status) for v in record.versions] == [(1, "ready"), (2, "failed")]
        assert record.created.isoformat() == "2026-11-20T10:00:00+00:00"  # stored without a zone: UTC
        job = registry.get_job(1)
        assert job is not None and (job.status, job.error, job.spec) == ("failed", "boom", {"rows": []})
        assert registry.create_job("shell", {"rows": 2}).id == 2
        registry.create("other", "chat", [{"role": "user", "content": "{query}"}], [])  # prompts' ids go on too
        assert registry.allocate_version("shell", "loading", "upload") == 3
        assert registry.changes_since(0).prompts == frozenset({"other", "shell"})
    finally:
        registry.close()
    assert schema_differences(database_url) == []


def test_a_wave1_database_is_stamped_and_upgraded_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "wave1.db"
    with sqlite3.connect(path) as db:
        db.executescript(WAVE1_SCHEMA + WAVE1_ROWS)
    url = f"sqlite:///{path}"

    registry = PromptRegistry(url)
    assert registry.migration == Migration(before=None, stamped_wave1=True, after=head_revision())
    record = registry.get("shell")
    assert record.template == [{"role": "user", "content": "Q: {query}"}]
    assert [(v.version, v.status, v.source) for v in record.versions] == [(1, "ready", "upload"),
                                                                          (2, "failed", "train")]
    assert record.versions[0].manifest == {"prompt": "shell"}
    assert record.active_version is not None and record.active_version.version == 1
    job = registry.get_job(1)
    assert job is not None and (job.status, job.version, job.error) == ("failed", 2, "boom")
    assert registry.allocate_version("shell", "loading", "upload") == 3  # numbering continues after wave 1
    registry.close()
    assert schema_differences(url) == []
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]


def test_the_revisions_form_one_line_from_the_baseline() -> None:
    """Every migration follows exactly one other (no branches), starting at wave 1's schema, which already has
    the (prompt, version) unique constraint."""
    from alembic.script import ScriptDirectory

    from gateway.registry.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1 and head_revision() != BASELINE
    chain = [r.revision for r in script.walk_revisions()]
    assert chain[-1] == BASELINE and chain[0] == head_revision()
    uniques = inspect_fresh_uniques()
    assert {"prompt_id", "version"} in [set(u["column_names"]) for u in uniques]


def test_job_ids_are_never_reused_after_a_delete(tmp_path: Path) -> None:
    """Wave 1's SQLite table gave a deleted last job's id to the next job; the migrated one never does."""
    path = tmp_path / "wave1.db"
    with sqlite3.connect(path) as db:
        db.executescript(WAVE1_SCHEMA + WAVE1_ROWS)
    registry = PromptRegistry(f"sqlite:///{path}")
    try:
        first = registry.create_job("shell", {"rows": 1})
        assert first.id == 2  # after wave 1's job 1, whose row the migration kept
        registry.delete("shell")
        registry.create("shell", "chat", [{"role": "user", "content": "Q: {query}"}], [])
        again = registry.create_job("shell", {"rows": 1})
        assert again.id == 3 and again.created.tzinfo is not None
        assert registry.get("shell").jobs[0].created.utcoffset() is not None  # read back aware, as written
    finally:
        registry.close()


def inspect_fresh_uniques() -> list[Any]:
    engine = create_engine("sqlite://")
    try:
        upgrade_to_head(engine)
        return list(inspect(engine).get_unique_constraints("adapter_versions"))
    finally:
        engine.dispose()


def _migrate_in_a_child(url: str, ready: Event, results: Any) -> None:
    ready.set()
    outcome = upgrade_to_head(create_engine(url))
    results.put((outcome.before, outcome.after))


def _advisory_lock_waiters(server: PostgresServer, database: str) -> int:
    with server.connect(database) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = %s "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s", (database, PG_LOCK_KEY)).fetchone()
    return int(row[0]) if row else 0


def test_two_processes_starting_at_once_migrate_once(database_url: str, request: Any) -> None:
    """Both children reach the migration while the lock is held (on PostgreSQL: seen waiting for the advisory
    lock in pg_locks); released, exactly one of them migrates."""
    url = database_url
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    readies = [context.Event() for _ in range(2)]
    children = [context.Process(target=_migrate_in_a_child, args=(url, ready, results)) for ready in readies]
    engine = create_engine(url)
    with migration_lock(engine):
        for child in children:
            child.start()
        for ready in readies:
            assert ready.wait(120), "a child process did not start"
        if engine.dialect.name == "postgresql":
            server: PostgresServer = request.getfixturevalue("postgresql")
            deadline = time.monotonic() + 120
            while _advisory_lock_waiters(server, str(engine.url.database)) < len(children):
                assert time.monotonic() < deadline, "the children never waited for the migration lock"
                time.sleep(0.05)
    engine.dispose()
    outcomes = sorted([results.get(timeout=120) for _ in children], key=lambda o: str(o[0]))
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    head = head_revision()
    assert outcomes == [(head, head), (None, head)]  # one found the work done, one did it
    assert schema_differences(url) == []
