"""Merged serving: a prompt's active version answered by a vLLM whose weights have its adapter merged in, so its
requests pay no LoRA cost (`PATCH /v1/prompts/{name} {"serving": {"mode": "merged", "url": null}}`).

Without `url`, one replica holds the prompt's lease in the registry (`serving.engine.owner`, renewed while it
lives, taken over by another once it has run out). That replica merges the version (`python -m trainer.merge`, a
child process whose progress is logged), starts a vLLM for it on a port of MERGED_PORTS with the launcher of
`promptintern vllm`, restarts it when it dies, and records where it answers; with `url`, the engine runs elsewhere
(a cluster) and must serve the id `<prompt>@v<N>`. Every replica routes a prompt's requests to the merged engine
only once it has seen that engine answer for the version it routes to itself, and keeps the LoRA adapter loaded
meanwhile: a new version is answered by its adapter until its merged engine is up, a rollback or a delete takes
effect at once, and none of it opens a window of errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx

from core.adapter_store import AdapterStore
from core.config import Settings
from core.errors import NotFoundError
from gateway.engines.inflight import AdapterUse
from gateway.engines.merged import MergedRoutes
from gateway.registry.store import PromptRegistry
from gateway.tasks import stop_task
from gateway.vllm_server import spawn_vllm, stop_vllm, vllm_command

log = logging.getLogger(__name__)
CHECK_SECONDS = 2.0  # how often each merged engine is probed (and, for its lease holder, supervised)
START_TIMEOUT_S = 900.0  # a vLLM start (compile warm-up included) that takes longer than this has failed
RESTART_BACKOFF_S = (5.0, 30.0, 120.0)  # waits before restarting an engine that died, then the last one each time
MERGED_DIR = "merged-v{version}"  # beside the prompt's version folders in the adapter store
DEFAULT_MAX_MODEL_LEN = 4096  # as `promptintern vllm`


def merged_model_dir(store: AdapterStore, prompt: str, version: int) -> Path:
    return store.root / prompt / MERGED_DIR.format(version=version)


def version_of(model_id: str) -> int:
    return int(model_id.rpartition("@v")[2])


@dataclass
class LocalEngine:
    """A merged vLLM this replica started and supervises."""

    prompt: str
    model_id: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    ready: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class _Restarts:
    count: int = 0
    not_before: float = 0.0
    errors: list[str] = field(default_factory=list)


class MergedServing:
    """This replica's side of merged serving: what it routes merged, and the engines it runs under a lease."""

    def __init__(self, settings: Settings, registry: PromptRegistry, store: AdapterStore, routes: MergedRoutes,
                 base_model_dir: Path, in_flight: AdapterUse, adapter_of: Callable[[str], str | None]) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.routes = routes
        self.base_model_dir = base_model_dir
        self.in_flight = in_flight
        self._adapter_of = adapter_of  # the model id this replica routes a prompt to (its active version), or None
        self.owner = f"{socket.gethostname()}-{os.getpid()}-merged-{uuid.uuid4().hex[:8]}"
        self.lease_ttl = timedelta(seconds=self.settings.job_lease_seconds)
        self._wanted: dict[str, dict[str, Any]] = {}  # prompt -> serving setting (prompts served merged)
        self._routed: dict[str, str] = {}  # prompt -> the model id its merged engine answers here
        self._errors: dict[str, str] = {}  # prompt -> why it is not merged here (this replica's view)
        self._engines: dict[str, LocalEngine] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._restarts: dict[str, _Restarts] = {}
        self._renewed: dict[str, float] = {}
        self._kick = asyncio.Event()
        self._refresh = True
        self._task: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0))

    # -- what the prompt API shows -------------------------------------------------------------

    def view(self, name: str, serving: dict[str, Any] | None) -> dict[str, Any]:
        """`{requested, current, url, error}` as this replica sees it."""
        serving = serving or {}
        requested: Literal["lora", "merged"] = "merged" if serving.get("mode") == "merged" else "lora"
        model_id = self._adapter_of(name)
        routed = requested == "merged" and model_id is not None and self._routed.get(name) == model_id
        current = "merged" if routed else "lora"
        error = None
        if requested == "merged" and current == "lora":
            error = self._errors.get(name) or (serving.get("engine") or {}).get("error")
        return {"requested": requested, "current": current, "url": serving.get("url"), "error": error}

    async def setting_changed(self, name: str) -> None:
        """This replica's PATCH changed the prompt's setting: off its merged engine at once (the adapter answers
        until the new setting's engine does), the rest at the next look."""
        await self._unroute(name)
        self.kick()

    def kick(self) -> None:
        """The registry changed: read the serving settings again and act now (not at the next tick)."""
        self._refresh = True
        self._kick.set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="merged-serving")

    async def close(self) -> None:
        await stop_task(self._task)
        for task in list(self._starting.values()):
            await stop_task(task)
        for name in list(self._routed):
            await self._unroute(name)
        for name in list(self._engines):
            await self._stop_engine(name, drain=False)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.registry.release_serving, name, self.owner)
        await self._http.aclose()

    async def _loop(self) -> None:
        last_read = 0.0
        while True:
            try:
                if self._refresh or time.monotonic() - last_read > self.lease_ttl.total_seconds() / 3:
                    self._refresh = False
                    self._wanted = await asyncio.to_thread(self.registry.merged_prompts)
                    last_read = time.monotonic()
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the registry away for a moment: try again at the next tick
                log.exception("merged serving: a check failed")
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), CHECK_SECONDS)

    async def _tick(self) -> None:
        for name in [n for n in {*self._routed, *self._engines, *self._starting} if n not in self._wanted]:
            await self._unroute(name)
            await self._stop_engine(name)
            self._errors.pop(name, None)
        for name, serving in self._wanted.items():
            model_id = self._adapter_of(name)
            if model_id is None:  # no ready version here (yet, or any more)
                await self._unroute(name)
                await self._stop_engine(name)
                self._errors[name] = "no ready version to merge"
                continue
            if self._routed.get(name) not in (None, model_id):
                await self._unroute(name)  # another version is active now: its adapter answers until merged
            url = serving.get("url")
            if url is None:
                await self._hold_lease(name, serving, model_id)
                engine = serving.get("engine") or {}
                endpoint = engine.get("endpoint") if engine.get("version") == version_of(model_id) else None
                local = self._engines.get(name)
                if local is not None and local.ready and local.model_id == model_id:
                    endpoint = local.url  # this replica's own engine: no need to wait for the registry's echo
            else:
                await self._stop_engine(name)
                endpoint = url
            if endpoint is None:
                await self._unroute(name)
                continue
            await self._probe(name, model_id, endpoint)

    # -- routing: only to an engine seen answering for the version routed to --------------------

    async def _probe(self, name: str, model_id: str, endpoint: str) -> None:
        try:
            response = await self._http.get(f"{endpoint}/v1/models")
            response.raise_for_status()
            served = [card.get("id") for card in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self._errors[name] = f"the merged engine at {endpoint} does not answer: {type(exc).__name__}: {exc}"
            await self._unroute(name)
            return
        if model_id not in served:
            self._errors[name] = f"the merged engine at {endpoint} serves {served}, not '{model_id}'"
            await self._unroute(name)
            return
        self._errors.pop(name, None)
        if self._routed.get(name) != model_id:
            await self.routes.route(model_id, endpoint)
            self._routed[name] = model_id

    async def _unroute(self, name: str) -> None:
        model_id = self._routed.pop(name, None)
        if model_id is not None:
            await self.routes.unroute(model_id)

    # -- the lease holder: merge, start, supervise ---------------------------------------------

    async def _hold_lease(self, name: str, serving: dict[str, Any], model_id: str) -> None:
        """Take the lease when it is free, renew it when a third of its time has passed, and supervise the engine
        while holding it; stop ours when another replica holds it."""
        engine = serving.get("engine") or {}
        mine = engine.get("owner") == self.owner
        expires = engine.get("expires")
        free = not engine.get("owner") or (expires is not None and datetime.fromisoformat(expires) <= datetime.now(UTC))
        if not mine and not free:
            await self._stop_engine(name)  # another replica's
            return
        if free or time.monotonic() - self._renewed.get(name, 0.0) > self.lease_ttl.total_seconds() / 3:
            claimed = await asyncio.to_thread(self.registry.claim_serving, name, self.owner, self.lease_ttl)
            if claimed is None:
                await self._stop_engine(name)
                return
            self._renewed[name] = time.monotonic()
            self._wanted[name] = claimed
        await self._supervise(name, model_id)

    async def _supervise(self, name: str, model_id: str) -> None:
        if name in self._starting:
            return
        local = self._engines.get(name)
        if local is not None and local.model_id == model_id and local.process.poll() is None:
            return
        if local is not None and local.process.poll() is not None:
            why = (f"the merged engine for {local.model_id} exited with {local.process.returncode} "
                   f"(log: {local.log_path})")
            log.error("%s", why)
            self._engines.pop(name)
            await self._report(name, endpoint=None, version=None, error=why)
            restarts = self._restarts.setdefault(name, _Restarts())
            restarts.not_before = time.monotonic() + RESTART_BACKOFF_S[min(restarts.count, len(RESTART_BACKOFF_S) - 1)]
            restarts.count += 1
        elif local is not None:  # a new version is active: its adapter answers while the new engine starts
            await self._stop_engine(name)
        if time.monotonic() < self._restarts.get(name, _Restarts()).not_before:
            return
        if len(self._engines) + len(self._starting) >= self.settings.max_merged_engines:
            await self._report(name, error=f"this replica already runs {len(self._engines)} merged engine(s) "
                                           f"(MAX_MERGED_ENGINES={self.settings.max_merged_engines})")
            return
        self._starting[name] = asyncio.create_task(self._start_engine(name, model_id), name=f"merged {model_id}")
        self._starting[name].add_done_callback(lambda _: self._starting.pop(name, None))

    async def _start_engine(self, name: str, model_id: str) -> None:
        version = version_of(model_id)
        local: LocalEngine | None = None
        try:
            model_dir = await self._merge(name, version)
            port = await asyncio.to_thread(self._free_port)
            log_dir = self.settings.data_dir / "merged-engines"
            await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
            log_path = log_dir / f"{name}.log"
            command = vllm_command(self.settings, model_dir, port=port, served_model_name=model_id, lora=False,
                                   max_model_len=self.settings.max_model_len or DEFAULT_MAX_MODEL_LEN,
                                   fast_start=self.settings.merged_fast_start)
            log.info("starting the merged engine for %s on port %d (log: %s)", model_id, port, log_path)
            process = await self._spawn(command, log_path)
            local = LocalEngine(name, model_id, port, process, log_path)
            self._engines[name] = local
            started = time.monotonic()
            while not await self._healthy(local):
                if process.poll() is not None:
                    return  # the next tick reports it and restarts it after a pause
                if time.monotonic() - started > START_TIMEOUT_S:
                    raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S:.0f} s (log: {log_path})")
                await asyncio.sleep(1.0)
            local.ready = True
            self._restarts.pop(name, None)
            log.info("merged engine for %s ready on port %d in %.0f s", model_id, port, time.monotonic() - started)
            await self._report(name, endpoint=local.url, version=version, error=None)
            self.kick()
        except asyncio.CancelledError:
            if local is None:  # stopped while merging (a delete, a new version): no engine uses what it wrote
                await asyncio.to_thread(remove_merged, self.store, name, version)
            raise
        except Exception as exc:
            await self._stop_engine(name, drain=False)  # its engine if it got one, with the merged folder
            if local is None:
                await asyncio.to_thread(remove_merged, self.store, name, version)
            if isinstance(exc, NotFoundError):  # the prompt or version was deleted meanwhile: nothing to retry
                log.info("not starting the merged engine for %s: it was deleted meanwhile", model_id)
                return
            why = f"starting the merged engine for {model_id} failed: {type(exc).__name__}: {exc}"
            log.error("%s", why)
            restarts = self._restarts.setdefault(name, _Restarts())
            restarts.not_before = time.monotonic() + RESTART_BACKOFF_S[min(restarts.count, len(RESTART_BACKOFF_S) - 1)]
            restarts.count += 1
            await self._report(name, error=why)

    async def _spawn(self, command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start vLLM in a thread (a fork and exec); stopped meanwhile, the start finishes and its vLLM is stopped,
        not left running where nothing sees it."""
        spawning = asyncio.ensure_future(
            asyncio.to_thread(spawn_vllm, command, self.settings.merged_threads, log_path))
        try:
            return await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stop_vllm, await spawning)
            raise

    async def _merge(self, name: str, version: int) -> Path:
        """The version's merged folder, written by `python -m trainer.merge` in a child process unless it exists."""
        out = merged_model_dir(self.store, name, version)
        if await asyncio.to_thread(out.is_dir):
            return out
        path = (await asyncio.to_thread(self.registry.get_version, name, version)).path
        adapter = Path(path) if path else None
        if adapter is None:
            raise RuntimeError(f"version {version} of '{name}' has no adapter folder")
        log.info("merging %s@v%d into the base model: %s", name, version, out)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trainer.merge", "--base", str(self.base_model_dir), "--adapter", str(adapter),
            "--out", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert process.stdout is not None
        tail: list[str] = []
        try:
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                if line.startswith("[merge"):
                    log.info("%s@v%d: %s", name, version, line)
                tail = [*tail[-20:], line]
            code = await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if code != 0:
            raise RuntimeError(f"merging failed ({code}): " + " | ".join(tail[-3:]))
        return out

    async def _healthy(self, local: LocalEngine) -> bool:
        try:
            return (await self._http.get(f"{local.url}/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def _free_port(self) -> int:
        taken = {engine.port for engine in self._engines.values()}
        port = free_port_of(self.settings.merged_ports, taken)
        if port is None:
            raise RuntimeError(f"no free port in MERGED_PORTS ({self.settings.merged_ports})")
        return port

    async def _stop_engine(self, name: str, drain: bool = True) -> None:
        """Stop this replica's engine for `name` (after its requests here drain) and remove its merged folder."""
        task = self._starting.pop(name, None)
        if task is not None and task is not asyncio.current_task():  # (the start task stops its own engine)
            await stop_task(task)  # one stopped while merging removes what its merge wrote
        local = self._engines.pop(name, None)
        if local is None:
            return
        if drain and not await self.in_flight.drain(local.model_id, self.settings.adapter_drain_seconds):
            log.warning("stopping the merged engine for %s with requests in flight", local.model_id)
        log.info("stopping the merged engine for %s (port %d)", local.model_id, local.port)
        await asyncio.to_thread(stop_vllm, local.process)
        await self._report(name, endpoint=None, version=None)
        await asyncio.to_thread(remove_merged, self.store, name, version_of(local.model_id))

    async def _report(self, name: str, **fields: Any) -> None:
        """Record the engine's state in the registry (every replica follows it), while this replica holds the lease."""
        with contextlib.suppress(Exception):
            held = await asyncio.to_thread(self.registry.update_serving_engine, name, self.owner, self.lease_ttl,
                                           **fields)
            if held and "error" in fields and fields["error"]:
                self._errors[name] = str(fields["error"])


def remove_merged(store: AdapterStore, prompt: str, version: int) -> None:
    """Remove a version's merged folder and what a merge of it left half-written (its writer gone: a merge stopped
    midway is killed), then the prompt's folder if nothing else is left in it (the prompt was deleted)."""
    folder = merged_model_dir(store, prompt, version)
    shutil.rmtree(folder, ignore_errors=True)
    store.remove_staging_leftovers()  # a killed merge's among them
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def free_port_of(ports: list[int], taken: set[int]) -> int | None:
    """The first of `ports` not in `taken` that nothing listens on (on 127.0.0.1, where merged engines listen).

    The probe binds as vLLM does, with SO_REUSEADDR: a port whose last engine was just stopped keeps the
    connections the gateway had open to it in TIME_WAIT for a minute, which refuse a plain bind but not vLLM's.
    """
    for port in ports:
        if port in taken:
            continue
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return None
