"""The gateway's added latency: the same generation through the gateway (HTTP) and on the engine directly.

Both sides run in one process on the embedded engine with SmolLM2, interleaved request by
request so drift hits both alike; one generated token keeps the model's share small, so the
difference of medians is the gateway's cost: HTTP, parsing, detection, token counting, shaping.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from benchmarks.latency import percentile
from core.basemodel import base_model_dir
from core.config import Settings
from core.templates import bare_query_messages, parse_template
from gateway.engines.base import EngineRequest, SamplingParams
from gateway.local_server import LocalGateway, free_port
from trainer.lora import random_lora

INSTRUCTIONS = "You translate requests into one bash command. Answer with the command only."
SHOTS = [("list files in the current directory", "ls"), ("show the current working directory", "pwd"),
         ("count lines in file.txt", "wc -l file.txt"), ("show disk usage of /var", "du -sh /var")]
TEMPLATE = [
    {"role": "system", "content": INSTRUCTIONS + "\n" + "\n".join(f"Input: {q}\nOutput: {a}" for q, a in SHOTS)},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
QUERY = "find all python files under src"


def run(settings: Settings, requests: int = 40) -> dict[str, Any]:
    """Print and return median/p95 latency (ms) for each condition and the gateway's added latency."""
    model_dir = base_model_dir(settings)
    with tempfile.TemporaryDirectory(prefix="promptintern-bench-") as tmp:
        root = Path(tmp)
        print(f"[bench gateway] preparing: random LoRA adapter, gateway on the embedded engine ({model_dir.name})",
              flush=True)
        adapter = random_lora(model_dir, root / "adapter", seed=0, scale=0.3)
        bench_settings = settings.model_copy(update={
            "data_dir": root / "data", "adapter_dir": root / "adapters", "base_model": model_dir,
            "admin_key": SecretStr(secrets.token_urlsafe(24)), "port": free_port(), "host": "127.0.0.1",
            "api_keys": [], "import_dir": root})
        with LocalGateway(bench_settings) as gateway:
            with gateway.admin() as admin:
                r = admin.post("/v1/prompts", json={"name": "bench", "messages": TEMPLATE,
                                                    "adapter_path": str(adapter)})
                r.raise_for_status()
            rows = _measure(gateway, requests)
    _print(rows, requests)
    return rows


def _measure(gateway: LocalGateway, requests: int) -> dict[str, Any]:
    engine = gateway.app.state.engine
    planner = gateway.app.state.planner
    template = parse_template(messages=TEMPLATE)
    full = template.render({"query": QUERY})
    bare = bare_query_messages(template, {"query": QUERY})
    params = SamplingParams(max_tokens=1, temperature=0.0)
    body = {"model": gateway.settings.served_model_name, "messages": full, "max_tokens": 1, "temperature": 0}
    passthrough_messages = [{"role": "user", "content": QUERY}]
    pass_body = {**body, "messages": passthrough_messages}
    times: dict[str, list[float]] = {k: [] for k in ("engine_bare", "gateway_adapter", "engine_plain",
                                                      "gateway_passthrough")}

    async def direct(request: EngineRequest) -> float:
        started = time.perf_counter()
        async for _ in engine.generate(request):
            pass
        return time.perf_counter() - started

    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        def through(payload: dict[str, Any], route: str) -> float:
            started = time.perf_counter()
            response = client.post("/v1/chat/completions", json=payload)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            assert response.headers["x-promptintern-route"] == route, response.headers
            return elapsed

        for i in range(requests + 3):  # 3 warm-up rounds, not counted
            adapter_request = EngineRequest(kind="chat", messages=bare, adapter="bench@v1", params=params)
            plain_request = EngineRequest(kind="chat", messages=passthrough_messages, params=params)
            sample = {
                "engine_bare": asyncio.run(direct(adapter_request)),
                "gateway_adapter": through(body, "adapter"),
                "engine_plain": asyncio.run(direct(plain_request)),
                "gateway_passthrough": through(pass_body, "passthrough"),
            }
            if i >= 3:
                for key, value in sample.items():
                    times[key].append(value)
            if (i + 1) % 10 == 0:
                print(f"[bench gateway] {i + 1 - 3}/{requests} rounds", flush=True)

    from gateway.openai_api.protocol import ChatCompletionRequest

    parsed = ChatCompletionRequest.model_validate(body)
    plan_times = []
    for _ in range(2000):
        started = time.perf_counter()
        planner.plan_chat(parsed)
        plan_times.append(time.perf_counter() - started)
    return {"times": times, "plan": plan_times}


def _print(rows: dict[str, Any], requests: int) -> None:
    times = rows["times"]

    def ms(values: list[float]) -> tuple[float, float]:
        return statistics.median(values) * 1000, percentile(values, 0.95) * 1000

    print(f"\nGateway added latency, embedded engine, 1 generated token, {requests} interleaved rounds")
    print(f"{'condition':<44}{'median ms':>12}{'p95 ms':>10}")
    labels = {
        "engine_bare": "engine direct: bare query on the adapter",
        "gateway_adapter": "gateway (HTTP): full prompt -> adapter route",
        "engine_plain": "engine direct: plain request on the base",
        "gateway_passthrough": "gateway (HTTP): same request, passthrough",
    }
    for key, label in labels.items():
        med, p95 = ms(times[key])
        print(f"{label:<44}{med:>12.2f}{p95:>10.2f}")
    added_adapter = (statistics.median(times["gateway_adapter"]) - statistics.median(times["engine_bare"])) * 1000
    added_pass = (statistics.median(times["gateway_passthrough"]) - statistics.median(times["engine_plain"])) * 1000
    plan_us = statistics.median(rows["plan"]) * 1e6
    print(f"\nadded latency (median difference): adapter route {added_adapter:.2f} ms, "
          f"passthrough {added_pass:.2f} ms")
    print(f"planning alone (detection + token counting + bare query), median: {plan_us:.0f} µs")
