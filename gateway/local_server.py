"""A gateway on a loopback port inside this process: for benchmarks, tests and notebooks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Self

import httpx

from core.config import Settings

# uvicorn's C-accelerated HTTP parser and event loop (dependencies of the package): each request costs the server
# a fraction of h11's pure-Python parsing and asyncio's loop (`promptintern bench gateway`, README "Gateway
# overhead"). `promptintern serve`, this server and the benchmark's servers all run on them.
UVICORN_HTTP: Final = "httptools"
UVICORN_LOOP: Final = "uvloop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(url: str, timeout: float, failed: Callable[[], str | None], interval: float = 0.2) -> bool:
    """Poll `url` (a `/ready` endpoint) until it answers 200 (True) or `timeout` seconds pass (False); `failed`
    returns why the server can no longer come up (its process or thread ended), raised as a RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        why = failed()
        if why is not None:
            raise RuntimeError(why)
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    return False


class LocalGateway:
    """A real uvicorn server running `create_app(settings)` in a thread; a context manager."""

    def __init__(self, settings: Settings, engine: Any = None, start_timeout: float = 300) -> None:
        import uvicorn

        from gateway.app import create_app

        self.settings = settings
        self.app = create_app(settings, engine=engine)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.start_timeout = start_timeout
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                    log_level="warning", http=UVICORN_HTTP,
                                                    loop=UVICORN_LOOP))
        self.thread = threading.Thread(target=self.server.run, name="local-gateway", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        if wait_until_ready(f"{self.url}/ready", self.start_timeout, lambda: None if self.thread.is_alive() else
                            "the gateway failed to start (see the log above)"):
            return self
        raise RuntimeError(f"the gateway did not become ready within {self.start_timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def admin(self) -> httpx.Client:
        key = self.settings.admin_key.get_secret_value() if self.settings.admin_key else ""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
