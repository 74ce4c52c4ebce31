"""Training started from the registry: REST job end to end, status transitions, progress, bad input, delete.

Leases and takeovers: tests/test_job_leases.py; a replica killed mid-training: tests/test_job_kill.py.

Every test stands alone: those that need a trained version share one module fixture, and assert
against the version that is active when they start, not against what earlier tests left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.jobs import JobRunner
from tests.conftest import LiveServer, gateway_settings

TEMPLATE = [
    {"role": "system", "content": "Translate to bash.\nInput: list files\nOutput: ls"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
ROWS = [{"query": f"show file number {i}", "response": f"cat file{i}.txt"} for i in range(12)]
SCHEDULE = {"steps_per_stage": [2, 1, 1, 2], "batch_size": 4, "retrieval": "bm25", "warmup_steps": 0}
POLL_S = 0.2


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll `condition` until it returns something truthy (returned); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def wait_for_job(admin: httpx.Client, name: str, seen: set[str], timeout: float = 240) -> dict[str, Any]:
    """The prompt object once its latest job has finished; `seen` collects the job and version statuses."""

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = admin.get(f"/v1/prompts/{name}").json()
        job = body.get("job") or {}
        seen.add(job.get("status", ""))
        seen.update("version:" + v["status"] for v in body["versions"])
        return body if job.get("status") in ("succeeded", "failed", "interrupted") else None

    wait_until(finished, f"the training job of {name} to finish", timeout)
    # Read once more: on SQLite a GET reads the prompt's versions and jobs by separate SELECTs, so the read that saw
    # the job end may have read its versions just before the job's last write (a known gap of the registry).
    body: dict[str, Any] = admin.get(f"/v1/prompts/{name}").json()
    return body


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    with LiveServer(gateway_settings(module_tmp, tiny_model_path, torch_threads=1, train_threads=1)) as live:
        yield live


@dataclass(frozen=True)
class FirstTraining:
    """What registering `bash` with a `train` object did, observed while it trained."""

    registered: httpx.Response
    during: httpx.Response
    body: dict[str, Any]
    seen: set[str]


@pytest.fixture(scope="module")
def trained(server: LiveServer) -> FirstTraining:
    """`bash`, registered with training data: its first job run to the end."""
    seen: set[str] = set()
    with server.admin() as admin:
        registered = admin.post("/v1/prompts", json={
            "name": "bash", "messages": TEMPLATE, "examples": [{"query": "list files", "response": "ls"}],
            "train": {"data": ROWS, "schedule": SCHEDULE, "eval_fraction": 0.25}})
        assert registered.status_code == 201, registered.text
        during = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": server.settings.served_model_name, "max_tokens": 2,
            "messages": [TEMPLATE[0], {"role": "user", "content": "Input: x\nOutput:"}]})
        body = wait_for_job(admin, "bash", seen)
    return FirstTraining(registered, during, body, seen)


@pytest.fixture(scope="module")
def untrained(server: LiveServer) -> str:
    """A registered prompt with no adapter and no job: the target of requests that must be refused."""
    with server.admin() as admin:
        assert admin.post("/v1/prompts", json={"name": "plain", "messages": TEMPLATE}).status_code == 201
    return "plain"


def test_register_with_train_runs_a_job_and_serves_the_adapter(server: LiveServer, trained: FirstTraining) -> None:
    assert trained.registered.json()["job"]["status"] in ("queued", "running")
    # The gateway keeps serving while the job trains in its own process.
    assert trained.during.status_code == 200
    assert trained.during.headers["x-promptintern-route"] in ("fallback", "adapter")
    body = trained.body
    assert body["job"]["status"] == "succeeded", body
    assert body["status"] == "ready" and body["active_version"] == 1
    assert "running" in trained.seen or "version:training" in trained.seen
    manifest = body["versions"][0]["manifest"]
    assert manifest["prompt_hash"] and manifest["schedule"]["hash"] and len(manifest["stages"]) == 4
    assert manifest["evaluation"] is not None
    adapter_dir = Path(server.settings.adapter_dir) / "bash" / "v1"
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "manifest.json").is_file()
    routed = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": server.settings.served_model_name, "max_tokens": 2,
        "messages": [TEMPLATE[0], {"role": "user", "content": "Input: show file number 3\nOutput:"}]})
    assert routed.headers["x-promptintern-route"] == "adapter"


def test_a_new_job_makes_the_next_version_and_keeps_the_old_one_until_ready(
        server: LiveServer, trained: FirstTraining) -> None:
    seen: set[str] = set()
    with server.admin() as admin:
        before = admin.get("/v1/prompts/bash").json()["active_version"]
        assert before is not None
        r = admin.post("/v1/prompts/bash/train", json={"data": ROWS, "schedule": SCHEDULE, "eval_fraction": 0})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        during = admin.get("/v1/prompts/bash").json()
        assert during["active_version"] == before and during["status"] == "ready"  # the old version serves meanwhile
        body = wait_for_job(admin, "bash", seen)
    new = body["job"]["version"]
    assert body["job"]["status"] == "succeeded" and new > before and body["active_version"] == new
    models = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert f"bash@v{new}" in models and f"bash@v{before}" not in models


def test_a_failing_job_leaves_the_previous_version_in_service(server: LiveServer, trained: FirstTraining) -> None:
    seen: set[str] = set()
    with server.admin() as admin:
        before = admin.get("/v1/prompts/bash").json()["active_version"]
        assert before is not None
        # Rows far longer than the tiny model's 512-token context: the trainer refuses them.
        long_rows = [{"query": "word " * 600, "response": "ls"} for _ in range(4)]
        r = admin.post("/v1/prompts/bash/train", json={"data": long_rows, "schedule": SCHEDULE, "eval_fraction": 0})
        assert r.status_code == 202
        body = wait_for_job(admin, "bash", seen)
    assert body["job"]["status"] == "failed" and "max_length" in body["job"]["error"]
    assert body["active_version"] == before and body["status"] == "ready"
    assert body["versions"][-1]["status"] == "failed"


@pytest.mark.parametrize("train,param,code", [
    ({"data": []}, "train.data", "invalid_train_data"),
    ({"data": [{"query": "x"}]}, "train.data", "invalid_train_data"),
    ({"data": [{"other": "x", "response": "y"}]}, "train.data", "invalid_train_data"),
    ({"data": ROWS[:1], "eval_fraction": 0.5}, "train.data", "invalid_train_data"),  # nothing left to train on
    ({"path": "/nonexistent.jsonl"}, "train.path", "invalid_import_path"),
    ({"data": ROWS, "schedule": {"bogus_field": 1}}, "train.schedule", "invalid_schedule"),
    ({"data": ROWS, "schedule": {"preset": "none"}}, "train.schedule", "invalid_schedule"),
    ({}, "train", "invalid_train_data"),
])
def test_bad_training_input_is_422(server: LiveServer, untrained: str, train: dict[str, Any], param: str,
                                   code: str) -> None:
    with server.admin() as admin:
        r = admin.post(f"/v1/prompts/{untrained}/train", json=train)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code
        assert admin.get(f"/v1/prompts/{untrained}").json()["job"] is None  # nothing was queued
        assert admin.post("/v1/prompts/nothing/train", json={"data": ROWS}).status_code == 404


def test_malformed_server_side_file_is_422(server: LiveServer, untrained: str) -> None:
    bad = Path(server.settings.resolved_import_dir) / "bad.jsonl"  # a training `path` is read from IMPORT_DIR only
    bad.write_text('{"query": "a", "response": "b"}\nnot json\n')
    with server.admin() as admin:
        r = admin.post(f"/v1/prompts/{untrained}/train", json={"path": str(bad)})
    assert r.status_code == 422 and "line 2" in r.json()["error"]["message"]


def test_progress_shows_while_a_job_runs(server: LiveServer) -> None:
    """The job object shows where training stands (stage, step, loss, time left) before the job ends."""
    slow = {**SCHEDULE, "steps_per_stage": [200, 200, 200, 200]}
    with server.admin() as admin:
        r = admin.post("/v1/prompts", json={"name": "watched", "messages": TEMPLATE,
                                            "train": {"data": ROWS, "schedule": slow, "eval_fraction": 0}})
        assert r.status_code == 201, r.text
        seen: list[dict[str, Any]] = []

        def training_steps() -> list[dict[str, Any]] | None:
            job = admin.get("/v1/prompts/watched").json()["job"]
            progress = job["progress"] or {}
            if job["status"] == "running" and progress.get("phase") == "train":
                seen.append(progress)
            return seen if len({p["global_step"] for p in seen}) >= 2 else None

        wait_until(training_steps, "two training steps to show in the job's progress", timeout=240)
        first, later = seen[0], seen[-1]
        assert first["stage"] == 1 and first["stages"] == 4 and first["stage_name"].startswith("stage 1")
        assert 1 <= first["step"] <= first["steps"] == 200 and first["global_steps"] == 800
        assert later["global_step"] > first["global_step"]  # it moves on while the job runs
        assert all(p["loss"] > 0 and p["eta_s"] is not None and p["eta_s"] >= 0 for p in seen)
        assert admin.delete("/v1/prompts/watched").status_code == 204  # no need to train it to the end


def test_delete_cancels_a_running_job(server: LiveServer) -> None:
    runner: JobRunner = server.app.state.jobs
    with server.admin() as admin:
        slow = {**SCHEDULE, "steps_per_stage": [200, 200, 200, 200]}
        r = admin.post("/v1/prompts", json={"name": "doomed", "messages": TEMPLATE,
                                            "train": {"data": ROWS, "schedule": slow}})
        assert r.status_code == 201
        job_id = r.json()["job"]["id"]
        wait_until(lambda: admin.get("/v1/prompts/doomed").json()["job"]["status"] == "running",
                   "the job to start running")
        assert runner.running_job == job_id
        assert admin.delete("/v1/prompts/doomed").status_code == 204
        assert admin.get("/v1/prompts/doomed").status_code == 404
        wait_until(lambda: runner.running_job != job_id, "the runner to stop the deleted prompt's job")
    assert not (Path(server.settings.adapter_dir) / "doomed").exists()
