"""Cancellation and back-pressure over HTTP, on a live gateway with the tiny model.

A client that goes away, streamed or not, must free its engine place at once (not after its
`max_tokens`), and be counted as a 499; a full engine answers 429 in OpenAI's shape with `Retry-After`,
which the official SDK honours by itself. Requests here ask for many tokens (20,000: about 30 s of the
tiny model's decoding on the fastest host seen, minutes on most), so an engine that kept generating for
a departed client would stay busy far past the deadlines below, on any host.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import LiveServer, gateway_settings

# Tokens: only cancellation ends such a request in time. 2,000 was once minutes of decoding, yet a faster host
# decoded them in 2.6 s, inside the 3 s client timeouts below, and the request ended by itself.
LONG = 20_000
IDLE_DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    """One request in the engine at a time (MAX_QUEUED_REQUESTS=1), a context long enough for LONG tokens."""
    settings = gateway_settings(module_tmp, tiny_model_path, max_model_len=LONG + 256, max_queued_requests=1)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture
def idle(server: LiveServer) -> LiveServer:
    """The server once its engine holds no request (each test starts from an idle engine)."""
    assert wait_until(lambda: held(server) == 0, IDLE_DEADLINE_S), "the engine is still busy from an earlier test"
    return server


def held(server: LiveServer) -> int:
    """Requests the engine holds (queued or decoding)."""
    return int(server.app.state.engine.requests_held)


def errors(server: LiveServer, code: int) -> float:
    value = server.app.state.metrics.registry.get_sample_value(
        "promptintern_request_errors_total", {"route": "passthrough", "code": str(code)})
    return float(value or 0.0)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def body(server: LiveServer, max_tokens: int = LONG, **extra: Any) -> dict[str, Any]:
    # Greedy on a fixed prompt: the tiny model does not end this answer early (the tests would see it finish).
    return {"model": server.settings.served_model_name, "messages": [{"role": "user", "content": "Count to ten"}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def test_a_non_streamed_client_that_times_out_frees_the_engine(idle: LiveServer) -> None:
    before = errors(idle, 499)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{idle.url}/v1/chat/completions", json=body(idle), timeout=3.0)
    assert wait_until(lambda: held(idle) == 0, IDLE_DEADLINE_S)
    assert wait_until(lambda: errors(idle, 499) == before + 1, IDLE_DEADLINE_S)
    # The engine's place is free: a short request is answered at once, not after the first one's 2,000 tokens.
    r = httpx.post(f"{idle.url}/v1/chat/completions", json=body(idle, max_tokens=4), timeout=IDLE_DEADLINE_S)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_a_non_streamed_client_that_closes_the_connection_frees_the_engine(idle: LiveServer) -> None:
    before = errors(idle, 499)

    async def leave_while_generating() -> None:
        async with httpx.AsyncClient(base_url=idle.url, timeout=600) as client:
            request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body(idle)))
            while held(idle) == 0:  # the engine has taken it
                assert not request.done(), request.result().text
                await asyncio.sleep(0.05)
            request.cancel()  # the connection is dropped, mid-request
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(asyncio.wait_for(leave_while_generating(), IDLE_DEADLINE_S))
    assert wait_until(lambda: held(idle) == 0, IDLE_DEADLINE_S)
    assert wait_until(lambda: errors(idle, 499) == before + 1, IDLE_DEADLINE_S)


def test_a_streamed_client_that_leaves_mid_stream_frees_the_engine(idle: LiveServer) -> None:
    before = errors(idle, 499)
    with httpx.Client(base_url=idle.url, timeout=IDLE_DEADLINE_S) as client, \
            client.stream("POST", "/v1/chat/completions", json=body(idle, stream=True)) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert '"chat.completion.chunk"' in first
        assert held(idle) == 1
    assert wait_until(lambda: held(idle) == 0, IDLE_DEADLINE_S)
    assert wait_until(lambda: errors(idle, 499) == before + 1, IDLE_DEADLINE_S)


def test_a_streamed_client_that_gives_up_frees_the_engine(idle: LiveServer) -> None:
    """An app that bounds a whole streamed answer with `asyncio.wait_for`, as SDK users do."""
    before = errors(idle, 499)

    async def read_all() -> None:
        client = openai.AsyncOpenAI(base_url=f"{idle.url}/v1", api_key="x", max_retries=0)
        async with client, await client.chat.completions.create(**body(idle, stream=True)) as stream:
            async for _ in stream:
                pass

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(read_all(), 3.0))
    assert wait_until(lambda: held(idle) == 0, IDLE_DEADLINE_S)
    assert wait_until(lambda: errors(idle, 499) == before + 1, IDLE_DEADLINE_S)


HOG_SECONDS = 4.0


def tokens_lasting(server: LiveServer, seconds: float) -> int:
    """How many answer tokens the engine decodes in about `seconds` here (timed on one 200-token answer)."""
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body(server, max_tokens=200), timeout=600)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200, r.text
    per_token = (time.monotonic() - start) / 200
    return max(20, min(LONG, round(seconds / per_token)))


class Hog:
    """A streamed request that holds the engine's one place until `leave()`; reads its stream in a thread."""

    def __init__(self, server: LiveServer, max_tokens: int) -> None:
        self.client = httpx.Client(base_url=server.url, timeout=600)
        self.stream = self.client.stream("POST", "/v1/chat/completions",
                                         json=body(server, max_tokens=max_tokens, stream=True))
        self.response = self.stream.__enter__()
        assert self.response.status_code == 200, self.response.read()
        self.gone = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for _ in self.response.iter_bytes():
                if self.gone.is_set():
                    return
        except httpx.HTTPError:
            return

    def leave(self) -> None:
        self.gone.set()
        self.reader.join(IDLE_DEADLINE_S)
        self.stream.__exit__(None, None, None)
        self.client.close()


def assert_overloaded(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "engine_overloaded"
    assert set(error) == {"message", "type", "param", "code"}


def test_a_full_engine_answers_429_with_retry_after_and_the_sdk_retries(idle: LiveServer) -> None:
    before = errors(idle, 429)
    # The hog lasts about HOG_SECONDS on this host (150 tokens took 0.2 s on one, several seconds on another): long
    # enough to hold the engine through the refusals below, short enough that the Retry-After the SDK waits, about
    # the hog's rest, stays a few seconds.
    hog = Hog(idle, max_tokens=tokens_lasting(idle, HOG_SECONDS))
    try:
        assert held(idle) == 1
        assert_overloaded(httpx.post(f"{idle.url}/v1/chat/completions", json=body(idle, max_tokens=4), timeout=30))
        # A streamed request is refused before its stream starts: a plain 429, not an SSE error event.
        with httpx.stream("POST", f"{idle.url}/v1/chat/completions", json=body(idle, max_tokens=4, stream=True),
                          timeout=30) as r:
            r.read()
            assert_overloaded(r)
        assert errors(idle, 429) == before + 2

        answers: list[Any] = []
        sdk = openai.OpenAI(base_url=f"{idle.url}/v1", api_key="x", max_retries=2, timeout=120)
        caller = threading.Thread(
            target=lambda: answers.append(sdk.chat.completions.create(**body(idle, max_tokens=4))))
        caller.start()
        # Once the SDK's first try has been refused, the hog leaves; the SDK waits Retry-After and tries again.
        assert wait_until(lambda: errors(idle, 429) == before + 3, IDLE_DEADLINE_S)
    finally:
        hog.leave()
    caller.join(120)
    assert answers and answers[0].choices[0].finish_reason == "length"
    assert answers[0].usage.completion_tokens == 4
    assert errors(idle, 429) == before + 3
