"""What a merged engine's start leaves on disk when it is stopped before its engine runs (a delete, a new version,
a rollback arriving while the version is being merged): nothing. No vLLM here: the merge is the real child process
(`python -m trainer.merge`) on the tiny model, and the only port of MERGED_PORTS is taken, so a start that gets
past the merge fails there instead of starting a vLLM."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.adapter_store import AdapterStore, make_staging_dir
from gateway.engines.inflight import AdapterUse
from gateway.engines.merged import MergedRoutes
from gateway.engines.vllm import VLLMEngine
from gateway.prompts.merged import MergedServing, merged_model_dir, remove_merged
from gateway.registry.store import PromptRegistry
from tests.conftest import gateway_settings
from trainer.lora import random_lora

TEMPLATE = [{"role": "user", "content": "{q}"}]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_merged_takes_the_folder_and_a_killed_merges_staging_and_keeps_a_live_writers(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    merged = merged_model_dir(store, "p", 1)
    (merged / "weights").mkdir(parents=True)
    killed = make_staging_dir(merged.parent, merged.name)
    killed = killed.rename(killed.with_name(killed.name.replace(f".{os.getpid()}-", f".{dead_pid()}-")))
    live = make_staging_dir(merged.parent, merged.name)  # this process writes it: it stays
    other = make_staging_dir(merged.parent, "merged-v2")  # another version's merge: not this one's to remove
    remove_merged(store, "p", 1)
    assert not merged.exists() and not killed.exists()
    assert live.exists() and other.exists()
    for folder in (live, other):
        folder.rmdir()
    remove_merged(store, "p", 1)
    assert not (store.root / "p").exists()  # nothing else left: the prompt was deleted


class Harness:
    """The lease holder's side of merged serving on a real registry and adapter store, for one prompt `p`."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.port_holder = socket.socket()
        self.port_holder.bind(("127.0.0.1", 0))
        self.port_holder.listen()
        self.settings = gateway_settings(tmp, model, engine="vllm", merged_ports=[self.port_holder.getsockname()[1]])
        self.registry = PromptRegistry(f"sqlite:///{tmp / 'registry.db'}")
        self.store = AdapterStore(self.settings.adapter_dir)
        self.registry.create("p", "chat", TEMPLATE, [])
        version = self.registry.allocate_version("p", "ready", "upload", self.store)
        adapter = random_lora(model, self.store.version_dir("p", version), seed=7)
        self.registry.update_version("p", version, path=str(adapter))
        # The main vLLM is never called: starting and stopping an engine routes no request.
        routes = MergedRoutes(VLLMEngine(self.settings), self.settings)
        self.serving = MergedServing(self.settings, self.registry, self.store, routes, model, AdapterUse(),
                                     lambda name: "p@v1")
        self.registry.set_serving("p", {"mode": "merged", "url": None})
        assert self.registry.claim_serving("p", self.serving.owner, self.serving.lease_ttl) is not None

    def delete_prompt(self) -> None:
        versions = [v.version for v in self.registry.delete("p").versions]
        self.store.remove_prompt("p", versions)

    def close(self) -> None:
        asyncio.run(self.serving._http.aclose())
        self.registry.close()
        self.port_holder.close()


@pytest.fixture
def harness(tmp_path: Path, tiny_model_path: Path) -> Any:
    h = Harness(tmp_path, tiny_model_path)
    yield h
    h.close()


def test_a_start_stopped_while_merging_leaves_nothing(harness: Harness) -> None:
    """The CI failure of 2026-12-02: a prompt deleted while its version was being merged kept its folder, holding
    what the merge had written (a killed merge's staging folder, or the merged model not yet served)."""
    prompt_dir = harness.store.root / "p"
    merged = merged_model_dir(harness.store, "p", 1)

    def written() -> list[str]:
        return sorted(p.name for p in prompt_dir.iterdir() if p.name != "v1")

    async def scenario() -> None:
        serving = harness.serving
        serving._starting["p"] = asyncio.create_task(serving._start_engine("p", "p@v1"))
        deadline = time.monotonic() + 300
        while not written():
            assert time.monotonic() < deadline, "the merge never started writing"
            assert not serving._starting["p"].done(), serving._starting["p"]
            await asyncio.sleep(0.01)
        await serving._stop_engine("p")  # what a tick does when the prompt is deleted or another version is active

    asyncio.run(scenario())
    assert not written() and not merged.exists()
    harness.delete_prompt()
    assert not prompt_dir.exists()


def test_a_start_for_a_prompt_deleted_meanwhile_ends_quietly(harness: Harness,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    harness.delete_prompt()

    async def scenario() -> None:
        await harness.serving._start_engine("p", "p@v1")

    with caplog.at_level(logging.INFO, logger="gateway.prompts.merged"):
        asyncio.run(scenario())
    assert not (harness.store.root / "p").exists()
    assert "deleted meanwhile" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "p" not in harness.serving._restarts  # not a failure: nothing to retry


def test_a_start_that_fails_after_merging_removes_the_merged_model_and_says_why(harness: Harness) -> None:
    """The port is taken: the start fails after the merge, reports why and retries later; nothing it wrote stays."""
    async def scenario() -> None:
        await harness.serving._start_engine("p", "p@v1")

    asyncio.run(scenario())
    why = harness.registry.get("p").serving["engine"]["error"]
    assert why.startswith("starting the merged engine for p@v1 failed: RuntimeError: no free port in MERGED_PORTS")
    assert harness.serving._errors["p"] == why
    assert harness.serving._restarts["p"].count == 1
    assert not merged_model_dir(harness.store, "p", 1).exists()
    assert (harness.store.root / "p" / "v1").is_dir()  # the version itself stays


def test_a_start_stopped_while_its_engine_is_being_spawned_leaves_no_process(harness: Harness,
                                                                            tmp_path: Path) -> None:
    """The spawn runs in a thread that a cancel does not stop: the process it starts is stopped, not left running
    unseen (holding its port and a copy of the weights). The stand-in command only sleeps: the launcher is real."""
    marker = f"promptintern-spawn-test-{os.getpid()}-{time.time_ns()}"
    log_path = tmp_path / "engine.log"

    async def scenario() -> None:
        task = asyncio.create_task(harness.serving._spawn(
            [sys.executable, "-c", f"import time; time.sleep(120)  # {marker}"], log_path))
        await asyncio.sleep(0)  # the spawn is under way in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert log_path.exists()  # the spawn ran
    assert not [p for p in psutil.process_iter(["cmdline", "status"])
                if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
