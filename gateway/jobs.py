"""Training jobs from the registry: each runner trains one job at a time, under that job's fenced lease.

A runner claims a job (the oldest queued one, or one left `running` under a lease that ran out: its runner died)
by a compare-and-set that gives it a fresh random token (`PromptRegistry.claim_job`). Every later write it makes
for the job (the version it allocates, its progress, the version's publication, the job's end) matches that token,
and a background task renews the lease while the job trains, activates and publishes. A runner whose renewal or
write finds the token gone (another runner took the job over, or the prompt was deleted) has lost the job: it stops
the training process and publishes nothing. A takeover fails the dead runner's unfinished version in the same
transaction and trains a new one, at most MAX_ATTEMPTS starts in all, so each job publishes at most one version.

The training process dies with the process that started it (`trainer.jobspec.die_with_parent`): a runner killed
mid-job leaves no trainer behind to compete with the one that takes the job over.

There is no runner lease per database any more (the old `runner_lease` table is unused): it would cap a deployment
at one training at a time, also with several GPU workers, and fenced per-job leases already keep each job to one
runner. Concurrency is the number of runners: each process trains at most one job, and `TRAIN_IN_GATEWAY=false`
keeps gateway replicas from training where dedicated `promptintern worker` processes do.

`trainer.jobspec` is the gateway's only way into the trainer: a `TrainData` validated at submission and queued
here, a `JobSpec` handed to the training process, a `TrainResult` (adapter folder and manifest) back.
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

from core.adapter_store import AdapterStore, read_adapter_config
from core.config import Settings
from core.errors import InvalidAdapter, NotFoundError
from core.templates import PromptTemplate
from gateway.prompts.protocol import TrainSpec
from gateway.registry.store import JobLease, JobRecord, PromptRecord, PromptRegistry
from gateway.tasks import stop_task
from trainer import jobspec
from trainer.jobspec import ChildMessage, GateSpec, JobSpec, TrainData, TrainResult

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often an idle runner looks for a job
PROGRESS_EVERY_S = 1.0  # the newest progress is written at most this often
MAX_ATTEMPTS = 2  # a job whose runner died once is taken over once

ShareCores = Callable[[bool], Awaitable[int]]
"""Told True when a training starts on this machine, False when it ends; returns the threads the engine now uses."""

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
    child's start-up data through a pipe). The child ends with this process however this one ends
    (`run_in_child`'s `parent_pid`); `daemon` only has a normal interpreter exit stop it too."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=jobspec.run_in_child,
                              args=(spec.model_dump(mode="json"), _PipeSender(sender), os.getpid()), name=name,
                              daemon=True)
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


def promotion_gate(record: PromptRecord) -> GateSpec:
    """The promotion gate of a traffic-trained version of this prompt: compared with the version serving it now
    (if any) on the guard's metric, and with the guard's minimum (if it has a guard)."""
    guard = record.guard or {}
    active = record.active_version
    return GateSpec(metric=guard.get("metric", "exact"), min_agreement=guard.get("min_agreement"),
                    incumbent_dir=Path(active.path) if active is not None and active.path else None,
                    incumbent_version=active.version if active is not None and active.path else None)


class _HeldLease:
    """A claimed job's lease, kept alive by a background task that also writes the newest progress (at most once
    per PROGRESS_EVERY_S, never dropping the latest). `lost` is set once the lease is no longer this runner's: a
    renewal matched no row, or none succeeded within the lease's time to live (another runner may hold it)."""

    def __init__(self, registry: PromptRegistry, lease: JobLease, ttl: timedelta) -> None:
        self.registry = registry
        self.job_id = lease.job.id
        self.token = lease.token
        self.ttl = ttl
        self.lost = asyncio.Event()
        self._progress: dict[str, Any] | None = None  # newest, not yet written
        self._task: asyncio.Task[None] | None = None

    def report(self, progress: dict[str, Any]) -> None:
        self._progress = progress

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep(), name=f"lease of job {self.job_id}")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _keep(self) -> None:
        ttl_s = self.ttl.total_seconds()
        tick = min(PROGRESS_EVERY_S, ttl_s / 4)
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._progress is None and now - renewed < ttl_s / 3:
                continue
            progress, self._progress = self._progress, None
            try:
                held = await asyncio.to_thread(self.registry.renew_job_lease, self.job_id, self.token, self.ttl,
                                               progress)
            except Exception:
                log.exception("renewing the lease of training job %d failed", self.job_id)
                if self._progress is None:
                    self._progress = progress  # write it with the next renewal
                if time.monotonic() - renewed >= ttl_s:
                    log.error("training job %d: no renewal for the lease's lifetime; giving the job up", self.job_id)
                    self.lost.set()
                    return
                continue
            if not held:
                log.warning("training job %d is no longer this runner's (taken over or deleted)", self.job_id)
                self.lost.set()
                return
            renewed = now


class JobRunner:
    """Claims training jobs from the registry and runs them one at a time, each in its own process."""

    def __init__(self, settings: Settings, registry: PromptRegistry, store: AdapterStore, base_model_dir: Path, *,
                 activate: ActivateVersion | None, versions_changed: Callable[[], Awaitable[None]],
                 claim_jobs: bool | None = None, lease_ttl: timedelta | None = None,
                 share_cores: ShareCores | None = None) -> None:
        """`activate`: loads a finished version into this process's engine and routes to it (a gateway); None
        (a worker): the checked version is marked ready and serving replicas load it when they see the change.
        `claim_jobs` (default: the TRAIN_IN_GATEWAY setting) False: this runner takes no jobs, it only queues
        them; `lease_ttl` (default: JOB_LEASE_SECONDS). `share_cores` (an engine on this machine): told when a
        training starts and ends, so the engine decodes with part of the cores while the job trains on the rest."""
        self.settings = settings
        self.registry = registry
        self.store = store
        self.base_model_dir = base_model_dir
        self._activate = activate
        self._share_cores = share_cores
        self._versions_changed = versions_changed  # a version was added or failed: refresh what depends on it
        self.claim_jobs = settings.train_in_gateway if claim_jobs is None else claim_jobs
        self.lease_ttl = lease_ttl if lease_ttl is not None else timedelta(seconds=settings.job_lease_seconds)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._child: _Child | None = None
        self._running_job: int | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Lock()  # DELETE and the job's own ending may both stop the child

    async def start(self) -> None:
        if self.claim_jobs:
            self._task = asyncio.create_task(self._loop(), name="job-runner")

    async def close(self) -> None:
        """Stop: a job in progress is stopped and handed back (queued again) for another runner."""
        await stop_task(self._task)
        self._task = None
        await self._stop_child()

    async def run_forever(self) -> None:
        """Claim and run jobs until cancelled (a worker's whole life)."""
        await self._loop()

    @property
    def running_job(self) -> int | None:
        """The id of the job this runner is working on (training or publishing), if any."""
        return self._running_job

    async def submit(self, name: str, data: TrainData) -> JobRecord:
        """Queue a job (validated data) and wake the loop; jobs are claimed in the order they were queued."""
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
                lease = await asyncio.to_thread(self.registry.claim_job, self.owner, self.lease_ttl, MAX_ATTEMPTS)
                if lease is not None:
                    await self._run(lease)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job runner iteration failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _run(self, lease: JobLease) -> None:
        job = lease.job
        if lease.taken_over:
            log.warning("training job %d of %s: its runner stopped; taken over (start %d of at most %d)", job.id,
                        job.prompt, job.attempts, MAX_ATTEMPTS)
            await self._versions_changed()  # the stopped runner's version was failed
        held = _HeldLease(self.registry, lease, self.lease_ttl)
        held.start()
        self._running_job = job.id
        finished = False
        try:
            await self._train(job, held)
            finished = True
        finally:
            await held.stop()
            self._running_job = None
            if not finished and not held.lost.is_set():  # stopped (shutdown) or failed unexpectedly: hand it back
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.to_thread(
                        self.registry.release_job, job.id, held.token, "its training runner stopped; queued again"))

    async def _train(self, job: JobRecord, held: _HeldLease) -> None:
        """Train one job in a child process, relay its progress, then publish or fail its version."""
        try:
            data = TrainData.model_validate(job.spec)
        except ValidationError as exc:  # written by another release of the gateway, perhaps
            await asyncio.to_thread(self.registry.finish_job, job.id, held.token, status="failed",
                                    error=f"the queued job's data is not readable: {exc}")
            return
        try:
            record = await asyncio.to_thread(self.registry.get, job.prompt)
        except NotFoundError:
            return  # deleted meanwhile, its jobs with it
        version = await asyncio.to_thread(self.registry.allocate_job_version, job.id, held.token, job.prompt,
                                          self.store)
        if version is None:
            return  # no longer this runner's
        await self._versions_changed()
        spec = JobSpec(
            prompt=job.prompt, kind=record.kind, template=record.template, examples=record.examples,
            data=data, out_dir=self.store.version_dir(job.prompt, version),
            base_model_dir=self.base_model_dir, served_model_name=self.settings.served_model_name,
            lora_rank=self.settings.lora_rank, lora_targets=list(self.settings.lora_targets),
            cache_dir=self.settings.data_dir / "trainer-cache", threads=self.settings.train_threads,
            gate=promotion_gate(record) if data.source == "traffic" else None,
        )
        log.info("training job %d: %s version %d", job.id, job.prompt, version)
        try:
            if self._share_cores is not None:  # the engine keeps part of the cores; the job gets the rest
                kept = await self._share_cores(True)
                spec = spec.model_copy(update={"threads": spec.threads or max(1, (os.cpu_count() or 1) - kept)})
                log.info("training job %d: %d thread(s), the engine keeps %d meanwhile", job.id, spec.threads, kept)
            self._child = await _spawn(spec, f"train-{job.id}")
            try:
                outcome = await self._follow(self._child, held)
            finally:
                await self._stop_child()
                self._child = None
        finally:
            if self._share_cores is not None:
                with contextlib.suppress(Exception):
                    await self._share_cores(False)
        await self._finish(job, held, version, spec.out_dir, outcome)

    async def _follow(self, child: _Child, held: _HeldLease) -> tuple[str, Any]:
        """Hand the child's progress to the lease keeper until the child reports its end or the lease is lost."""
        while True:
            if held.lost.is_set():
                return "lost", None
            message = await asyncio.to_thread(_receive, child, POLL_S)
            if message is None:
                if not child.process.is_alive():
                    return "error", f"the training process exited with code {child.process.exitcode}"
                continue
            kind, body = message
            if kind == "done":
                return kind, TrainResult.model_validate(body)
            if kind == "error":
                return kind, body
            held.report(body)

    async def _finish(self, job: JobRecord, held: _HeldLease, version: int, out_dir: Path,
                      outcome: tuple[str, Any]) -> None:
        """Publish the trained version, or fail it; every write under the job's token. A runner that lost the
        job writes nothing and removes the folder its training wrote (a version number no one else uses)."""
        kind, body = outcome
        if kind == "error":
            log.error("training job %d of %s failed: %s", job.id, job.prompt, body)
            await self._end(job, held, version, status="failed", error=str(body), version_status="failed")
            return
        if kind == "lost":
            await self._drop(job, version, "its lease was lost")
            return
        result: TrainResult = body
        try:
            await asyncio.to_thread(read_adapter_config, result.adapter_dir, self.settings.max_lora_rank)
        except InvalidAdapter as exc:
            await self._end(job, held, version, status="failed", error=f"the trained adapter is unusable: {exc}",
                            version_status="failed")
            return
        if held.lost.is_set() or not await asyncio.to_thread(
                self.registry.stage_job_version, job.id, held.token, str(result.adapter_dir), result.manifest):
            await self._drop(job, version, "its lease was lost before publication")
            return
        await self._versions_changed()
        gate = result.manifest.get("gate")
        if isinstance(gate, dict) and not gate.get("passed", True):  # kept, with its figures, and never served
            log.warning("training job %d of %s: version %d %s", job.id, job.prompt, version, gate.get("reason"))
            await self._end(job, held, version, status="rejected", error=str(gate.get("reason")),
                            progress={"phase": "done"}, version_status="rejected")
            return
        ok = True
        if self._activate is not None:  # loads and warms it here; published (ready) only by the fenced write below
            ok = await self._activate(job.prompt, version, result.adapter_dir, result.manifest)
        if ok:
            await self._end(job, held, version, status="succeeded", progress={"phase": "done"},
                            version_status="ready")
        else:
            await self._end(job, held, version, status="failed", error="the trained adapter did not load",
                            version_status="failed", drop_on_loss=False)

    async def _end(self, job: JobRecord, held: _HeldLease, version: int, *, status: str, error: str | None = None,
                   progress: dict[str, Any] | None = None, version_status: str | None,
                   drop_on_loss: bool = True) -> None:
        ended = not held.lost.is_set() and await asyncio.to_thread(
            self.registry.finish_job, job.id, held.token, status=status, error=error, progress=progress,
            version_status=version_status, version_error=error if version_status in ("failed", "rejected") else None)
        if ended:
            await self._versions_changed()
        elif drop_on_loss:
            await self._drop(job, version, "its lease was lost")
        else:
            log.error("training job %d of %s: its lease was lost after activation", job.id, job.prompt)

    async def _drop(self, job: JobRecord, version: int, why: str) -> None:
        """Remove the version's folder. If the prompt is gone (deleted, perhaps through another replica, after its
        delete had removed the prompt's folders but before the training saved this version), its folder too."""
        log.warning("training job %d of %s: %s; version %d is not published", job.id, job.prompt, why, version)
        try:
            await asyncio.to_thread(self.registry.get, job.prompt)
        except NotFoundError:
            await asyncio.to_thread(self.store.remove_orphan_version, job.prompt, version)
            return
        await asyncio.to_thread(self.store.remove_version, job.prompt, version)
