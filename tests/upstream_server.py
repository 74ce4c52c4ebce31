"""A second gateway in its own process, on the tiny model: a real upstream provider for the upstream tests.

It takes only its own key, `UPSTREAM_KEY`, and serves the tiny model also as `MODEL`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from gateway.local_server import free_port, wait_until_ready
from tests.conftest import ADMIN_KEY, REPO

UPSTREAM_KEY = "upstream-own-key"
MODEL = "gpt-4o-mini"


class UpstreamProcess:
    """`promptintern serve` in a child process: the upstream provider the front gateway relays to."""

    def __init__(self, tmp: Path, model_path: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PROMPTINTERN_PORT": str(self.port),
               "PROMPTINTERN_DATA_DIR": str(tmp / "data"), "PROMPTINTERN_ADAPTER_DIR": str(tmp / "adapters"),
               "PROMPTINTERN_BASE_MODEL": str(model_path), "PROMPTINTERN_ADMIN_KEY": ADMIN_KEY,
               "PROMPTINTERN_API_KEYS": UPSTREAM_KEY, "PROMPTINTERN_MODEL_ALIASES": MODEL,
               "PROMPTINTERN_TORCH_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from gateway.cli import main; main(['serve', '--log-level', 'warning'])"],
            env=env, cwd=tmp)

    def __enter__(self) -> UpstreamProcess:
        if wait_until_ready(f"{self.url}/ready", 300,
                            lambda: None if self.process.poll() is None else "the upstream gateway exited"):
            return self
        raise RuntimeError("the upstream gateway did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def requests(self) -> float:
        """Requests the upstream answered or refused after planning (its own counters)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        names = ("promptintern_requests_total{", "promptintern_request_errors_total{")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(names))
