"""The proxy's configuration (deploy/haproxy/haproxy.cfg) in front of two live gateway replicas.

Debian's HAProxy runs the repository's file with three changes, each an exact replacement so that a
change to the file that they no longer fit fails here: the replicas are two loopback gateways (tiny
model) instead of the `gateway` service found through Docker's DNS, and the two frontends listen on
free loopback ports. The rest is the file as shipped: health checks on /ready, balancing, retries,
timeouts, the OpenAI-shaped error files, the monitoring frontend and its exporter.

The tests run in order: both replicas serve, then one stops, then none is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from gateway.local_server import free_port
from tests.conftest import ADMIN_KEY, LiveServer, gateway_settings

REPO = Path(__file__).resolve().parents[1]
HAPROXY_DIR = REPO / "deploy" / "haproxy"
HAPROXY = shutil.which("haproxy")
if HAPROXY is None:
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("haproxy missing under CI=true (`make haproxy`)")
    pytest.skip("haproxy missing: apt-get install -y --no-install-recommends haproxy", allow_module_level=True)

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Say hello"}]
PASSTHROUGH = 'promptintern_requests_total{prompt="none",route="passthrough",tenant="none"}'
WAIT = 60.0  # seconds: an upper bound for HAProxy's checks to see a change (every 2 s, 2 in a row)


@dataclass
class Stack:
    replicas: list[LiveServer]
    url: str
    monitoring: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/haproxy/haproxy.cfg no longer has {old!r} once"
    return text.replace(old, new)


def _config(folder: Path, replicas: list[LiveServer], port: int, monitoring_port: int) -> Path:
    text = (HAPROXY_DIR / "haproxy.cfg").read_text()
    text = _replace_once(text, "    bind :8000\n", f"    bind 127.0.0.1:{port}\n")
    text = _replace_once(text, "    bind :8404\n", f"    bind 127.0.0.1:{monitoring_port}\n")
    text = _replace_once(text, " resolvers docker resolve-prefer ipv4 init-addr none\n", "\n")
    servers = "".join(f"    server gateway{i} 127.0.0.1:{r.settings.port}\n" for i, r in enumerate(replicas, 1))
    text = _replace_once(text, "    server-template gateway 8 gateway:8000\n", servers)
    shutil.copytree(HAPROXY_DIR / "errors", folder / "errors")
    config = folder / "haproxy.cfg"
    config.write_text(text)
    return config


def _active_servers(stack: Stack) -> int:
    for line in httpx.get(f"{stack.monitoring}/metrics", timeout=5).text.splitlines():
        if line.startswith('haproxy_backend_active_servers{proxy="gateways"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("HAProxy's exporter has no haproxy_backend_active_servers for the gateways")


def _wait_for_active(stack: Stack, wanted: int) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if stack.process.poll() is not None:
            raise AssertionError(f"HAProxy exited:\n{stack.log_tail()}")
        if _active_servers(stack) == wanted:
            return
        time.sleep(0.25)
    raise AssertionError(f"HAProxy never counted {wanted} ready replicas:\n{stack.log_tail()}")


@pytest.fixture(scope="module")
def stack(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("proxy")
    with (LiveServer(gateway_settings(tmp / "a", tiny_model_path)) as first,
          LiveServer(gateway_settings(tmp / "b", tiny_model_path)) as second):
        replicas = [first, second]
        port, monitoring_port = free_port(), free_port()
        config = _config(tmp, replicas, port, monitoring_port)
        log = tmp / "haproxy.log"
        with log.open("wb") as out:
            process = subprocess.Popen([HAPROXY or "haproxy", "-db", "-f", str(config)], stdout=out,
                                       stderr=subprocess.STDOUT)
        stack = Stack(replicas, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{monitoring_port}", process, log)
        try:
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    _wait_for_active(stack, 2)
                    break
                except httpx.HTTPError:  # the monitoring port is not open yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.25)
            yield stack
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _passthrough(replica: LiveServer) -> float:
    for line in httpx.get(f"{replica.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(PASSTHROUGH):
            return float(line.split()[-1])
    return 0.0


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_proxy_is_healthy_while_replicas_are_ready(stack: Stack) -> None:
    assert httpx.get(f"{stack.monitoring}/healthz", timeout=5).status_code == 200
    # The health checks are GET /ready: a replica's own answer says ready.
    for replica in stack.replicas:
        assert httpx.get(f"{replica.url}/ready", timeout=5).json()["status"] == "ready"


def test_requests_are_spread_over_the_replicas(stack: Stack) -> None:
    before = [_passthrough(r) for r in stack.replicas]
    client = _client(stack)
    for _ in range(6):
        answer = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=4, temperature=0)  # type: ignore[arg-type]
        assert answer.choices[0].message.content is not None
    served = [_passthrough(r) - b for r, b in zip(stack.replicas, before, strict=True)]
    assert sum(served) == 6 and all(n >= 1 for n in served), served


def test_streams_pass_through_whole(stack: Stack) -> None:
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers  # passed on as it comes, not collected first
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])
    # The same greedy answer as one replica gives directly.
    direct = httpx.post(f"{stack.replicas[0].url}/v1/chat/completions", json={**body, "stream": False}, timeout=120)
    assert text == direct.json()["choices"][0]["message"]["content"]


def test_admin_routes_pass_with_their_key(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = httpx.get(f"{stack.url}/v1/prompts", headers=headers, timeout=30)
    assert response.status_code == 200 and "data" in response.json()
    assert httpx.get(f"{stack.url}/v1/prompts", timeout=30).status_code == 401


def test_a_replica_that_stops_is_left_out_without_errors(stack: Stack) -> None:
    stopping = stack.replicas[1]
    stopping.__exit__(None, None, None)
    # Before the checks notice, a request sent to the stopped replica is refused a connection and
    # HAProxy sends it to the other one: no client sees an error.
    client = _client(stack)
    for _ in range(4):
        answer = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2, temperature=0)  # type: ignore[arg-type]
        assert answer.choices
    _wait_for_active(stack, 1)
    assert httpx.get(f"{stack.monitoring}/healthz", timeout=5).status_code == 200


def test_no_replica_left_is_an_openai_shaped_503(stack: Stack) -> None:
    stack.replicas[0].__exit__(None, None, None)
    _wait_for_active(stack, 0)
    assert httpx.get(f"{stack.monitoring}/healthz", timeout=5).status_code == 503
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 2}
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["type"] == "service_unavailable"
    assert response.json()["error"]["code"] == "no_gateway_ready"
    # The openai SDK reads it as it reads the gateway's own errors.
    with pytest.raises(openai.APIStatusError) as caught:
        _client(stack).chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.status_code == 503 and "No gateway replica is ready" in caught.value.message
