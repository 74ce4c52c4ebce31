"""`bench load`: a burst of concurrent streaming requests against a live gateway, its memory watched.

The gateway runs as its own process (`promptintern serve`, on loopback) so that its RSS is its own;
the clients are one asyncio loop here, every request sent at once, each bounded by a timeout. A
warm-up burst of the same size comes first (allocator pools, batch shapes), then the measured one.
Figures are printed, nothing is asserted: errors by status with 429s apart (back-pressure, not a
failure), p50/p99 latency and time to first token of the answered requests, and the gateway's RSS
before, after the warm-up and after the run (the goal: no errors but 429s, under 10% RSS growth
after the warm-up).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.errors import BenchInputError
from benchmarks.latency import percentile
from core.basemodel import base_model_dir
from core.config import Settings
from gateway.local_server import free_port, wait_until_ready
from gateway.vllm_server import VLLMProcess, vllm_python

PROMPT = [{"role": "user", "content": "Say hello to the team."}]
MB = 1024 * 1024


@dataclass
class Burst:
    """What one burst of requests got: answered latencies, and every other outcome by label."""

    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)  # "200", "429", "stream error: <type>", ...

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.outcomes.items()) if k not in ("200", "429")}


@dataclass
class LoadReport:
    engine: str
    requests: int
    max_tokens: int
    burst: Burst
    rss_before: int
    rss_warm: int
    rss_after: int
    rss_peak: int

    @property
    def growth_after_warmup(self) -> float:
        return self.rss_after / self.rss_warm - 1


class GatewayProcess:
    """`promptintern serve` as a child process on a free loopback port, with its own data folder."""

    def __init__(self, settings: Settings, root: Path, engine: str, vllm_url: str | None, max_queued: int | None,
                 start_timeout: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"gateway-{engine}.log"
        env = dict(os.environ)
        env.update({
            "PROMPTINTERN_ENGINE": engine, "PROMPTINTERN_HOST": "127.0.0.1", "PROMPTINTERN_PORT": str(self.port),
            "PROMPTINTERN_DATA_DIR": str(root / f"data-{engine}"), "PROMPTINTERN_ADAPTER_DIR": str(root / "adapters"),
            "PROMPTINTERN_BASE_MODEL": str(base_model_dir(settings)), "PROMPTINTERN_DATABASE_URL": "",
            "PROMPTINTERN_API_KEYS": "", "PROMPTINTERN_ADMIN_KEY": secrets.token_urlsafe(24),
        })
        if vllm_url:
            env["PROMPTINTERN_VLLM_URL"] = vllm_url
        if max_queued:
            env["PROMPTINTERN_MAX_QUEUED_REQUESTS"] = str(max_queued)
        self.env = env
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> GatewayProcess:
        log = self.log_path.open("wb")
        command = [sys.executable, "-c", "from gateway.cli import main; main()", "serve", "--log-level", "warning"]
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        process = self.process

        def failed() -> str | None:
            if process.poll() is None:
                return None
            return (f"the gateway exited with {process.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}")

        try:
            if wait_until_ready(f"{self.url}/ready", self.start_timeout, failed, interval=0.5):
                return self
        except RuntimeError as exc:
            raise BenchInputError(str(exc)) from exc
        self.__exit__()
        raise BenchInputError(f"the gateway was not ready within {self.start_timeout:.0f} s (log: {self.log_path})")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss(self) -> int:
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)


class PeakRSS:
    """The highest RSS of a process, sampled in a thread while the `with` block runs."""

    def __init__(self, gateway: GatewayProcess, interval: float = 0.25) -> None:
        self.gateway = gateway
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.gateway.rss())

    def __enter__(self) -> PeakRSS:
        self.peak = self.gateway.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.gateway.rss())


async def _one(client: httpx.AsyncClient, body: dict[str, Any], burst: Burst) -> None:
    """One streamed request; its outcome (and, when answered, its latency and time to first token) into `burst`."""
    started = time.perf_counter()
    ttft: float | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            burst.outcomes[str(r.status_code)] += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                burst.latencies.append(time.perf_counter() - started)
                burst.ttfts.append(ttft if ttft is not None else burst.latencies[-1])
                burst.outcomes["200"] += 1
                return
            chunk = json.loads(data)
            if "error" in chunk:
                burst.outcomes[f"stream error: {chunk['error'].get('type')}"] += 1
                return
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - started
    burst.outcomes["stream cut before [DONE]"] += 1


async def _burst(url: str, model: str, requests: int, max_tokens: int, timeout: float) -> Burst:
    """`requests` streamed requests sent at once, each given up (a client timeout) after `timeout` seconds."""
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    burst = Burst()
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout)) as client:

        async def bounded() -> None:
            try:
                await asyncio.wait_for(_one(client, body, burst), timeout)
            except TimeoutError:
                burst.outcomes["client timeout"] += 1
            except httpx.HTTPError as exc:
                burst.outcomes[f"client error: {type(exc).__name__}"] += 1
            except ValueError:  # an SSE data line that is not JSON
                burst.outcomes["malformed event"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(bounded() for _ in range(requests)))
        burst.wall_s = time.perf_counter() - started
    return burst


def _measure(gateway: GatewayProcess, engine: str, settings: Settings, requests: int, max_tokens: int,
             timeout: float) -> LoadReport:
    def progress(text: str) -> None:
        print(f"[bench load] {engine}: {text}", flush=True)

    model = settings.served_model_name
    rss_before = gateway.rss()
    progress(f"warm-up burst of {requests} requests")
    warm = asyncio.run(_burst(gateway.url, model, requests, max_tokens, timeout))
    progress(f"warm-up: {dict(warm.outcomes)} in {warm.wall_s:.1f} s; measured burst of {requests} requests")
    rss_warm = gateway.rss()
    with PeakRSS(gateway) as peak:
        burst = asyncio.run(_burst(gateway.url, model, requests, max_tokens, timeout))
    return LoadReport(engine, requests, max_tokens, burst, rss_before, rss_warm, gateway.rss(), peak.peak)


def run(settings: Settings, requests: int = 200, max_tokens: int = 8, timeout: float = 300.0,
        max_queued: int | None = None, with_vllm: bool = False, fast_start: bool = False) -> list[LoadReport]:
    """Print and return the load figures on the embedded engine, then on vLLM when asked."""
    if with_vllm and not vllm_python().exists():
        raise BenchInputError("no .venv-vllm for --vllm: `make vllm-venv` creates it")
    reports = []
    with tempfile.TemporaryDirectory(prefix="promptintern-load-") as tmp:
        root = Path(tmp)
        print(f"[bench load] starting the gateway on the embedded engine ({base_model_dir(settings).name})",
              flush=True)
        with GatewayProcess(settings, root, "embedded", None, max_queued) as gateway:
            reports.append(_measure(gateway, "embedded", settings, requests, max_tokens, timeout))
        if with_vllm:
            vllm = VLLMProcess(settings, base_model_dir(settings), port=free_port(), log_path=root / "vllm.log",
                               fast_start=fast_start)
            with vllm, GatewayProcess(settings, root, "vllm", vllm.url, None) as gateway:
                reports.append(_measure(gateway, "vllm", settings, requests, max_tokens, timeout))
    for report in reports:
        _print(report, timeout)
    return reports


def _print(r: LoadReport, timeout: float) -> None:
    b = r.burst
    print(f"\nLoad on the {r.engine} engine: {r.requests} concurrent streaming chat requests, {r.max_tokens} tokens "
          f"each, loopback, client timeout {timeout:.0f} s")
    print(f"  answered {b.outcomes['200']}/{r.requests} in {b.wall_s:.1f} s; refused 429 (back-pressure): "
          f"{b.outcomes['429']}; other errors: {sum(b.errors.values())} {b.errors or ''}".rstrip())
    if b.latencies:
        print(f"  latency p50 {percentile(b.latencies, 0.5):.2f} s, p99 {percentile(b.latencies, 0.99):.2f} s; "
              f"time to first token p50 {percentile(b.ttfts, 0.5):.2f} s, p99 {percentile(b.ttfts, 0.99):.2f} s")
    print(f"  gateway RSS: {r.rss_before / MB:.0f} MB before, {r.rss_warm / MB:.0f} MB after the warm-up burst, "
          f"{r.rss_after / MB:.0f} MB after the run ({100 * r.growth_after_warmup:+.1f}% after warm-up; "
          f"peak {r.rss_peak / MB:.0f} MB)")
