"""A gateway replica killed (`kill -9`) in the middle of a training job: its training process goes with it, a
`promptintern worker` takes the job over once the job's lease has run out, and exactly one version is published.
First, the guard alone: a spawned child ends with its parent, with prctl or with the watching thread only.

Both run as real processes (the `promptintern` command) on one SQLite registry and one adapter store, with a
3-second lease (JOB_LEASE_SECONDS) so the takeover comes within seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import pytest

from core.config import Settings
from gateway.local_server import free_port
from gateway.registry.store import JobRecord, PromptRegistry
from tests.conftest import ADMIN_KEY
from tests.test_training_jobs import ROWS, TEMPLATE, wait_until

SCHEDULE = {"steps_per_stage": [20, 20, 20, 20], "batch_size": 4, "retrieval": "bm25", "warmup_steps": 0}
LEASE_SECONDS = 3


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from gateway.cli import main; main()", *args]


def environment(tmp: Path, model: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PROMPTINTERN_DATA_DIR": str(tmp / "data"), "PROMPTINTERN_ADAPTER_DIR": str(tmp / "adapters"),
        "PROMPTINTERN_BASE_MODEL": str(model), "PROMPTINTERN_ADMIN_KEY": ADMIN_KEY, "PROMPTINTERN_PORT": str(port),
        "PROMPTINTERN_JOB_LEASE_SECONDS": str(LEASE_SECONDS), "PROMPTINTERN_TRAIN_THREADS": "1",
        "PROMPTINTERN_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }


def gone(process: psutil.Process) -> bool:
    """Ended (a zombie waiting for a parent that reaps it has ended too)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def training_processes(pid: int) -> list[psutil.Process]:
    """The spawned training processes below `pid` (multiprocessing's resource tracker is not one)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
    return found


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str], log: IO[str]) -> Iterator[subprocess.Popen[str]]:
    """A `promptintern` process; killed, with whatever it started, if the test leaves it running."""
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
            process.kill()
        process.wait(30)


@pytest.mark.parametrize("guard", ["prctl", "watcher"])
def test_a_training_process_ends_with_the_process_that_started_it(guard: str) -> None:
    """`kill -9` of the parent ends the child: through PR_SET_PDEATHSIG, and through the thread that watches the
    parent alone (where prctl is missing)."""
    repo = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, str(repo / "tests" / "orphan_child.py"), guard], cwd=repo,
                              env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        guarded, kernel_signal = parent.stdout.readline().split()
        assert guarded == "guarded"
        # With prctl (Linux), the kernel sends SIGKILL; without, only the child's own thread can end it.
        expected = signal.SIGKILL if guard == "prctl" and sys.platform.startswith("linux") else 0
        assert int(kernel_signal) == expected
        assert child.ppid() == parent.pid and not gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        wait_until(lambda: gone(child), "the child to end with its parent", timeout=30)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)


def test_a_killed_replica_leaves_no_trainer_and_a_worker_takes_the_job_over(
        tiny_model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    env = environment(tmp_path, tiny_model_path, port)
    url = f"http://127.0.0.1:{port}"
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    gateway_log = (tmp_path / "gateway.log").open("w")
    worker_log = (tmp_path / "worker.log").open("w")

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob("*.log")))

    with started(command("serve", "--log-level", "warning"), env, gateway_log) as gateway:

        def ready() -> bool:
            assert gateway.poll() is None, f"the gateway exited\n{logs()}"
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            return False

        wait_until(ready, "the gateway to start", timeout=240)
        r = admin.post("/v1/prompts", json={"name": "bash", "messages": TEMPLATE,
                                             "train": {"data": ROWS, "schedule": SCHEDULE, "eval_fraction": 0}})
        assert r.status_code == 201, r.text
        job_id = r.json()["job"]["id"]

        def progress() -> dict[str, Any] | None:
            job = admin.get("/v1/prompts/bash").json()["job"]
            shown: dict[str, Any] = job.get("progress") or {}
            return job if job["status"] == "running" and shown.get("phase") == "train" else None

        running = wait_until(progress, f"the job's training progress\n{logs()}", timeout=300)
        # Progress shows while the job runs: stage, step, loss and the time left.
        shown = running["progress"]
        assert shown["stage"] >= 1 and shown["stages"] == 4 and 1 <= shown["step"] <= shown["steps"] == 20
        assert shown["loss"] > 0 and shown["eta_s"] is not None and running["attempts"] == 1
        trainers = training_processes(gateway.pid)
        assert trainers, "no training process was found under the gateway"

        killed = time.monotonic()
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(30)
        wait_until(lambda: all(gone(p) for p in trainers), "the training process to end with its gateway",
                   timeout=30)
        trainer_ended = time.monotonic() - killed

    registry = PromptRegistry(Settings(data_dir=tmp_path / "data").resolved_database_url)
    try:
        stranded = registry.get_job(job_id)
        assert stranded is not None and stranded.status == "running"  # left behind, its lease running out
        with started(command("worker", "--log-level", "info"), env, worker_log) as worker:

            def ended() -> JobRecord | None:
                assert worker.poll() is None, f"the worker exited\n{logs()}"
                job = registry.get_job(job_id)
                return job if job is not None and job.status not in ("queued", "running") else None

            job = wait_until(ended, "the worker to finish the job", timeout=400)
            print(f"\nkill -9 mid-training (step {shown['global_step']} of {shown['global_steps']}): trainer gone "
                  f"within {trainer_ended:.2f} s; job taken over and finished {time.monotonic() - killed:.1f} s after "
                  f"the kill (lease {LEASE_SECONDS} s)")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
        assert job.status == "succeeded" and job.attempts == 2, (job, logs())
        versions = registry.get("bash").versions
        published = [v for v in versions if v.status == "ready"]
        assert len(published) == 1 and published[0].version == job.version, versions
        assert [v.status for v in versions if v.version != job.version] == ["failed"]  # the killed replica's
        adapter = Path(published[0].path or "")
        assert adapter == tmp_path / "adapters" / "bash" / f"v{job.version}"
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "manifest.json").is_file()
        assert not [p for p in (tmp_path / "adapters" / "bash").iterdir() if p.name.startswith(".")]
        assert "taken over" in logs()
    finally:
        registry.close()
        admin.close()


@pytest.fixture(autouse=True)
def _no_processes_left_behind() -> Iterator[None]:
    """The test's own process gains no lasting children: every `promptintern` process and trainer is gone."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and not gone(p)]
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"
