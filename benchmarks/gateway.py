"""The gateway's added latency: the same request through the gateway and through a minimal server, both over HTTP.

Two uvicorn servers run on one event loop in one thread, in front of one engine instance:

- the **gateway** (`create_app`, every middleware, route and service of production), and
- a **direct** server: the least an OpenAI-compatible server must do in front of an engine (a raw ASGI app that
  reads the JSON body, calls `engine.generate`, and writes OpenAI's JSON or SSE with `json.dumps`). It stands for
  "calling the engine directly": vLLM's own server does this much and more (FastAPI, pydantic), so the difference
  is, if anything, an over-estimate of what the gateway adds.

The gateway is sent the full prompt (adapter route: detection, token counting, the bare query) or a plain request
(passthrough); the direct server is sent what the gateway hands the engine (the bare query on the adapter, the same
plain request). One HTTP client (keep-alive) times both, interleaved request by request and in alternating order,
so drift and noise hit both alike; the figure is the per-round difference (gateway minus direct), its median and
p99, non-streamed and streamed. With `--engine instant` (the default) the engine answers at once
(`benchmarks.instant_engine`), so no model time hides the gateway's; `--engine embedded` runs the real model.

`profile=True` then sends the gateway alone more rounds under cProfile (on the server's thread only) and prints
where a request's time goes, step by step.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import secrets
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from benchmarks.latency import percentile
from core.basemodel import base_model_dir
from core.config import Settings
from core.templates import bare_query_messages, parse_template
from gateway.engines.base import Engine, EngineRequest, Finished, SamplingParams, TextDelta, Usage
from gateway.local_server import UVICORN_HTTP, UVICORN_LOOP, free_port, wait_until_ready
from trainer.lora import random_lora

INSTRUCTIONS = "You translate requests into one bash command. Answer with the command only."
SHOTS = [("list files in the current directory", "ls"), ("show the current working directory", "pwd"),
         ("count lines in file.txt", "wc -l file.txt"), ("show disk usage of /var", "du -sh /var")]
TEMPLATE = [
    {"role": "system", "content": INSTRUCTIONS + "\n" + "\n".join(f"Input: {q}\nOutput: {a}" for q, a in SHOTS)},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
# Each round sends the next query, so nothing on the gateway's path sees the same request twice in a row.
QUERIES = ("find all python files under src", "show the five largest files in /var/log", "count the lines of main.c",
           "list running processes sorted by memory", "print the current date in ISO format",
           "compress the folder build into build.tar.gz", "show which process listens on port 8080",
           "delete empty directories under tmp", "print the last 20 lines of app.log",
           "find files changed in the last day")
ADAPTER_MODEL = "bench@v1"
WARMUP_ROUNDS = 20
CONDITIONS = (("adapter", False), ("passthrough", False), ("adapter", True), ("passthrough", True))
EngineKind = Literal["instant", "embedded"]


def condition_name(route: str, stream: bool) -> str:
    return f"{route}, {'streamed' if stream else 'whole'}"


# -- the direct server -------------------------------------------------------------------------------


def direct_app(engine: Engine, base_model: str) -> Callable[[Scope, Receive, Send], Any]:
    """A minimal OpenAI chat server on `engine`: JSON in, `generate`, OpenAI's JSON or SSE out (no checks)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        payload = json.loads(b"".join(chunks))
        model = payload["model"]
        params = SamplingParams(max_tokens=payload.get("max_tokens"), temperature=payload.get("temperature", 1.0))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        request = EngineRequest(kind="chat", messages=payload["messages"], params=params, request_id=rid,
                                adapter=None if model == base_model else model)
        head = {"id": rid, "created": created, "model": model}
        if payload.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            opened = False
            async for event in engine.generate(request):
                if isinstance(event, Usage):
                    continue
                delta: dict[str, Any] = {}
                if not opened:
                    delta, opened = {"role": "assistant", "content": ""}, True
                if isinstance(event, TextDelta):
                    delta["content"] = event.text
                finish = event.reason if isinstance(event, Finished) else None
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return
        texts: list[str] = []
        finish, usage = "stop", Usage(0, 0)
        async for event in engine.generate(request):
            if isinstance(event, TextDelta):
                texts.append(event.text)
            elif isinstance(event, Finished):
                finish = event.reason
            elif isinstance(event, Usage):
                usage = event
        body = json.dumps({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(texts)}, "logprobs": None,
             "finish_reason": finish}], "usage": {
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class TwoServers:
    """The gateway and the direct server on one event loop in one thread (a context manager)."""

    def __init__(self, gateway_app: Any, gateway_port: int, direct: Any, direct_port: int) -> None:
        import uvicorn

        def server(app: Any, port: int, lifespan: Literal["on", "off"]) -> uvicorn.Server:
            return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                 lifespan=lifespan, http=UVICORN_HTTP,
                                                 loop=UVICORN_LOOP))

        self.gateway = server(gateway_app, gateway_port, "on")
        self.direct = server(direct, direct_port, "off")
        self.gateway_url, self.direct_url = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{direct_port}"
        # The event loop `promptintern serve` runs on (UVICORN_LOOP), for both servers alike.
        self.loop: asyncio.AbstractEventLoop
        if UVICORN_LOOP == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="bench-servers", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.gather(self.gateway.serve(), self.direct.serve()))

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the servers' thread (cProfile profiles the thread that enables it; `time.thread_time` reads
        that thread's CPU time), wait for it and return its result."""
        done = threading.Event()
        result: list[Any] = []

        def call() -> None:
            try:
                result.append(fn())
            finally:
                done.set()

        self.loop.call_soon_threadsafe(call)
        done.wait(10)
        return result[0] if result else None

    def __enter__(self) -> TwoServers:
        self.thread.start()

        def failed() -> str | None:
            return None if self.thread.is_alive() else "the servers failed to start (see the log above)"

        if wait_until_ready(f"{self.gateway_url}/ready", 300, failed):  # both serve from one loop, started together
            while not self.direct.started and failed() is None:
                time.sleep(0.05)
            if self.direct.started:
                return self
        raise RuntimeError("the gateway did not become ready within 300 s")

    def __exit__(self, *exc: object) -> None:
        self.gateway.should_exit = self.direct.should_exit = True
        self.thread.join(timeout=60)


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Requests:
    """The four request bodies: the gateway's and the direct server's, per route."""

    gateway: dict[str, dict[str, Any]]
    direct: dict[str, dict[str, Any]]


def request_bodies(base_model: str, query: str, max_tokens: int) -> Requests:
    template = parse_template(messages=TEMPLATE)
    full = template.render({"query": query})
    bare = bare_query_messages(template, {"query": query})
    common = {"model": base_model, "temperature": 0, "max_tokens": max_tokens}
    plain = [{"role": "user", "content": query}]
    return Requests(gateway={"adapter": {**common, "messages": full}, "passthrough": {**common, "messages": plain}},
                    direct={"adapter": {**common, "model": ADAPTER_MODEL, "messages": bare},
                            "passthrough": {**common, "messages": plain}})


def build_engine(kind: EngineKind, settings: Settings, model_dir: Path) -> Engine:
    if kind == "instant":
        from transformers import AutoTokenizer

        from benchmarks.instant_engine import InstantEngine

        return InstantEngine(AutoTokenizer.from_pretrained(model_dir), max_lora_rank=settings.max_lora_rank)
    from gateway.app import build_engine as build_gateway_engine

    return build_gateway_engine(settings)


def run(settings: Settings, rounds: int = 2000, engine: EngineKind = "instant", max_tokens: int | None = None,
        profile: bool = False, profile_rounds: int = 500, profile_out: Path | None = None) -> dict[str, Any]:
    """Print and return the per-round added latency (seconds) of each condition; with `profile`, its breakdown."""
    model_dir = base_model_dir(settings)
    if max_tokens is None:
        max_tokens = 16 if engine == "instant" else 1  # the real model: one token keeps its share small
    with tempfile.TemporaryDirectory(prefix="promptintern-bench-") as tmp:
        root = Path(tmp)
        print(f"[bench gateway] preparing: random LoRA adapter, gateway and direct server on the {engine} engine "
              f"({model_dir.name})", flush=True)
        adapter = random_lora(model_dir, root / "adapter", seed=0, scale=0.3)
        bench_settings = settings.model_copy(update={
            "data_dir": root / "data", "adapter_dir": root / "adapters", "base_model": model_dir,
            "admin_key": SecretStr(secrets.token_urlsafe(24)), "port": free_port(), "host": "127.0.0.1",
            "api_keys": [], "import_dir": root, "engine": "embedded" if engine == "embedded" else settings.engine})
        the_engine = build_engine(engine, bench_settings, model_dir)
        from gateway.app import create_app

        app = create_app(bench_settings, engine=the_engine)
        base = bench_settings.served_model_name
        with TwoServers(app, bench_settings.port, direct_app(the_engine, base), free_port()) as servers:
            admin_key = bench_settings.admin_key.get_secret_value() if bench_settings.admin_key else ""
            r = httpx.post(f"{servers.gateway_url}/v1/prompts", timeout=600,
                           headers={"Authorization": f"Bearer {admin_key}"},
                           json={"name": "bench", "messages": TEMPLATE, "adapter_path": str(adapter)})
            r.raise_for_status()
            bodies = [request_bodies(base, query, max_tokens) for query in QUERIES]
            rows = _measure(servers, bodies, rounds)
            rows["cpu_us"] = _cpu(servers, bodies, max(1, rounds // 4))
            if profile:
                rows["profile"] = _profile(servers, bodies, profile_rounds, profile_out)
    _print(rows, rounds, engine, max_tokens)
    return rows


def _timed(client: httpx.Client, body: dict[str, Any], stream: bool) -> tuple[float, httpx.Response, bytes]:
    payload = {**body, "stream": True} if stream else body
    started = time.perf_counter()
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            content = response.read()
    else:
        response = client.post("/v1/chat/completions", json=payload)
        content = response.content
    return time.perf_counter() - started, response, content


def _answer(content: bytes, stream: bool) -> str:
    if not stream:
        return str(json.loads(content)["choices"][0]["message"]["content"])
    text = []
    for line in content.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
    return "".join(text)


def _measure(servers: TwoServers, bodies: list[Requests], rounds: int) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {
        condition_name(route, stream): {"gateway": [], "direct": []} for route, stream in CONDITIONS}
    with httpx.Client(base_url=servers.gateway_url, timeout=120) as through, \
            httpx.Client(base_url=servers.direct_url, timeout=120) as direct:
        for i in range(rounds + WARMUP_ROUNDS):
            this = bodies[i % len(bodies)]
            for route, stream in CONDITIONS:
                sides = [("gateway", through, this.gateway[route]), ("direct", direct, this.direct[route])]
                if i % 2:
                    sides.reverse()  # alternate which side goes first
                sample: dict[str, float] = {}
                answers = {}
                for side, client, body in sides:
                    elapsed, response, content = _timed(client, body, stream)
                    if response.status_code != 200:
                        raise RuntimeError(f"{side} answered {response.status_code}: {content[:300]!r}")
                    if side == "gateway" and response.headers["x-promptintern-route"] != route:
                        raise RuntimeError(f"the gateway took route {response.headers['x-promptintern-route']}")
                    sample[side] = elapsed
                    answers[side] = _answer(content, stream)
                if answers["gateway"] != answers["direct"]:
                    raise RuntimeError(f"the two sides answered differently: {answers}")
                if i >= WARMUP_ROUNDS:
                    for side, elapsed in sample.items():
                        times[condition_name(route, stream)][side].append(elapsed)
            done = i + 1 - WARMUP_ROUNDS
            if done > 0 and (done % max(1, rounds // 10) == 0 or done == rounds):
                print(f"[bench gateway] {done}/{rounds} rounds", flush=True)
    return {"times": times}


def _cpu(servers: TwoServers, bodies: list[Requests], requests: int) -> dict[str, dict[str, float]]:
    """Per condition and side, the servers' thread's CPU time per request (µs), each side alone for `requests`
    requests: unlike wall time, hardly moved by other processes on the machine."""
    out: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=servers.gateway_url, timeout=120) as through, \
            httpx.Client(base_url=servers.direct_url, timeout=120) as direct:
        for route, stream in CONDITIONS:
            cpu = {}
            for side, client in (("gateway", through), ("direct", direct)):
                start = servers.on_loop(time.thread_time)
                for i in range(requests):
                    this = bodies[i % len(bodies)]
                    _timed(client, (this.gateway if side == "gateway" else this.direct)[route], stream)
                cpu[side] = (servers.on_loop(time.thread_time) - start) / requests * 1e6
            out[condition_name(route, stream)] = {**cpu, "added": cpu["gateway"] - cpu["direct"]}
    print(f"[bench gateway] server CPU time measured over {requests} requests per condition and side", flush=True)
    return out


# -- the profile -------------------------------------------------------------------------------------------

# Each step: the functions whose cumulative time is the step's (file suffix, function name). A function listed
# under two steps (a step that contains another) is counted in both: the table is a breakdown, not a sum.
STEPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("HTTP server (uvicorn: parse request, write response)", (
        ("uvicorn/protocols/http/h11_impl.py", "data_received"), ("uvicorn/protocols/http/h11_impl.py", "send"),
        ("uvicorn/protocols/http/httptools_impl.py", "data_received"),
        ("uvicorn/protocols/http/httptools_impl.py", "send"))),
    ("ASGI app, all of it (middleware, routing, handler)", (("uvicorn/protocols/http/h11_impl.py", "run_asgi"),
                                                            ("uvicorn/protocols/http/httptools_impl.py", "run_asgi"))),
    ("auth (API key dependency)", (("gateway/auth.py", "require_api_key"),
                                   ("fastapi/security/http.py", "__call__"))),
    ("body: read + json.loads", (("starlette/requests.py", "body"), ("json/__init__.py", "loads"))),
    ("body: pydantic validation", (("fastapi/dependencies/utils.py", "request_body_to_args"),
                                   ("pydantic/main.py", "model_validate_json"))),
    ("FastAPI dependency resolution", (("fastapi/dependencies/utils.py", "solve_dependencies"),)),
    ("planning, all (detection, tokens, bare query)", (("gateway/openai_api/planning.py", "plan_chat"),)),
    ("  detection (matcher)", (("gateway/matcher.py", "match_chat"),)),
    ("  token counting", (("gateway/tokens.py", "original_tokens"), ("gateway/tokens.py", "count_chat"))),
    ("  bare query rendering", (("core/templates.py", "bare_query_messages"),)),
    ("engine stand-in (generate)", (("benchmarks/instant_engine.py", "generate"),)),
    ("metrics (record)", (("gateway/openai_api/serving.py", "record"),)),
    ("shaping (events -> response models)", (("gateway/openai_api/shaping.py", "whole_response"),
                                             ("gateway/openai_api/shaping.py", "chunks"),
                                             ("gateway/openai_api/shaping.py", "usage_chunk"))),
    ("JSON encoding (model_dump_json)", (("pydantic/main.py", "model_dump_json"),)),
    ("SSE framing (format_sse_event)", (("fastapi/sse.py", "format_sse_event"),)),
    ("client-disconnect watch (unless_gone, own time)", (("gateway/openai_api/serving.py", "unless_gone"),)),
)
# Steps timed by their own time, not their cumulative one: `unless_gone` awaits the generation in its own task.
OWN_TIME_STEPS = frozenset({"client-disconnect watch (unless_gone, own time)"})


def _profile(servers: TwoServers, bodies: list[Requests], rounds: int, out: Path | None) -> dict[str, Any]:
    """Per condition: cProfile of `rounds` gateway requests, as µs per request for each step and the top
    functions by own time."""
    results: dict[str, Any] = {}
    with httpx.Client(base_url=servers.gateway_url, timeout=120) as client:
        for route, stream in CONDITIONS:
            name = condition_name(route, stream)
            profiler = cProfile.Profile()
            servers.on_loop(profiler.enable)
            for i in range(rounds):
                _timed(client, bodies[i % len(bodies)].gateway[route], stream)
            servers.on_loop(profiler.disable)
            stats = pstats.Stats(profiler)
            if out is not None:
                stats.dump_stats(out.with_name(f"{out.stem}-{route}-{'stream' if stream else 'whole'}{out.suffix}"))
            results[name] = _breakdown(stats, rounds)
            print(f"[bench gateway] profiled {rounds} requests: {name}", flush=True)
    return results


def _breakdown(stats: pstats.Stats, rounds: int) -> dict[str, Any]:
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    steps = {}
    for step, functions in STEPS:
        own_time = step in OWN_TIME_STEPS
        total = sum(tt if own_time else ct for (file, _line, fn), (_cc, _nc, tt, ct, _callers) in table.items()
                    if any(file.endswith(suffix) and fn == name for suffix, name in functions))
        steps[step] = total / rounds * 1e6
    own = sorted(((tt, f"{Path(file).parent.name}/{Path(file).name}:{fn}") for (file, _l, fn), (_c, _n, tt, _ct, _)
                  in table.items()), reverse=True)[:15]
    return {"steps_us": steps, "top_own_us": [(name, tt / rounds * 1e6) for tt, name in own]}


# -- the report ------------------------------------------------------------------------------------------


def summary(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Per condition, in ms: each side's median, and the median and p99 of the per-round difference."""
    out = {}
    for name, sides in times.items():
        diffs = [g - d for g, d in zip(sides["gateway"], sides["direct"], strict=True)]
        out[name] = {"gateway_median": statistics.median(sides["gateway"]) * 1e3,
                     "direct_median": statistics.median(sides["direct"]) * 1e3,
                     "added_median": statistics.median(diffs) * 1e3, "added_p99": percentile(diffs, 0.99) * 1e3}
    return out


def _print(rows: dict[str, Any], rounds: int, engine: str, max_tokens: int) -> None:
    figures = summary(rows["times"])
    rows["summary"] = figures
    print(f"\nGateway added latency: {engine} engine, up to {max_tokens} answer tokens, {rounds} interleaved rounds; "
          "gateway (full prompt / plain request) vs a minimal server on the same engine (bare query / same request)")
    print(f"{'condition':<24}{'gateway ms':>12}{'direct ms':>11}{'added median ms':>17}{'added p99 ms':>14}")
    for name, f in figures.items():
        print(f"{name:<24}{f['gateway_median']:>12.3f}{f['direct_median']:>11.3f}{f['added_median']:>17.3f}"
              f"{f['added_p99']:>14.3f}")
    print(f"\n{'server CPU per request':<24}{'gateway µs':>12}{'direct µs':>11}{'added µs':>17}")
    for name, cpu in rows["cpu_us"].items():
        print(f"{name:<24}{cpu['gateway']:>12.0f}{cpu['direct']:>11.0f}{cpu['added']:>17.0f}")
    for name, result in rows.get("profile", {}).items():
        print(f"\nWhere a gateway request's time goes ({name}; cProfile, µs per request, cumulative per step; "
              "profiling inflates every figure)")
        for step, us in result["steps_us"].items():
            print(f"  {step:<58}{us:>9.1f}")
        print("  top functions by own time:")
        for fn, us in result["top_own_us"]:
            print(f"    {fn:<70}{us:>9.1f}")
