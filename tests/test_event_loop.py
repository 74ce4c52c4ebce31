"""No blocking call on the event loop: the app driven under blockbuster, start-up to shutdown, on the tiny model.

blockbuster patches the blocking primitives (file and socket I/O, `os.stat`, `time.sleep`, sqlite, a
contended `threading.Lock`) to raise `BlockingError` when called from a thread that runs an event loop. It is
active while the app starts (the lifespan loads the model and opens the registry in threads), while each test
drives requests through an in-process ASGI client, and while the app shuts down. A blocking call fails the
test that made it: as the request's status (the error becomes a 500), or as the error the app caught and
logged (the job runner, `/ready` and asyncio's handler of lost task errors log what they catch), or as an
unraisable exception (a finaliser that blocked when an object was collected on the loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from blockbuster import BlockBuster, BlockBusterFunction, BlockingError
from fastapi import FastAPI

from core.config import Settings
from gateway.app import create_app
from gateway.jobs import JobRunner
from gateway.prompts.imports import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import ADMIN_KEY, gateway_settings
from tests.upstream_server import MODEL, UPSTREAM_KEY, UpstreamProcess
from trainer.lora import random_lora

pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]

TEMPLATE = [
    {"role": "system", "content": "Answer with one shell command.\nInput: show files\nOutput: ls"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
COMPLETION = "Translate to French.\nEnglish: cat\nFrench: chat\nEnglish: {query}\nFrench:"
ROWS = [{"query": f"show file number {i}", "response": f"cat file{i}.txt"} for i in range(12)]
QUICK = {"steps_per_stage": [1, 1, 1, 1], "batch_size": 4, "retrieval": "bm25", "warmup_steps": 0}
SLOW = {**QUICK, "steps_per_stage": [200, 200, 200, 200]}
DEADLINE_S = 240.0
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

# Blocking calls on the loop in gateway code that belongs to work in progress elsewhere; each is reported, to
# be moved off the loop by its owner, and then its line here goes. Each names the innermost function of ours
# that blocks (a synchronous one), so nothing around it is let through.
class CaughtBlockingCalls(logging.Handler):
    """Blocking calls the app caught and logged instead of letting them fail a request."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.caught: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        while error is not None:
            if isinstance(error, BlockingError):
                self.caught.append(f"{record.name}: {record.getMessage()}: {error}")
                return
            error = error.__cause__ or error.__context__

    def take(self) -> list[str]:
        caught, self.caught = self.caught, []
        return caught


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    blocking: CaughtBlockingCalls

    async def chat(self, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
        body = {"model": self.settings.served_model_name, "messages": messages, "max_tokens": 3, "temperature": 0,
                **extra}
        return await self.client.post("/v1/chat/completions", json=body)

    async def complete(self, prompt: str, **extra: Any) -> httpx.Response:
        body = {"model": self.settings.served_model_name, "prompt": prompt, "max_tokens": 3, "temperature": 0,
                **extra}
        return await self.client.post("/v1/completions", json=body)


def full(query: str) -> list[dict[str, str]]:
    return [TEMPLATE[0], {"role": "user", "content": f"Input: {query}\nOutput:"}]


def streamed_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an SSE answer, which must end with `[DONE]` and carry no error."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text
    events = [json.loads(line) for line in lines[:-1]]
    assert events and not any("error" in event for event in events), response.text
    return events


async def wait_for(gateway: Gateway, condition: Callable[[], Awaitable[bool]], what: str,
                   timeout: float = DEADLINE_S) -> None:
    """Poll an async condition until it holds; fail after `timeout` seconds, or at once on a blocking call."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert not gateway.blocking.caught, gateway.blocking.caught
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def serving(settings: Settings, blocking: CaughtBlockingCalls) -> AsyncIterator[Gateway]:
    """An app built by `create_app`, its lifespan run, and a client that calls it in process."""
    # Built off the loop, as `promptintern serve` builds it before uvicorn starts one (the docs' static-files
    # mount checks its folder when it is made).
    app = await asyncio.to_thread(create_app, settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=DEADLINE_S) as client:
            yield Gateway(app, client, settings, blocking)


@pytest.fixture(scope="module")
def upstream(tiny_model_path: Path, module_tmp: Path) -> Iterator[UpstreamProcess]:
    """A real upstream provider (a second gateway process), so relaying is checked under blockbuster too."""
    with UpstreamProcess(module_tmp / "upstream", tiny_model_path) as server:
        yield server


@pytest.fixture(scope="module")
def settings(tiny_model_path: Path, module_tmp: Path, upstream: UpstreamProcess) -> Settings:
    return gateway_settings(module_tmp, tiny_model_path, torch_threads=1, train_threads=1,
                            upstream_url=f"{upstream.url}/v1", upstream_api_key=UPSTREAM_KEY, upstream_models=[MODEL])


@pytest.fixture(scope="module")
def import_dir(settings: Settings, tiny_model_path: Path) -> Path:
    """IMPORT_DIR with an adapter folder and a JSONL training file in it (written before the loop runs)."""
    folder = Path(settings.resolved_import_dir)
    folder.mkdir(parents=True, exist_ok=True)
    random_lora(tiny_model_path, folder / "lora", seed=21, scale=20.0)
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return folder


@pytest.fixture(scope="module")
def upload(tiny_model_path: Path, module_tmp: Path) -> dict[str, tuple[str, bytes, str]]:
    """An adapter's two files as multipart parts, read before the loop runs."""
    folder = random_lora(tiny_model_path, module_tmp / "upload", seed=22, scale=20.0)
    return {CONFIG_FILE: (CONFIG_FILE, (folder / CONFIG_FILE).read_bytes(), "application/json"),
            WEIGHTS_FILE: (WEIGHTS_FILE, (folder / WEIGHTS_FILE).read_bytes(), "application/octet-stream")}


@pytest.fixture(scope="module")
def foreign_upload(base_model_path: Path, module_tmp: Path) -> dict[str, tuple[str, bytes, str]]:
    """An adapter made for the real SmolLM2, not the tiny model served here: over 1 MiB, so its upload is
    spooled to disk on the way in."""
    folder = random_lora(base_model_path, module_tmp / "foreign", seed=23)
    return {CONFIG_FILE: (CONFIG_FILE, (folder / CONFIG_FILE).read_bytes(), "application/json"),
            WEIGHTS_FILE: (WEIGHTS_FILE, (folder / WEIGHTS_FILE).read_bytes(), "application/octet-stream")}


@pytest.fixture(scope="module")
def detector() -> Iterator[BlockBuster]:
    """blockbuster, active for the whole module: every call on a running loop is checked, start-up included."""
    detector = BlockBuster()
    # Waiting for a process blocks too, and blockbuster does not patch it: `Process.join` waits in
    # multiprocessing's `connection.wait` (a select), a join without timeout in `os.waitpid`.
    detector.functions["multiprocessing.connection.wait"] = BlockBusterFunction(None, "multiprocessing.connection.wait")
    detector.functions["os.waitpid"] = BlockBusterFunction(
        None, "os.waitpid", can_block_predicate=lambda _pid, options: bool(options & os.WNOHANG))
    detector.activate()
    try:
        yield detector
    finally:
        detector.deactivate()


@pytest.fixture(scope="module")
async def gateway(detector: BlockBuster, settings: Settings, import_dir: Path) -> AsyncIterator[Gateway]:
    blocking = CaughtBlockingCalls()
    logging.getLogger().addHandler(blocking)
    try:
        async with serving(settings, blocking) as gateway:
            yield gateway
        assert not blocking.take(), "shutdown"
    finally:
        logging.getLogger().removeHandler(blocking)


@pytest.fixture(autouse=True)
def no_blocking_call_caught(gateway: Gateway) -> Iterator[None]:
    """Fail the test if the app caught a blocking call and only logged it (start-up's are checked first)."""
    assert not gateway.blocking.take(), "blocking calls were caught before this test"
    yield
    caught = gateway.blocking.take()
    assert not caught, caught


async def test_operations_routes(gateway: Gateway) -> None:
    client = gateway.client
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "engine": "up", "registry": "up"}
    models = await client.get("/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == gateway.settings.served_model_name
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and 'promptintern_adapters{status="ready"}' in metrics.text
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert (await client.get("/docs/assets/swagger-ui.css")).status_code == 200
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "PromptIntern gateway"


async def test_relayed_to_the_upstream(gateway: Gateway) -> None:
    hello = [{"role": "user", "content": "hi"}]
    whole = await gateway.chat(hello, model=MODEL)
    assert whole.status_code == 200 and whole.headers["x-promptintern-route"] == "passthrough", whole.text
    assert whole.json()["usage"]["prompt_tokens"] > 0
    events = streamed_events(await gateway.chat(hello, model=MODEL, stream=True))
    assert not any(event.get("usage") for event in events)
    completion = await gateway.complete("Input: list files\nOutput:", model=MODEL, stream=True)
    assert streamed_events(completion)[-1]["object"] == "text_completion"
    refused = await gateway.chat(hello, model=MODEL, guided_regex="[a-z]+")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "guided_regex", refused.text


async def test_registry_reads_and_writes(gateway: Gateway) -> None:
    client = gateway.client
    r = await client.post("/v1/prompts", headers=ADMIN, json={
        "name": "bb-shell", "messages": TEMPLATE, "examples": [{"query": "show files", "response": "ls"}]})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "registered"
    listed = await client.get("/v1/prompts", headers=ADMIN)
    assert listed.status_code == 200 and "bb-shell" in [p["name"] for p in listed.json()["data"]]
    shown = await client.get("/v1/prompts/bb-shell", headers=ADMIN)
    assert shown.status_code == 200 and shown.json()["slots"] == ["query"]
    assert (await client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-shell", "prompt": "X {q}"})
            ).status_code == 409
    assert (await client.delete("/v1/prompts/bb-shell", headers=ADMIN)).status_code == 204
    assert (await client.get("/v1/prompts/bb-shell", headers=ADMIN)).status_code == 404


async def test_passthrough_and_fallback_generation(gateway: Gateway) -> None:
    client = gateway.client
    assert (await client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-chat", "messages": TEMPLATE})
            ).status_code == 201
    assert (await client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-complete", "prompt": COMPLETION})
            ).status_code == 201
    try:
        for messages, route in (([{"role": "user", "content": "hi"}], "passthrough"), (full("make a dir"), "fallback")):
            plain = await gateway.chat(messages)
            assert plain.status_code == 200, plain.text
            assert plain.headers["x-promptintern-route"] == route
            streamed = await gateway.chat(messages, stream=True)
            assert streamed.headers["x-promptintern-route"] == route
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in streamed_events(streamed))
            assert text == plain.json()["choices"][0]["message"]["content"]
        for prompt, route in (("Once upon a time", "passthrough"), (COMPLETION.format(query="dog"), "fallback")):
            plain = await gateway.complete(prompt)
            assert plain.status_code == 200, plain.text
            assert plain.headers["x-promptintern-route"] == route
            streamed = await gateway.complete(prompt, stream=True)
            assert streamed.headers["x-promptintern-route"] == route
            text = "".join(e["choices"][0]["text"] for e in streamed_events(streamed))
            assert text == plain.json()["choices"][0]["text"]
    finally:
        for name in ("bb-chat", "bb-complete"):
            assert (await client.delete(f"/v1/prompts/{name}", headers=ADMIN)).status_code == 204


async def test_uploaded_adapter_is_routed_then_deleted(
        gateway: Gateway, upload: dict[str, tuple[str, bytes, str]]) -> None:
    client = gateway.client
    assert (await client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-upload", "messages": TEMPLATE})
            ).status_code == 201
    version = await client.post("/v1/prompts/bb-upload/adapters", headers=ADMIN, files=upload)
    assert version.status_code == 201, version.text
    assert version.json()["version"] == 1 and version.json()["status"] == "ready"
    routed = await gateway.chat(full("make a dir"))
    assert routed.status_code == 200 and routed.headers["x-promptintern-route"] == "adapter"
    direct = await gateway.chat([{"role": "user", "content": "make a dir"}], model="bb-upload@v1", stream=True)
    assert direct.headers["x-promptintern-route"] == "adapter"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in streamed_events(direct))
    assert text == routed.json()["choices"][0]["message"]["content"]
    metrics = (await client.get("/metrics")).text
    assert 'promptintern_adapters{status="ready"} 1.0' in metrics
    assert (await client.delete("/v1/prompts/bb-upload", headers=ADMIN)).status_code == 204
    after = await gateway.chat(full("make a dir"))
    assert after.headers["x-promptintern-route"] == "passthrough"
    assert not await asyncio.to_thread((Path(gateway.settings.adapter_dir) / "bb-upload").exists)


async def test_a_large_upload_for_another_model_is_refused(
        gateway: Gateway, foreign_upload: dict[str, tuple[str, bytes, str]]) -> None:
    client = gateway.client
    assert len(foreign_upload[WEIGHTS_FILE][1]) > 1024 * 1024  # past the size a multipart file is held in memory
    assert (await client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-foreign", "messages": TEMPLATE})
            ).status_code == 201
    try:
        refused = await client.post("/v1/prompts/bb-foreign/adapters", headers=ADMIN, files=foreign_upload)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "adapter_mismatch"
        shown = (await client.get("/v1/prompts/bb-foreign", headers=ADMIN)).json()
        assert shown["active_version"] is None and [v["status"] for v in shown["versions"]] == ["failed"]
    finally:
        assert (await client.delete("/v1/prompts/bb-foreign", headers=ADMIN)).status_code == 204


async def test_imported_adapter_registers_with_the_prompt(
        gateway: Gateway, import_dir: Path) -> None:
    client = gateway.client
    r = await client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-import", "messages": TEMPLATE,
                                                              "adapter_path": "lora"})
    assert r.status_code == 201, r.text
    assert r.json()["active_version"] == 1
    refused = await client.post("/v1/prompts/bb-import/adapters", headers=ADMIN, json={"adapter_path": "../x"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_import_path"
    assert (await client.delete("/v1/prompts/bb-import", headers=ADMIN)).status_code == 204


async def test_training_submitted_then_deleted(gateway: Gateway, import_dir: Path) -> None:
    """A job queued at registration and one read from IMPORT_DIR, each deleted (the second while it trains)."""
    client = gateway.client
    runner: JobRunner = gateway.app.state.jobs
    queued = await client.post("/v1/prompts", headers=ADMIN, json={
        "name": "bb-queued", "messages": TEMPLATE, "train": {"data": ROWS, "schedule": SLOW}})
    assert queued.status_code == 201, queued.text
    assert queued.json()["job"]["status"] in ("queued", "running")
    assert (await client.delete("/v1/prompts/bb-queued", headers=ADMIN)).status_code == 204

    assert (await client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-train", "messages": TEMPLATE})
            ).status_code == 201
    job = await client.post("/v1/prompts/bb-train/train", headers=ADMIN,
                            json={"path": "rows.jsonl", "schedule": SLOW})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]

    async def running() -> bool:
        body = (await client.get("/v1/prompts/bb-train", headers=ADMIN)).json()
        return body["job"]["status"] == "running" and runner.running_job == job_id

    await wait_for(gateway, running, "the training job to run")
    assert (await client.delete("/v1/prompts/bb-train", headers=ADMIN)).status_code == 204
    assert (await client.get("/v1/prompts/bb-train", headers=ADMIN)).status_code == 404

    async def stopped() -> bool:
        return runner.running_job != job_id

    await wait_for(gateway, stopped, "the runner to stop the deleted prompt's job")
    assert not await asyncio.to_thread((Path(gateway.settings.adapter_dir) / "bb-train").exists)


async def test_a_restart_loads_the_registered_adapters(gateway: Gateway, import_dir: Path) -> None:
    """A second app on the same registry (a restart, a replica) starts with the prompt's adapter routed."""
    r = await gateway.client.post("/v1/prompts", headers=ADMIN, json={"name": "bb-restart", "messages": TEMPLATE,
                                                                      "adapter_path": "lora"})
    assert r.status_code == 201, r.text
    try:
        async with serving(gateway.settings, gateway.blocking) as replica:
            models = (await replica.client.get("/v1/models")).json()["data"]
            assert "bb-restart@v1" in [m["id"] for m in models]
            routed = await replica.chat(full("make a dir"))
            assert routed.status_code == 200 and routed.headers["x-promptintern-route"] == "adapter"
    finally:
        assert (await gateway.client.delete("/v1/prompts/bb-restart", headers=ADMIN)).status_code == 204


async def test_training_runs_to_a_routed_version(gateway: Gateway) -> None:
    """A short job trains in its child process, and its version is published, loaded and routed to."""
    client = gateway.client
    r = await client.post("/v1/prompts", headers=ADMIN, json={
        "name": "bb-trained", "messages": TEMPLATE, "train": {"data": ROWS, "schedule": QUICK, "eval_fraction": 0}})
    assert r.status_code == 201, r.text

    async def finished() -> bool:
        job = (await client.get("/v1/prompts/bb-trained", headers=ADMIN)).json()["job"]
        return job["status"] in ("succeeded", "failed", "interrupted")

    try:
        await wait_for(gateway, finished, "the training job to finish")
        body = (await client.get("/v1/prompts/bb-trained", headers=ADMIN)).json()
        assert body["job"]["status"] == "succeeded", body["job"]
        assert body["active_version"] == 1
        routed = await gateway.chat(full("make a dir"))
        assert routed.status_code == 200 and routed.headers["x-promptintern-route"] == "adapter"
        metrics = (await client.get("/metrics")).text
        assert 'promptintern_adapters{status="ready"} 1.0' in metrics
    finally:
        assert (await client.delete("/v1/prompts/bb-trained", headers=ADMIN)).status_code == 204
