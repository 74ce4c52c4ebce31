"""A throwaway PostgreSQL server for the tests (a pytest plugin, loaded by conftest.py).

A real server from Debian's `postgresql` package (`make postgresql` installs it; `make test` does): one cluster per
test session, made by `initdb` in a temporary folder (as the `postgres` user when the tests run as root, since the
server refuses to run as root), listening on a unix socket in that folder and on a free port on 127.0.0.1, with
fsync off (a crash loses nothing a test needs). Every test that asks for a URL gets a database of its own, so
tests never see each other's rows. Stopped and deleted at the end of the session.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.local_server import free_port

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
DEBIAN_BIN_DIRS = "/usr/lib/postgresql/*/bin"  # Debian keeps the server programs off PATH, one folder a version
SERVER_USER = "postgres"  # the database superuser's name, and the system user that runs the server as root
START_ATTEMPTS = 3  # a free port taken by someone else before the server binds it: try another
# Speed over durability: the cluster lives for one test session.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",  # several registries per test, each with its own pool, and gateways beside them
    "shared_buffers": "32MB",
    "listen_addresses": "'127.0.0.1'",
    # Not UTC, so that the tests see the registry turn the server's local times into aware UTC ones.
    "timezone": "'Asia/Kolkata'",
}


def find_server_programs() -> Path:
    """The folder with initdb, pg_ctl and postgres: Debian's newest version, else PATH; a clear failure if none."""
    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", folder.parent.name))

    folders = sorted((Path(p) for p in glob.glob(DEBIAN_BIN_DIRS)), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        folders.append(Path(on_path).parent)
    for folder in folders:
        if all(os.access(folder / program, os.X_OK) for program in SERVER_PROGRAMS):
            return folder
    pytest.fail("PostgreSQL's server programs (initdb, pg_ctl, postgres) were not found under "
                f"{DEBIAN_BIN_DIRS} or on PATH: run `make postgresql` (installs Debian's postgresql package; "
                "`make test` does it too)", pytrace=False)


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder: `start()`, `create_database()` per test, `stop()`."""

    def __init__(self, programs: Path) -> None:
        self.programs = programs
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="promptintern-pg-"))  # short: a unix socket path is <108 bytes
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.started_in = 0.0  # seconds from initdb to accepting connections
        self._names = itertools.count(1)
        if self.as_root:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.programs / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               f"{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        try:
            return "\nserver log:\n" + "\n".join(self.log.read_text().splitlines()[-20:])
        except OSError:
            return ""

    def start(self) -> None:
        began = time.perf_counter()
        self._run("initdb", "--pgdata", str(self.data), "--username", SERVER_USER, "--auth", "trust",
                  "--encoding", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
        settings = "".join(f"{key} = {value}\n" for key, value in SERVER_SETTINGS.items())
        settings += f"unix_socket_directories = '{self.root}'\n"
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            with (self.data / "postgresql.conf").open("a") as conf:  # the last setting of a name wins
                conf.write(settings + f"port = {self.port}\n")
            started = self._run("pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.log),
                                "--wait", "--timeout", "60", check=attempt == START_ATTEMPTS)
            if started.returncode == 0:
                break
        self.started_in = time.perf_counter() - began

    def halt(self) -> None:
        """Stop the server and keep its data (a database that is down for a while); `resume()` starts it again."""
        self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait")

    def resume(self) -> None:
        self._run("pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.log), "--wait", "--timeout", "60")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL over TCP, as a gateway replica connects."""
        return f"postgresql+psycopg://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """A plain psycopg connection over the unix socket (autocommit), for set-up and inspection."""
        return psycopg.connect(host=str(self.root), port=self.port, user=SERVER_USER, dbname=database,
                               autocommit=True)

    def create_database(self, prefix: str = "test") -> str:
        """A new, empty database (no table yet): its URL."""
        name = f"{prefix}_{next(self._names)}"
        with self.connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')  # FILE_COPY: fast without fsync
        return self.url(name)


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server, started on first use."""
    server = PostgresServer(find_server_programs())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url_factory(postgresql: PostgresServer) -> Callable[[], str]:
    """Makes a fresh database per call: its URL."""
    return postgresql.create_database


@pytest.fixture
def pg_url(postgresql: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for this test."""
    return postgresql.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry's database on each backend in turn: a new SQLite file, then a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("postgresql")
    return server.create_database()
