"""Training jobs started from the registry: one runner per database, each job in its own process.

The runner holds a lease row (with a heartbeat), so with several gateway replicas on one
database only one trains at a time; jobs run in the order they were queued. A job runs in a
spawned child process, so the gateway keeps serving while it trains. A job whose runner died
(gateway restart, crash) is marked interrupted and queued again once; its half-written adapter
folder never becomes visible (the trainer renames a finished folder into place).

`trainer.jobspec` is the gateway's only way into the trainer: a `TrainData` validated at submission
and queued here, a `JobSpec` handed to the training process, a `TrainResult` (adapter folder and
manifest) back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from core.adapter_store import AdapterStore
from core.config import Settings
from core.templates import PromptTemplate
from gateway.prompts.protocol import TrainSpec
from gateway.registry.db import utcnow
from gateway.registry.store import JobRecord, PromptRegistry
from trainer import jobspec
from trainer.jobspec import ChildMessage, JobSpec, TrainData, TrainResult

log = logging.getLogger(__name__)
LEASE_TTL = timedelta(seconds=30)
POLL_S = 1.0
MAX_ATTEMPTS = 2  # a job interrupted once is queued again once

ActivateVersion = Callable[[str, int, Path, dict[str, Any]], Awaitable[bool]]
"""Load, warm and route to a finished version (prompt, version, adapter folder, manifest); False if it failed."""


class TrainingJobs(Protocol):
    """What the prompt service needs of the job runner: queue a prompt's training, stop a deleted prompt's."""

    async def submit(self, name: str, data: TrainData) -> JobRecord: ...

    async def cancel(self, name: str) -> None: ...


class _PipeSender:
    """The child's end of a one-way pipe with the `put` that `trainer.jobspec.run_in_child` sends through.

    A pipe rather than a `multiprocessing.Queue`: a queue's semaphores unregister from multiprocessing's
    resource tracker (a pipe write) whenever the queue is collected, which would be on the event loop.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def put(self, message: ChildMessage) -> None:
        self.connection.send(message)


@dataclass(frozen=True)
class _Child:
    process: Any  # multiprocessing.Process (spawn context)
    messages: Connection  # the parent's end of the pipe: trainer.jobspec.ChildMessage tuples


def _start_child(spec: JobSpec, name: str) -> _Child:
    """Blocking: spawn the training process (this may start multiprocessing's resource tracker, and writes the
    child's start-up data through a pipe)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=jobspec.run_in_child,
                              args=(spec.model_dump(mode="json"), _PipeSender(sender)), name=name, daemon=True)
    try:
        process.start()
    finally:
        sender.close()  # the child holds its own copy: the pipe reads as closed once the child is gone
    return _Child(process, receiver)


def _receive(child: _Child, timeout: float) -> ChildMessage | None:
    """Blocking: the child's next message; None if none came within `timeout` s, or if the child closed its
    end (then it is given up to `timeout` s to exit)."""
    try:
        if child.messages.poll(timeout):
            message: ChildMessage = child.messages.recv()
            return message
    except EOFError:
        child.process.join(timeout)
    return None


async def _spawn(spec: JobSpec, name: str) -> _Child:
    """Start the training process from a thread; if the task is cancelled meanwhile, the process it started
    is stopped before the cancellation goes on, so none is left behind."""
    started = asyncio.ensure_future(asyncio.to_thread(_start_child, spec, name))
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        await asyncio.wait([started])
        if started.exception() is None:
            await asyncio.to_thread(_terminate, started.result().process)
        raise


def _terminate(process: Any) -> None:
    """Blocking: ask a child process to stop, wait up to 10 s, then kill it."""
    if process.is_alive():
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join(10)


def prepare_train_spec(template: PromptTemplate, spec: TrainSpec) -> TrainData:
    """Validate a REST `train` object now (a 422 at submission, not a failed job later); the data to queue."""
    return jobspec.validate_submission(template, data=spec.data, path=spec.path, schedule=spec.schedule,
                                       eval_fraction=spec.eval_fraction, param="train")


class JobRunner:
    """Runs queued training jobs one at a time while this replica holds the runner lease."""

    def __init__(self, settings: Settings, registry: PromptRegistry, store: AdapterStore, base_model_dir: Path, *,
                 activate: ActivateVersion, versions_changed: Callable[[], Awaitable[None]]) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.base_model_dir = base_model_dir
        self._activate = activate
        self._versions_changed = versions_changed  # a version was added or failed: refresh what depends on it
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._child: _Child | None = None
        self._running_job: int | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Lock()  # DELETE and the job's own ending may both stop the child

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stop_child()
        await asyncio.to_thread(self.registry.release_lease, self.owner)

    @property
    def running_job(self) -> int | None:
        """The id of the job this runner is working on (training or publishing), if any."""
        return self._running_job

    async def submit(self, name: str, data: TrainData) -> JobRecord:
        """Queue a job (validated data) and wake the loop; jobs run in the order they were queued."""
        job = await asyncio.to_thread(self.registry.create_job, name, data.model_dump(mode="json"))
        self._wake.set()
        return job

    async def cancel(self, name: str) -> None:
        """Stop the running job of a prompt being deleted (its queued jobs go with the prompt's rows)."""
        running = self._running_job
        if running is None:
            return
        job = await asyncio.to_thread(self.registry.get_job, running)
        if job is None or job.prompt == name:
            await self._stop_child()

    async def _stop_child(self) -> None:
        """Terminate the training process (killed if it outlives 10 s), waiting for it in a thread, not the loop."""
        async with self._stopping:
            child = self._child
            if child is not None:
                await asyncio.to_thread(_terminate, child.process)

    # -- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self.registry.acquire_lease, self.owner, LEASE_TTL):
                    await asyncio.to_thread(self._recover_interrupted)
                    job = await asyncio.to_thread(self.registry.next_queued_job)
                    if job is not None:
                        await self._run(job)
                        continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job runner iteration failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    def _recover_interrupted(self) -> None:
        """Jobs marked running while this runner holds the lease and runs nothing: their runner died."""
        for job in self.registry.running_jobs():
            if job.id == self._running_job:
                continue
            if job.version is not None:
                with contextlib.suppress(Exception):
                    self.registry.update_version(job.prompt, job.version, status="failed",
                                                 error="interrupted: the training runner stopped")
            again = job.attempts < MAX_ATTEMPTS
            log.warning("training job %d of %s was interrupted; %s", job.id, job.prompt,
                        "queued again" if again else "giving up")
            self.registry.update_job(job.id, status="queued" if again else "interrupted",
                                     error="interrupted: the training runner stopped" + (
                                         "; queued again" if again else ""), finished_at=None if again else utcnow())

    async def _run(self, job: JobRecord) -> None:
        self._running_job = job.id
        try:
            await self._train(job)
        finally:
            self._running_job = None

    async def _train(self, job: JobRecord) -> None:
        """Train one job in a child process, relay its progress, then publish or fail its version."""
        try:
            data = TrainData.model_validate(job.spec)
        except ValidationError as exc:  # written by another release of the gateway, perhaps
            await asyncio.to_thread(self.registry.update_job, job.id, status="failed", finished_at=utcnow(),
                                    error=f"the queued job's data is not readable: {exc}")
            return
        record = await asyncio.to_thread(self.registry.get, job.prompt)
        version = await asyncio.to_thread(self.registry.allocate_version, job.prompt, "training", "train", self.store)
        await asyncio.to_thread(self.registry.update_job, job.id, status="running", started_at=utcnow(),
                                version=version, attempts=job.attempts + 1, progress={"phase": "starting"})
        await self._versions_changed()
        spec = JobSpec(
            prompt=job.prompt, kind=record.kind, template=record.template, examples=record.examples,
            data=data, out_dir=self.store.version_dir(job.prompt, version),
            base_model_dir=self.base_model_dir, served_model_name=self.settings.served_model_name,
            lora_rank=self.settings.lora_rank, lora_targets=list(self.settings.lora_targets),
            cache_dir=self.settings.data_dir / "trainer-cache", threads=self.settings.train_threads,
        )
        log.info("training job %d: %s version %d", job.id, job.prompt, version)
        self._child = await _spawn(spec, f"train-{job.id}")
        try:
            outcome = await self._follow(job, self._child)
        finally:
            await self._stop_child()
            self._child = None
        await self._finish(job, version, spec.out_dir, outcome)

    async def _follow(self, job: JobRecord, child: _Child) -> tuple[str, Any]:
        """Relay progress into the job row and keep the lease alive until the child reports."""
        last_write = 0.0
        kind: str
        body: Any
        while True:
            message = await asyncio.to_thread(_receive, child, POLL_S)
            if message is not None:
                kind, body = message
            elif not child.process.is_alive():
                return "error", f"the training process exited with code {child.process.exitcode}"
            else:
                kind, body = "tick", None
            if kind == "done":
                return kind, TrainResult.model_validate(body)
            if kind == "error":
                return kind, body
            now = time.monotonic()
            if now - last_write >= POLL_S:
                last_write = now
                await asyncio.to_thread(self.registry.acquire_lease, self.owner, LEASE_TTL)
                if kind == "progress":
                    await asyncio.to_thread(self.registry.update_job, job.id, progress=body)
                if await asyncio.to_thread(self.registry.get_job, job.id) is None:
                    return "cancelled", None  # the prompt was deleted

    async def _finish(self, job: JobRecord, version: int, out_dir: Path, outcome: tuple[str, Any]) -> None:
        kind, body = outcome
        if await asyncio.to_thread(self.registry.get_job, job.id) is None:
            kind = "cancelled"
        if kind == "cancelled":
            await asyncio.to_thread(self.store.remove_prompt, job.prompt, [version])  # if it was written anyway
            return
        if kind == "error":
            log.error("training job %d of %s failed: %s", job.id, job.prompt, body)
            await asyncio.to_thread(self.registry.update_version, job.prompt, version, status="failed",
                                    error=str(body))
            await asyncio.to_thread(self.registry.update_job, job.id, status="failed", error=str(body),
                                    finished_at=utcnow())
            await self._versions_changed()
            return
        result: TrainResult = body
        ok = await self._activate(job.prompt, version, result.adapter_dir, result.manifest)
        await asyncio.to_thread(self.registry.update_job, job.id, status="succeeded" if ok else "failed",
                                error=None if ok else "the trained adapter did not load", finished_at=utcnow(),
                                progress={"phase": "done"})
