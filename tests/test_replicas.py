"""Two gateway replicas on one registry and one adapter store: what either is told, both serve, within
seconds and without a restart; a version switch lets the old version's requests finish first."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.local_server import LocalGateway
from tests.conftest import gateway_settings
from trainer.lora import random_lora

TEMPLATE = [{"role": "system", "content": "You translate requests into one bash command. Answer with the command "
                                          "only, no prose, no code fences."},
            {"role": "user", "content": "Input: {query}\nOutput:"}]
FOLLOW_WITHIN_S = 10.0  # the contract is 2 s; the test allows for a loaded machine and reports what it saw
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def request(query: str) -> dict[str, Any]:
    return {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_tokens": 2, "temperature": 0,
            "messages": [TEMPLATE[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]}


def route_of(replica: LocalGateway, query: str = "list files") -> str:
    response = httpx.post(f"{replica.url}/v1/chat/completions", json=request(query), timeout=120)
    assert response.status_code == 200, response.text
    return response.headers["x-promptintern-route"]


def wait_for(condition: Callable[[], bool], what: str) -> float:
    """Seconds until `condition` held (polled); fails after FOLLOW_WITHIN_S."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < FOLLOW_WITHIN_S, f"not followed within {FOLLOW_WITHIN_S} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def upload(admin: httpx.Client, name: str, folder: Path) -> httpx.Response:
    files = {f: (f, (folder / f).read_bytes(), "application/octet-stream") for f in (CONFIG_FILE, WEIGHTS_FILE)}
    return admin.post(f"/v1/prompts/{name}/adapters", files=files)


@pytest.fixture(scope="module")
def loras(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("replica-loras")
    return [random_lora(tiny_model_path, root / f"lora-{seed}", seed=seed, scale=20.0) for seed in (31, 32)]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def replicas(request: pytest.FixtureRequest, tiny_model_path: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalGateway]]:
    """Two replicas on one registry (a SQLite file, then a real PostgreSQL server) and one adapter store."""
    shared = tmp_path_factory.mktemp("replicas")
    if request.param == "sqlite":
        database = f"sqlite:///{shared / 'registry.db'}"
    else:
        database = request.getfixturevalue("postgresql").create_database("replicas")
    settings = [gateway_settings(shared / name, tiny_model_path, database_url=database,
                                 adapter_dir=shared / "adapters", adapter_drain_seconds=60)
                for name in ("a", "b")]
    with LocalGateway(settings[0]) as a, LocalGateway(settings[1]) as b:
        yield [a, b]


def test_a_change_through_either_replica_is_served_by_both(replicas: list[LocalGateway], loras: list[Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    a, b = replicas
    with a.admin() as admin_a, b.admin() as admin_b:
        assert route_of(b) == "passthrough"
        assert admin_a.post("/v1/prompts", json={"name": "shell", "messages": TEMPLATE}).status_code == 201
        registered = wait_for(lambda: route_of(b) == "fallback", "a prompt registered on A, matched on B")

        added = upload(admin_b, "shell", loras[0])
        assert added.status_code == 201, added.text
        assert route_of(b) == "adapter"
        adapter = wait_for(lambda: route_of(a) == "adapter", "an adapter added on B, routed on A")
        models = httpx.get(f"{a.url}/v1/models").json()["data"]
        assert "shell@v1" in {m["id"] for m in models}

        assert admin_a.delete("/v1/prompts/shell").status_code in (200, 204)
        deleted = wait_for(lambda: route_of(b) == "passthrough", "a delete on A, honoured on B")
        assert admin_b.get("/v1/prompts/shell").status_code == 404
    with capsys.disabled():
        backend = a.settings.resolved_database_url.split(":")[0]
        print(f"\n[replicas, {backend}] followed: register {registered:.2f} s, adapter {adapter:.2f} s, "
              f"delete {deleted:.2f} s")


@pytest.mark.parametrize("when", ["before its folder is published", "after it was loaded"])
def test_a_delete_on_one_replica_during_an_upload_on_the_other_leaves_nothing(
        replicas: list[LocalGateway], loras: list[Path], monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """B deletes the prompt while A adds a version (each replica's lock is its own): A answers 404, and neither
    the version's folder in the shared store nor its adapter in A's engine is left behind."""
    import gateway.prompts.service as service_module

    a, b = replicas
    prompts = a.app.state.prompts
    name = "raced-" + when.split()[0]
    with a.admin() as admin_a, b.admin() as admin_b:
        assert admin_a.post("/v1/prompts", json={"name": name, "messages": TEMPLATE}).status_code == 201

        def delete_on_b() -> None:
            assert admin_b.delete(f"/v1/prompts/{name}").status_code in (200, 204)

        if when.startswith("before"):  # B's delete finds no folder yet; A then publishes one
            stage = service_module.stage_adapter

            def deleted_then_staged(*args: Any, **kwargs: Any) -> Path:
                delete_on_b()
                return stage(*args, **kwargs)

            monkeypatch.setattr(service_module, "stage_adapter", deleted_then_staged)
        else:  # B's delete removes A's folder; A's engine holds the adapter
            load = prompts._load_and_warm

            async def loaded_then_deleted(model_id: str, path: Path) -> None:
                await load(model_id, path)
                await asyncio.to_thread(delete_on_b)

            monkeypatch.setattr(prompts, "_load_and_warm", loaded_then_deleted)
        response = upload(admin_a, name, loras[0])
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] in ("prompt_not_found", "version_not_found")
        assert not (a.settings.adapter_dir / name).exists()
        assert not any(m.startswith(f"{name}@") for m in a.app.state.engine.loaded_adapters())
        assert admin_a.get(f"/v1/prompts/{name}").status_code == 404


@pytest.fixture(scope="module")
def real_replica(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    """The real SmolLM2 (tens of ms a token here): an answer long enough to still run during a version switch."""
    with LocalGateway(gateway_settings(tmp_path_factory.mktemp("drain"), base_model_path,
                                       adapter_drain_seconds=120)) as gateway:
        yield gateway


def test_a_version_switch_drains_the_old_versions_requests(real_replica: LocalGateway, base_model_path: Path,
                                                          tmp_path: Path) -> None:
    """A long streamed answer on v1 keeps its adapter while v2 takes over; v1 is unloaded once it is done."""
    gateway = real_replica
    v1, v2 = (random_lora(base_model_path, tmp_path / f"v{seed}", seed=seed, scale=0.5) for seed in (41, 42))
    state = gateway.app.state
    with gateway.admin() as admin:
        assert admin.post("/v1/prompts", json={"name": "drain", "messages": TEMPLATE}).status_code == 201
        assert upload(admin, "drain", v1).status_code == 201
        body = {"model": "drain@v1", "max_tokens": 200, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]}
        lines: list[str] = []

        def read_stream() -> None:
            with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=600) as response:
                lines.extend(line for line in response.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=read_stream)
        reader.start()
        wait_for(lambda: state.inference.in_flight.count("drain@v1") == 1, "the stream running on v1")
        assert upload(admin, "drain", v2).status_code == 201
        assert state.prompts.routable("drain").adapter == "drain@v2"  # new requests go to v2 at once
        assert state.inference.in_flight.count("drain@v1") == 1, "the answer ended before the switch: too short"
        assert "drain@v1" in state.engine.loaded_adapters()  # kept for the answer still on it
        reader.join(600)
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        wait_for(lambda: "drain@v1" not in state.engine.loaded_adapters(), "v1 unloaded once drained")
        assert "drain@v2" in state.engine.loaded_adapters()
        assert admin.delete("/v1/prompts/drain").status_code in (200, 204)
