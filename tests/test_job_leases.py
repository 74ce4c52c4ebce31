"""Fenced training-job leases: a job is claimed once, renewed by its runner, taken over when its lease has run out,
given up after MAX_ATTEMPTS starts, handed back on shutdown; a runner that lost its lease writes nothing, and a
runner whose lease is taken while it trains stops its training process and publishes nothing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from core.adapter_store import AdapterStore
from core.config import Settings
from gateway.jobs import MAX_ATTEMPTS, JobRunner
from gateway.registry.db import TrainJobRow, utcnow
from gateway.registry.store import JobLease, JobRecord, PromptRegistry
from trainer.jobspec import TrainData

TEMPLATE = [
    {"role": "system", "content": "Translate to bash.\nInput: list files\nOutput: ls"},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
ROWS = [{"query": f"show file number {i}", "response": f"cat file{i}.txt"} for i in range(12)]
SPEC = TrainData(rows=ROWS, schedule={"steps_per_stage": [2, 1, 1, 2], "batch_size": 4}, eval_fraction=0)
LONG = timedelta(minutes=10)
RUN_OUT = timedelta(0)  # a lease that has run out the moment it is taken: its runner "died"


@pytest.fixture
def registry(database_url: str) -> Iterator[PromptRegistry]:
    """A registry on SQLite, then on a real PostgreSQL server (tests/pg.py)."""
    registry = PromptRegistry(database_url)
    registry.create("p", "chat", TEMPLATE, [])
    yield registry
    registry.close()


def queue(registry: PromptRegistry, name: str = "p") -> JobRecord:
    return registry.create_job(name, SPEC.model_dump(mode="json"))


def claim(registry: PromptRegistry, owner: str, ttl: timedelta = LONG) -> JobLease:
    lease = registry.claim_job(owner, ttl, MAX_ATTEMPTS)
    assert lease is not None, f"{owner} found no job to claim"
    return lease


def job_of(registry: PromptRegistry, job_id: int) -> JobRecord:
    job = registry.get_job(job_id)
    assert job is not None
    return job


def statuses(registry: PromptRegistry) -> list[tuple[int, str]]:
    return [(v.version, v.status) for v in registry.get("p").versions]


def test_a_queued_job_is_claimed_by_one_runner_and_renewed(registry: PromptRegistry) -> None:
    job = queue(registry)
    lease = claim(registry, "a")
    assert lease.job.id == job.id and lease.job.status == "running" and lease.job.attempts == 1
    assert not lease.taken_over and lease.job.lease_owner == "a"
    assert registry.claim_job("b", LONG, MAX_ATTEMPTS) is None  # held and not run out
    assert registry.renew_job_lease(job.id, lease.token, LONG, {"phase": "train", "stage": 1, "step": 3})
    assert job_of(registry, job.id).progress == {"phase": "train", "stage": 1, "step": 3}
    assert not registry.renew_job_lease(job.id, "not-the-token", LONG, {"phase": "forged"})
    assert job_of(registry, job.id).progress == {"phase": "train", "stage": 1, "step": 3}


def test_concurrent_runners_claim_each_job_once(registry: PromptRegistry) -> None:
    jobs = {queue(registry).id for _ in range(3)}
    start = threading.Barrier(8)
    leases: list[JobLease] = []

    def runner(i: int) -> None:
        start.wait()
        while (lease := registry.claim_job(f"runner-{i}", LONG, MAX_ATTEMPTS)) is not None:
            leases.append(lease)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(lease.job.id for lease in leases) == sorted(jobs)
    assert {job_of(registry, j).lease_owner for j in jobs} == {lease.job.lease_owner for lease in leases}


def test_a_takeover_fences_out_the_runner_that_lost_the_job(registry: PromptRegistry, tmp_path: Path) -> None:
    job = queue(registry)
    first = claim(registry, "dead", RUN_OUT)
    assert registry.allocate_job_version(job.id, first.token, "p") == 1
    second = claim(registry, "alive")
    assert second.taken_over and second.job.attempts == 2 and second.job.version is None
    assert statuses(registry) == [(1, "failed")]  # the dead runner's version, failed in the takeover
    assert "taken over" in (registry.get_version("p", 1).error or "")
    # Whatever the runner that lost the job still tries is refused, and changes nothing.
    assert not registry.renew_job_lease(job.id, first.token, LONG)
    assert registry.allocate_job_version(job.id, first.token, "p") is None
    assert not registry.stage_job_version(job.id, first.token, str(tmp_path), {"forged": True})
    assert not registry.finish_job(job.id, first.token, status="succeeded", version_status="ready")
    assert statuses(registry) == [(1, "failed")] and job_of(registry, job.id).status == "running"
    # The runner holding it publishes exactly one version.
    assert registry.allocate_job_version(job.id, second.token, "p") == 2
    assert registry.stage_job_version(job.id, second.token, str(tmp_path), {"prompt": "p"})
    assert registry.finish_job(job.id, second.token, status="succeeded", progress={"phase": "done"},
                               version_status="ready")
    assert statuses(registry) == [(1, "failed"), (2, "ready")]
    done = job_of(registry, job.id)
    assert done.status == "succeeded" and done.version == 2 and done.lease_owner is None
    assert not registry.renew_job_lease(job.id, second.token, LONG)  # ended: nobody's any more


def test_a_job_whose_runners_keep_dying_is_given_up(registry: PromptRegistry) -> None:
    job = queue(registry)
    for owner in ("first", "second"):
        lease = claim(registry, owner, RUN_OUT)
        assert registry.allocate_job_version(job.id, lease.token, "p") is not None
    assert registry.claim_job("third", LONG, MAX_ATTEMPTS) is None
    given_up = job_of(registry, job.id)
    assert given_up.status == "interrupted" and given_up.attempts == MAX_ATTEMPTS and given_up.finished is not None
    assert "giving up" in (given_up.error or "")
    assert statuses(registry) == [(1, "failed"), (2, "failed")]


def test_a_job_left_running_without_a_lease_is_taken_over(registry: PromptRegistry) -> None:
    """A job marked running by an older release (no lease columns) counts as one whose lease ran out."""
    job = queue(registry)
    with registry.engine.begin() as connection:
        connection.execute(update(TrainJobRow).where(TrainJobRow.id == job.id).values(status="running", attempts=1))
    lease = claim(registry, "new")
    assert lease.job.id == job.id and lease.taken_over and lease.job.attempts == 2


def test_a_released_job_is_queued_again_without_counting_the_attempt(registry: PromptRegistry) -> None:
    job = queue(registry)
    lease = claim(registry, "stopping")
    assert registry.allocate_job_version(job.id, lease.token, "p") == 1
    assert registry.release_job(job.id, lease.token, "its training runner stopped; queued again")
    again = job_of(registry, job.id)
    assert again.status == "queued" and again.attempts == 0 and again.version is None and again.lease_owner is None
    assert statuses(registry) == [(1, "failed")]
    assert not registry.release_job(job.id, lease.token, "twice")
    next_lease = claim(registry, "next")
    assert next_lease.job.attempts == 1 and not next_lease.taken_over


def test_a_taken_over_job_whose_version_was_published_is_only_ended(registry: PromptRegistry, tmp_path: Path) -> None:
    """Its runner published (activation marked the version ready) and died before recording the job's end: the
    job is done, not trained a second time."""
    job = queue(registry)
    lease = claim(registry, "dead", RUN_OUT)
    version = registry.allocate_job_version(job.id, lease.token, "p")
    assert version == 1 and registry.stage_job_version(job.id, lease.token, str(tmp_path), {})
    registry.update_version("p", version, status="ready")
    assert registry.claim_job("alive", LONG, MAX_ATTEMPTS) is None
    done = job_of(registry, job.id)
    assert done.status == "succeeded" and done.version == 1 and statuses(registry) == [(1, "ready")]


def test_deleting_the_prompt_ends_its_runners_lease(registry: PromptRegistry) -> None:
    job = queue(registry)
    lease = claim(registry, "a")
    registry.delete("p")
    assert registry.get_job(job.id) is None
    assert not registry.renew_job_lease(job.id, lease.token, LONG)
    assert registry.allocate_job_version(job.id, lease.token, "p") is None


def test_job_ids_are_never_reused(registry: PromptRegistry) -> None:
    first = queue(registry)
    registry.delete("p")
    registry.create("p", "chat", TEMPLATE, [])
    assert queue(registry).id > first.id


async def test_a_runner_whose_lease_is_taken_stops_training_and_publishes_nothing(
        tiny_model_path: Path, tmp_path: Path) -> None:
    """The lease is taken from under a training runner (as a takeover would, after its renewals stopped reaching
    the database): its next renewal fails, it stops the training process, and neither the version nor the job
    is written by it again."""
    registry = PromptRegistry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.create("p", "chat", TEMPLATE, [])
    store = AdapterStore(tmp_path / "adapters")
    slow = TrainData(rows=ROWS, schedule={"steps_per_stage": [200] * 4, "batch_size": 4}, eval_fraction=0)

    async def not_activated(name: str, version: int, path: Path, manifest: dict[str, Any]) -> bool:
        raise AssertionError("a runner that lost its job activates nothing")

    async def no_change() -> None:
        return None

    settings = Settings(data_dir=tmp_path / "data", adapter_dir=tmp_path / "adapters", train_threads=1)
    runner = JobRunner(settings, registry, store, tiny_model_path, activate=not_activated,
                       versions_changed=no_change, claim_jobs=True, lease_ttl=timedelta(seconds=2))
    await runner.start()
    try:
        job = await runner.submit("p", slow)

        async def until(condition: Any, what: str, timeout: float = 180) -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while not await asyncio.to_thread(condition):
                assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.2)

        def training() -> bool:
            progress = job_of(registry, job.id).progress or {}
            return progress.get("phase") == "train" and runner._child is not None

        await until(training, "the job to train")
        child = runner._child
        assert child is not None and child.process.is_alive()
        with registry.engine.begin() as connection:  # another runner's compare-and-set
            connection.execute(update(TrainJobRow).where(TrainJobRow.id == job.id)
                               .values(lease_token="thief", lease_owner="thief",
                                       lease_expires_at=utcnow() + timedelta(hours=1)))
        await until(lambda: runner.running_job is None, "the runner to give the job up")
        assert not child.process.is_alive()
        stolen = job_of(registry, job.id)
        assert stolen.status == "running" and stolen.lease_owner == "thief"  # untouched by the runner that lost it
        assert statuses(registry) == [(1, "training")]  # the thief's to fail or finish
        assert not store.version_dir("p", 1).exists()
    finally:
        await runner.close()
        registry.close()


async def test_a_dropped_version_of_a_deleted_prompt_leaves_no_folder(registry: PromptRegistry,
                                                                       tmp_path: Path) -> None:
    """A runner drops the version it trained when its job is gone. If the prompt was deleted (through another
    replica, whose delete removed the prompt's folders before this training process saved its version there),
    the prompt's folder goes too; a prompt still registered keeps its folder and its other versions."""
    store = AdapterStore(tmp_path / "adapters")

    async def no_change() -> None:
        return None

    settings = Settings(data_dir=tmp_path / "data", adapter_dir=tmp_path / "adapters")
    runner = JobRunner(settings, registry, store, tmp_path, activate=None, versions_changed=no_change,
                       claim_jobs=False)
    job = queue(registry)
    for version in (1, 2):  # v1: this runner's, saved; v2: another's, kept
        store.version_dir("p", version).mkdir(parents=True)
        (store.version_dir("p", version) / "adapter_config.json").write_text("{}")
    await runner._drop(job, 1, "its lease was lost")
    assert not store.version_dir("p", 1).exists() and store.version_dir("p", 2).exists()

    registry.delete("p")
    store.remove_prompt("p", [])  # the other replica's delete: it knew of no version folder yet
    await runner._drop(job, 2, "its lease was lost")
    assert not (store.root / "p").exists()
