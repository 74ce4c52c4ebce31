"""Training started from the registry: REST job end to end, status transitions, bad input, restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from gateway.jobs import JobRunner
from core.adapter_store import AdapterStore
from gateway.registry.store import PromptRegistry
from tests.conftest import LiveServer, gateway_settings

TEMPLATE = [
    {"role": "system", "content": "Translate to bash.\nInput: list files\nOutput: ls"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
ROWS = [{"query": f"show file number {i}", "response": f"cat file{i}.txt"} for i in range(12)]
SCHEDULE = {"steps_per_stage": [2, 1, 1, 2], "batch_size": 4, "retrieval": "bm25", "warmup_steps": 0}


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    with LiveServer(gateway_settings(module_tmp, tiny_model_path, torch_threads=1, train_threads=1)) as live:
        yield live


def wait_for_job(admin: httpx.Client, name: str, seen: set[str], timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = admin.get(f"/v1/prompts/{name}").json()
        job = body.get("job") or {}
        seen.add(job.get("status", ""))
        for version in body["versions"]:
            seen.add("version:" + version["status"])
        if job.get("status") in ("succeeded", "failed", "interrupted"):
            return body  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError(f"job of {name} did not finish: {body}")


def test_register_with_train_runs_a_job_and_serves_the_adapter(server: LiveServer) -> None:
    seen: set[str] = set()
    with server.admin() as admin:
        r = admin.post("/v1/prompts", json={
            "name": "bash", "messages": TEMPLATE, "examples": [{"query": "list files", "response": "ls"}],
            "train": {"data": ROWS, "schedule": SCHEDULE, "eval_fraction": 0.25}})
        assert r.status_code == 201, r.text
        assert r.json()["job"]["status"] in ("queued", "running")
        # The gateway keeps serving while the job trains in its own process.
        ok = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": server.settings.served_model_name, "max_tokens": 2,
            "messages": [TEMPLATE[0], {"role": "user", "content": "Input: x\nOutput:"}]})
        assert ok.status_code == 200 and ok.headers["x-promptintern-route"] in ("fallback", "adapter")
        body = wait_for_job(admin, "bash", seen)
    assert body["job"]["status"] == "succeeded", body
    assert body["status"] == "ready" and body["active_version"] == 1
    assert "running" in seen or "version:training" in seen
    manifest = body["versions"][0]["manifest"]
    assert manifest["prompt_hash"] and manifest["schedule"]["hash"] and len(manifest["stages"]) == 4
    assert manifest["evaluation"] is not None
    adapter_dir = Path(server.settings.adapter_dir) / "bash" / "v1"
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "manifest.json").is_file()
    routed = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": server.settings.served_model_name, "max_tokens": 2,
        "messages": [TEMPLATE[0], {"role": "user", "content": "Input: show file number 3\nOutput:"}]})
    assert routed.headers["x-promptintern-route"] == "adapter"


def test_second_job_makes_version_two_and_keeps_v1_until_ready(server: LiveServer) -> None:
    seen: set[str] = set()
    with server.admin() as admin:
        r = admin.post("/v1/prompts/bash/train", json={"data": ROWS, "schedule": SCHEDULE, "eval_fraction": 0})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        during = admin.get("/v1/prompts/bash").json()
        assert during["active_version"] == 1 and during["status"] == "ready"  # v1 serves meanwhile
        body = wait_for_job(admin, "bash", seen)
    assert body["job"]["status"] == "succeeded" and body["active_version"] == 2
    models = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert "bash@v2" in models and "bash@v1" not in models


def test_a_failing_job_leaves_the_previous_version_in_service(server: LiveServer) -> None:
    seen: set[str] = set()
    with server.admin() as admin:
        # Rows far longer than the tiny model's 512-token context: the trainer refuses them.
        long_rows = [{"query": "word " * 600, "response": "ls"} for _ in range(4)]
        r = admin.post("/v1/prompts/bash/train", json={"data": long_rows, "schedule": SCHEDULE, "eval_fraction": 0})
        assert r.status_code == 202
        body = wait_for_job(admin, "bash", seen)
    assert body["job"]["status"] == "failed" and "max_length" in body["job"]["error"]
    assert body["active_version"] == 2 and body["status"] == "ready"
    assert body["versions"][-1]["status"] == "failed"


@pytest.mark.parametrize("train,param", [
    ({"data": []}, "train.data"),
    ({"data": [{"query": "x"}]}, "train.data"),
    ({"data": [{"other": "x", "response": "y"}]}, "train.data"),
    ({"path": "/nonexistent.jsonl"}, "train.path"),
    ({"data": ROWS, "schedule": {"bogus_field": 1}}, "train.schedule"),
    ({}, "train"),
])
def test_bad_training_input_is_422(server: LiveServer, train: dict[str, Any], param: str) -> None:
    with server.admin() as admin:
        r = admin.post("/v1/prompts/bash/train", json=train)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param
        assert admin.post("/v1/prompts/nothing/train", json={"data": ROWS}).status_code == 404


def test_malformed_server_side_file_is_422(server: LiveServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "response": "b"}\nnot json\n')
    with server.admin() as admin:
        r = admin.post("/v1/prompts/bash/train", json={"path": str(bad)})
    assert r.status_code == 422 and "line 2" in r.json()["error"]["message"]


def test_delete_cancels_a_running_job(server: LiveServer) -> None:
    with server.admin() as admin:
        slow = {**SCHEDULE, "steps_per_stage": [200, 200, 200, 200]}
        assert admin.post("/v1/prompts", json={"name": "doomed", "messages": TEMPLATE,
                                               "train": {"data": ROWS, "schedule": slow}}).status_code == 201
        deadline = time.monotonic() + 60
        while admin.get("/v1/prompts/doomed").json()["job"]["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert admin.delete("/v1/prompts/doomed").status_code == 204
        time.sleep(3)
        assert admin.get("/v1/prompts/doomed").status_code == 404
    assert not (Path(server.settings.adapter_dir) / "doomed").exists()


def test_restart_marks_an_orphaned_job_interrupted_and_queues_it_again(tmp_path: Path) -> None:
    """A job left `running` by a dead runner is requeued once, then given up."""
    registry = PromptRegistry(f"sqlite:///{tmp_path / 'r.db'}")
    registry.create("p", "chat", TEMPLATE, [])
    job = registry.create_job("p", {"rows": ROWS, "schedule": SCHEDULE, "eval_fraction": 0})
    version = registry.add_version("p", "training", "train")
    registry.update_job(job.id, status="running", version=version, attempts=1)

    runner = JobRunner(Settings(data_dir=tmp_path), registry, AdapterStore(tmp_path / "adapters"), prompts=None,
                       base_model_dir=tmp_path)
    runner._recover_interrupted()
    again = registry.get_job(job.id)
    assert again is not None and again.status == "queued" and "interrupted" in (again.error or "")
    assert registry.get("p").versions[0].status == "failed"
    registry.update_job(job.id, status="running", attempts=2)
    runner._recover_interrupted()
    final = registry.get_job(job.id)
    assert final is not None and final.status == "interrupted"
