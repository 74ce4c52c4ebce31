"""The registry: domain errors (never HTTP ones) and version numbers that stay unique under concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from core.adapter_store import AdapterStore
from core.errors import ConflictError, InvalidInput, NotFoundError
from gateway.errors import APIError
from gateway.registry.store import PromptRegistry
from tests.conftest import LiveServer, gateway_settings
from trainer.lora import random_lora

TEMPLATE = [{"role": "user", "content": "Q: {query}"}]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[PromptRegistry]:
    registry = PromptRegistry(f"sqlite:///{tmp_path / 'registry.db'}")
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


def test_concurrent_allocations_are_unique_and_contiguous(tmp_path: Path) -> None:
    """Two registries on one SQLite file (two replicas) and 16 threads: no error, no gap, no duplicate."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
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
