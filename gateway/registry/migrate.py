"""Brings the registry's schema to the newest revision at start-up: once, under a lock, however many
replicas start at the same time, and a wave-1 database (made by `create_all`, no version stamp) is
stamped as the baseline first, so its rows are kept."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from filelock import FileLock
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

SCRIPT_LOCATION = "gateway.registry:migrations"  # inside the package: found wherever it is installed
BASELINE = "0001"
WAVE1_TABLE = "prompts"
LOCK_TIMEOUT_S = 600.0
# pg_advisory_xact_lock's key: any fixed 64-bit number that no other part of the system uses.
PG_LOCK_KEY = 0x50_49_4D_49_47_52_41_54  # "PIMIGRAT"


@dataclass(frozen=True)
class Migration:
    """What start-up found and left: the revision before, whether it stamped a wave-1 database, and after."""

    before: str | None
    stamped_wave1: bool
    after: str | None


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's settings in code (no ini file at run time); migrations run on the given connection."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> Migration:
    """Stamp a wave-1 database, then apply every migration it lacks, in one locked transaction."""
    head = head_revision()
    with migration_lock(engine) as connection:
        before = current_revision(connection)
        if before == head:
            return Migration(before, False, before)  # the common start: nothing to do
        config = alembic_config(connection)
        wave1 = before is None and inspect(connection).has_table(WAVE1_TABLE)
        if wave1:
            log.info("registry database without a version stamp (wave 1): stamping it as %s", BASELINE)
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
        outcome = Migration(before, wave1, current_revision(connection))
    log.info("registry schema: %s -> %s", BASELINE if wave1 else (before or "empty"), outcome.after)
    return outcome


@contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """A transaction that no other process's migration runs beside (SQLite: a file lock; PostgreSQL: an
    advisory lock released with the transaction, so a crashed replica cannot leave it held)."""
    dialect = engine.dialect.name
    with sqlite_migration_lock(engine) if dialect == "sqlite" else nullcontext(), engine.begin() as connection:
        if dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        elif dialect != "sqlite":
            log.warning("no migration lock for %s: start one replica first when the schema changes", dialect)
        yield connection


def sqlite_migration_lock(engine: Engine) -> FileLock | nullcontext[None]:
    """A lock file beside the SQLite file: every process that opens this database takes it to migrate."""
    database = engine.url.database
    if not database or database == ":memory:":
        return nullcontext()  # a private in-memory database: no other process can see it
    path = Path(database)
    return FileLock(path.with_name(f"{path.name}.migrate.lock"), timeout=LOCK_TIMEOUT_S, mode=0o600)
