"""The registry, on SQLite and on a real PostgreSQL: domain errors (never HTTP ones), version numbers that stay
unique under concurrency, a change log without gaps, aware UTC timestamps, job ids never reused."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from core.adapter_store import AdapterStore
from core.errors import ConflictError, InvalidInput, NotFoundError
from gateway.errors import APIError
from gateway.registry.db import PromptRow, utcnow
from gateway.registry.db import database_url as engine_url
from gateway.registry.store import PromptRegistry
from tests.conftest import LiveServer, gateway_settings
from trainer.lora import random_lora

TEMPLATE = [{"role": "user", "content": "Q: {query}"}]


@pytest.fixture
def registry(database_url: str) -> Iterator[PromptRegistry]:
    registry = PromptRegistry(database_url)
    yield registry
    registry.close()


def run_together(workers: int, task: Callable[[int], list[int]]) -> list[int]:
    """Run `task(i)` in `workers` threads released at the same moment; all the numbers they return."""
    start = threading.Barrier(workers)

    def run(i: int) -> list[int]:
        start.wait(timeout=60)
        return task(i)

    with ThreadPoolExecutor(workers) as pool:
        return [n for numbers in pool.map(run, range(workers)) for n in numbers]


def test_the_registry_raises_domain_errors(registry: PromptRegistry) -> None:
    registry.create("p", "chat", TEMPLATE, [])
    failures: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: registry.get("missing"), NotFoundError, "prompt_not_found"),
        (lambda: registry.create("p", "chat", TEMPLATE, []), ConflictError, "prompt_exists"),
        (lambda: registry.create("no spaces", "chat", TEMPLATE, []), InvalidInput, "invalid_name"),
        (lambda: registry.update_version("p", 7, status="ready"), NotFoundError, "version_not_found"),
        (lambda: registry.get_version("p", 7), NotFoundError, "version_not_found"),
        (lambda: registry.get_version("missing", 1), NotFoundError, "prompt_not_found"),
        (lambda: registry.allocate_version("missing", "loading", "upload"), NotFoundError, "prompt_not_found"),
    ]
    for call, error, code in failures:
        with pytest.raises(error) as caught:
            call()
        assert caught.value.code == code
        assert not isinstance(caught.value, APIError)  # the data layer knows nothing of HTTP


def test_a_prompt_is_read_from_one_snapshot(database_url: str) -> None:
    """A prompt is read with its versions and jobs by three SELECTs: they see one state of the database even
    when another replica commits between them (SQLite's driver would run each SELECT on its own)."""
    reader, writer = PromptRegistry(database_url), PromptRegistry(database_url)
    try:
        reader.create("snap", "chat", TEMPLATE, [])
        with reader._snapshot() as s:
            assert reader._load(s, "snap").versions == []
            writer.allocate_version("snap", "loading", "upload")  # committed meanwhile, by another replica
            s.expire_all()
            assert reader._load(s, "snap").versions == []
        assert [v.version for v in reader.get("snap").versions] == [1]
    finally:
        reader.close()
        writer.close()


def test_concurrent_allocations_are_unique_and_contiguous(database_url: str, tmp_path: Path) -> None:
    """Two registries on one database (two replicas) and 16 threads: no error, no gap, no duplicate."""
    url = database_url
    replicas = [PromptRegistry(url), PromptRegistry(url)]
    store = AdapterStore(tmp_path / "adapters")
    (store.root / "p" / "v1").mkdir(parents=True)  # written by `promptintern train`, outside the registry
    (store.root / "p" / "v2").mkdir()
    replicas[0].create("p", "chat", TEMPLATE, [])
    replicas[0].create("q", "chat", TEMPLATE, [])
    per_thread = 8

    def allocate(i: int) -> list[int]:
        registry = replicas[i % 2]
        return [registry.allocate_version("p", "loading" if i % 3 else "training", "upload", store)
                for _ in range(per_thread)]

    q_numbers: list[int] = []
    q_thread = threading.Thread(target=lambda: q_numbers.extend(
        replicas[1].allocate_version("q", "loading", "upload", store) for _ in range(20)))
    q_thread.start()
    numbers = run_together(16, allocate)
    q_thread.join(120)

    assert sorted(numbers) == list(range(3, 3 + 16 * per_thread))
    assert [v.version for v in replicas[1].get("p").versions] == sorted(numbers)
    assert sorted(q_numbers) == list(range(1, 21))  # each prompt has its own numbering
    for registry in replicas:
        registry.close()


def test_allocation_rises_above_folders_that_appear_later(registry: PromptRegistry, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    registry.create("p", "chat", TEMPLATE, [])
    assert registry.allocate_version("p", "loading", "upload", store) == 1
    (store.root / "p" / "v5").mkdir(parents=True)
    (store.root / "p" / "v7-notes.txt").write_text("not a version folder")
    assert registry.allocate_version("p", "training", "train", store) == 6
    assert registry.get_version("p", 6).status == "training"


def test_timestamps_and_json_read_back_as_written(registry: PromptRegistry) -> None:
    """Every timestamp comes back aware UTC, whatever the backend keeps (SQLite: no zone; the test PostgreSQL
    server: its local time zone, not UTC), and JSON columns come back equal, nesting and all."""
    template = [{"role": "system", "content": "Réponds en français ✓"}, {"role": "user", "content": "{query}"}]
    examples = [{"query": "q1", "answer": "a1"}, {"query": "ünï", "answer": "ok"}]
    before = utcnow()
    registry.create("p", "chat", template, examples)
    version = registry.allocate_version("p", "loading", "upload")
    registry.update_version("p", version, status="ready", manifest={"base": {"layers": [1, 2]}, "score": 0.5})
    job = registry.create_job("p", {"rows": [{"q": "x"}], "epochs": 2})
    after = utcnow()

    record = registry.get("p")
    read_job = registry.get_job(job.id)
    assert read_job is not None
    for stamp in [record.created, record.versions[0].created, read_job.created, record.jobs[0].created]:
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        assert before <= stamp <= after
    assert job.created == read_job.created  # as returned when written, so POST and GET agree
    assert (record.template, record.examples) == (template, examples)
    assert record.versions[0].manifest == {"base": {"layers": [1, 2]}, "score": 0.5}
    assert read_job.spec == {"rows": [{"q": "x"}], "epochs": 2}
    with Session(registry.engine) as s, pytest.raises(StatementError, match="naive datetime"):
        s.add(PromptRow(name="q", kind="chat", template=[], examples=[], created_at=utcnow().replace(tzinfo=None)))
        s.flush()  # a naive time is refused, never stored as if it were UTC (or the server's zone)


def test_job_ids_are_never_given_twice(registry: PromptRegistry) -> None:
    """Deleting a prompt deletes its jobs; the ids they had are not handed out again."""
    registry.create("p", "chat", TEMPLATE, [])
    ids = [registry.create_job("p", {"n": i}).id for i in range(3)]
    registry.delete("p")
    registry.create("p", "chat", TEMPLATE, [])
    again = registry.create_job("p", {"n": 3})
    assert again.id > max(ids) and len(set(ids)) == 3
    assert registry.get_job(ids[-1]) is None


def test_the_change_log_names_what_changed_since_a_revision(registry: PromptRegistry) -> None:
    start = registry.revision()
    assert registry.changes_since(start).prompts == frozenset()
    registry.create("a", "chat", TEMPLATE, [])
    registry.create("b", "chat", TEMPLATE, [])
    after_create = registry.revision()
    assert after_create == start + 2
    version = registry.allocate_version("a", "loading", "upload")
    registry.update_version("a", version, status="ready")
    registry.mark_changed("b")
    changes = registry.changes_since(after_create)
    assert changes == type(changes)(after_create + 3, frozenset({"a", "b"}))
    registry.delete("b")
    assert registry.changes_since(changes.revision).prompts == frozenset({"b"})
    assert registry.changes_since(start).prompts == frozenset({"a", "b"})
    assert registry.changes_since(registry.revision()).prompts == frozenset()


def test_a_reader_following_concurrent_writers_never_sees_a_gap(database_url: str) -> None:
    """Writers on two registries (two replicas) commit revisions in the order they took them, so a reader
    polling all along never finds a revision committed before an earlier one (which it would miss)."""
    writers = [PromptRegistry(database_url), PromptRegistry(database_url)]
    reader = PromptRegistry(database_url)
    per_thread, threads = 6, 8
    done = threading.Event()
    seen: set[str] = set()
    gaps: list[int] = []

    def follow() -> None:
        applied = reader.revision()
        while True:
            finished = done.is_set()  # read before polling: the poll after the writers finished sees everything
            changes = reader.changes_since(applied)
            if changes.prompts is None:
                gaps.append(applied)
            else:
                seen.update(changes.prompts)
            applied = changes.revision
            if finished:
                return
            # A replica polls on an interval. A loop without a pause held the GIL so much that the writers' lock
            # holders waited their turn for the interpreter, and a writer ran out of SQLite's busy timeout.
            time.sleep(0.001)

    def write(i: int) -> list[int]:
        registry = writers[i % 2]
        for j in range(per_thread):
            registry.create(f"p{i}-{j}", "chat", TEMPLATE, [])
            registry.allocate_version(f"p{i}-{j}", "loading", "upload")
        return []

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        run_together(threads, write)
    finally:
        done.set()
        follower.join(120)
    assert not gaps
    assert seen == {f"p{i}-{j}" for i in range(threads) for j in range(per_thread)}
    assert reader.revision() == 2 * threads * per_thread
    for registry in [*writers, reader]:
        registry.close()


def test_postgres_urls_without_a_driver_mean_psycopg(postgresql: Any) -> None:
    for given in ("postgres://u:p@db.example:5432/reg", "postgresql://u:p@db.example:5432/reg"):
        url = engine_url(given)
        assert (url.drivername, url.host, url.database) == ("postgresql+psycopg", "db.example", "reg")
    plain = postgresql.create_database().replace("postgresql+psycopg://", "postgresql://")
    registry = PromptRegistry(plain)  # opens with psycopg 3, the driver installed
    try:
        registry.create("p", "chat", TEMPLATE, [])
        assert registry.engine.dialect.driver == "psycopg" and registry.get("p").name == "p"
    finally:
        registry.close()


def test_the_sqlite_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "registry.db"
    registry = PromptRegistry(f"sqlite:///{path}")
    try:
        registry.create("p", "chat", TEMPLATE, [])  # a write: the -wal and -shm files exist now
        files = [path, path.with_name("registry.db-wal"), path.with_name("registry.db-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
    finally:
        registry.close()

    path.chmod(0o644)  # a file an older release left readable by all: narrowed at the next start
    PromptRegistry(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_deleted_prompts_rows_go_with_it_on_every_backend(registry: PromptRegistry, database_url: str) -> None:
    """Foreign keys cascade on both backends (SQLite needs them switched on for each connection)."""
    registry.create("p", "chat", TEMPLATE, [])
    registry.allocate_version("p", "loading", "upload")
    registry.create_job("p", {})
    registry.delete("p")
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            counts = [connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                      for table in ("prompts", "adapter_versions", "train_jobs")]
    finally:
        engine.dispose()
    assert counts == [0, 0, 0]


# -- over HTTP: two gateway replicas and a training runner on one database ----------------------------------


@pytest.fixture(scope="module")
def replicas(tiny_model_path: Path, module_tmp: Path) -> Iterator[list[LiveServer]]:
    """Two gateways sharing one SQLite registry and one adapter store, as replicas on one machine do."""
    with LiveServer(gateway_settings(module_tmp, tiny_model_path)) as first, \
            LiveServer(gateway_settings(module_tmp, tiny_model_path)) as second:
        yield [first, second]


def test_concurrent_uploads_and_trainings_get_distinct_versions(replicas: list[LiveServer], tiny_model_path: Path,
                                                                module_tmp: Path) -> None:
    imports = module_tmp / "data" / "import"
    adapters = [random_lora(tiny_model_path, imports / f"lora-{seed}", seed=seed, scale=20.0) for seed in (1, 2)]
    clients = [server.admin() for server in replicas]
    assert clients[0].post("/v1/prompts", json={"name": "shell", "messages": TEMPLATE}).status_code == 201
    trainer_side = PromptRegistry(replicas[0].settings.resolved_database_url)
    store = AdapterStore(replicas[0].settings.adapter_dir)
    uploads, trainings = 8, 4

    def act(i: int) -> list[int]:
        if i >= uploads:  # what a job runner does when it starts a training job
            return [trainer_side.allocate_version("shell", "training", "train", store)]
        response = clients[i % 2].post("/v1/prompts/shell/adapters", json={"adapter_path": str(adapters[i % 2])})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "ready" and body["source"] == "upload"
        return [body["version"]]

    try:
        numbers = run_together(uploads + trainings, act)
        described = clients[1].get("/v1/prompts/shell").json()
    finally:
        trainer_side.close()
        for client in clients:
            client.close()

    assert sorted(numbers) == list(range(1, uploads + trainings + 1))
    statuses = {v["version"]: v["status"] for v in described["versions"]}
    assert sorted(statuses) == sorted(numbers)
    assert sorted(v for v, s in statuses.items() if s == "ready") == sorted(numbers[:uploads])
    folders = sorted(int(p.name[1:]) for p in (Path(replicas[0].settings.adapter_dir) / "shell").glob("v*"))
    assert folders == sorted(numbers[:uploads])  # one folder per uploaded version, none overwritten
