"""Training jobs started from the registry: one runner per database, each job in its own process.

The runner holds a lease row (with a heartbeat), so with several gateway replicas on one
database only one trains at a time; jobs run in the order they were queued. A job runs in a
spawned child process, so the gateway keeps serving while it trains. A job whose runner died
(gateway restart, crash) is marked interrupted and queued again once; its half-written adapter
folder never becomes visible (the trainer renames a finished folder into place).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from core.config import Settings
from gateway.errors import Unprocessable
from gateway.prompts.protocol import TrainSpec
from core.adapter_store import AdapterStore
from gateway.registry.db import utcnow
from gateway.registry.store import JobRecord, PromptRegistry
from core.templates import PromptTemplate

log = logging.getLogger(__name__)
LEASE_TTL = timedelta(seconds=30)
POLL_S = 1.0
MAX_ATTEMPTS = 2  # a job interrupted once is queued again once


@dataclass(frozen=True)
class _Child:
    process: Any  # multiprocessing.Process (spawn context)
    messages: Any  # multiprocessing.Queue


def prepare_train_spec(template: PromptTemplate, spec: TrainSpec) -> dict[str, Any]:
    """Validate a `train` object now (a 422 at submission, not a failed job later); return the job spec."""
    from trainer.data import TrainDataError, load_jsonl, validate_rows
    from trainer.schedule import ScheduleError, schedule_from_overrides

    if (spec.data is None) == (spec.path is None):
        raise Unprocessable("give exactly one of 'data' (rows) or 'path' (a server-side JSONL file)", param="train",
                            code="invalid_train_data")
    try:
        raw = spec.data if spec.data is not None else load_jsonl(Path(spec.path or ""))
        rows = validate_rows(template, raw)
    except TrainDataError as exc:
        raise Unprocessable(str(exc), param="train.data" if spec.data is not None else "train.path",
                            code="invalid_train_data") from exc
    try:
        schedule = schedule_from_overrides(spec.schedule)
    except (ScheduleError, ValueError, TypeError) as exc:
        raise Unprocessable(f"invalid schedule: {exc}", param="train.schedule", code="invalid_schedule") from exc
    if not schedule.trains:
        raise Unprocessable("the schedule trains nothing", param="train.schedule", code="invalid_schedule")
    return {"rows": rows, "schedule": spec.schedule or {}, "eval_fraction": spec.eval_fraction}


def _train_child(payload: dict[str, Any], messages: Any) -> None:
    """Entry point of the training process: run the trainer, report progress and the outcome."""
    try:
        from core.templates import parse_template
        from trainer.evaluate import EvalOptions
        from trainer.schedule import schedule_from_overrides
        from trainer.train import TrainJob, TrainProgress, train_prompt

        if payload["kind"] == "completion":
            template = parse_template(prompt=payload["template"], max_chars=10**9)
        else:
            template = parse_template(messages=payload["template"], max_chars=10**9)
        eval_fraction = float(payload["eval_fraction"])
        job = TrainJob(
            name=payload["name"], template=template, rows=payload["rows"], out_dir=Path(payload["out_dir"]),
            base_model_dir=Path(payload["base_model_dir"]), served_model_name=payload["served_model_name"],
            examples=payload["examples"], schedule=schedule_from_overrides(payload["schedule"]),
            eval_fraction=eval_fraction, evaluation=EvalOptions(enabled=eval_fraction > 0),
            lora_rank=payload["lora_rank"], lora_targets=payload["lora_targets"],
            cache_dir=Path(payload["cache_dir"]), threads=payload["threads"],
        )

        def report(p: TrainProgress) -> None:
            messages.put(("progress", {
                "phase": p.phase, "stage": p.stage_index + 1, "stages": p.stage_count, "stage_name": p.stage_name,
                "step": p.step, "steps": p.total_steps, "global_step": p.global_step,
                "global_steps": p.global_total_steps, "loss": p.loss,
                "eta_s": None if p.eta_s is None else round(p.eta_s, 1),
            }))

        messages.put(("done", train_prompt(job, report)))
    except BaseException as exc:  # the parent must learn why, whatever it was
        messages.put(("error", f"{type(exc).__name__}: {exc}"))


class JobRunner:
    """Runs queued training jobs one at a time while this replica holds the runner lease."""

    def __init__(self, settings: Settings, registry: PromptRegistry, store: AdapterStore, prompts: Any,
                 base_model_dir: Path) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.prompts = prompts  # PromptService: activates a finished version
        self.base_model_dir = base_model_dir
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._child: _Child | None = None
        self._running_job: int | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._stop_child()
        await asyncio.to_thread(self.registry.release_lease, self.owner)

    def submit(self, name: str, spec: dict[str, Any]) -> JobRecord:
        job = self.registry.create_job(name, spec)
        self._wake.set()
        return job

    async def cancel(self, name: str) -> None:
        """Stop the running job of a prompt being deleted (its queued jobs go with the prompt's rows)."""
        running = self._running_job
        if running is None:
            return
        job = await asyncio.to_thread(self.registry.get_job, running)
        if job is None or job.prompt == name:
            self._stop_child()

    def _stop_child(self) -> None:
        child = self._child
        if child is not None and child.process.is_alive():
            child.process.terminate()
            child.process.join(10)
            if child.process.is_alive():
                child.process.kill()

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
        record = await asyncio.to_thread(self.registry.get, job.prompt)
        version = await asyncio.to_thread(self.registry.add_version, job.prompt, "training", "train",
                                          self.store.highest_version(job.prompt))
        await asyncio.to_thread(self.registry.update_job, job.id, status="running", started_at=utcnow(),
                                version=version, attempts=job.attempts + 1, progress={"phase": "starting"})
        self.prompts.refresh_gauge()
        out_dir = self.store.version_dir(job.prompt, version)
        payload = {
            **job.spec, "name": job.prompt, "kind": record.kind, "template": record.template,
            "examples": record.examples, "out_dir": str(out_dir), "base_model_dir": str(self.base_model_dir),
            "served_model_name": self.settings.served_model_name, "lora_rank": self.settings.lora_rank,
            "lora_targets": list(self.settings.lora_targets), "threads": self.settings.train_threads,
            "cache_dir": str(self.settings.data_dir / "trainer-cache"),
        }
        context = multiprocessing.get_context("spawn")
        messages = context.Queue()
        process = context.Process(target=_train_child, args=(payload, messages), name=f"train-{job.id}", daemon=True)
        self._child, self._running_job = _Child(process, messages), job.id
        log.info("training job %d: %s version %d", job.id, job.prompt, version)
        process.start()
        try:
            outcome = await self._follow(job, messages, process)
        finally:
            self._stop_child()
            self._child, self._running_job = None, None
        await self._finish(job, version, out_dir, outcome)

    async def _follow(self, job: JobRecord, messages: Any, process: Any) -> tuple[str, Any]:
        """Relay progress into the job row and keep the lease alive until the child reports."""
        last_write = 0.0
        while True:
            try:
                kind, body = await asyncio.to_thread(messages.get, True, POLL_S)
            except queue.Empty:
                if not process.is_alive():
                    return "error", f"the training process exited with code {process.exitcode}"
                kind, body = "tick", None
            if kind in ("done", "error"):
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
            self.prompts.refresh_gauge()
            return
        ok = await self.prompts.activate_trained(job.prompt, version, out_dir, body)
        await asyncio.to_thread(self.registry.update_job, job.id, status="succeeded" if ok else "failed",
                                error=None if ok else "the trained adapter did not load", finished_at=utcnow(),
                                progress={"phase": "done"})
