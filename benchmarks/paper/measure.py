"""Measuring one row: its requests sent to the engine directly or through the gateway's HTTP API, timed at
concurrency 1 (the same generations are scored) and at concurrency 8 (throughput)."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from benchmarks.paper.adapters import AdapterInfo
from benchmarks.paper.conditions import Condition, Measurement
from benchmarks.paper.inputs import Messages, Workload, input_key
from benchmarks.paper.machine import vllm_threads
from benchmarks.paper.options import CONCURRENCY, SAMPLES, STOP, Progress, clock
from benchmarks.paper.scoring import bootstrap_bleu
from core.config import Settings
from gateway.engines.base import Engine, EngineRequest, SamplingParams, TextDelta, Usage
from gateway.local_server import LocalGateway, free_port
from gateway.vllm_server import VLLMProcess


@dataclass(frozen=True)
class Generation:
    """One answer, its token counts and its time from send to the last event."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    original_prompt_tokens: int | None = None


Send = Callable[[Messages], Awaitable[Generation]]


async def engine_generate(engine: Engine, messages: Messages, adapter: str | None,
                          params: SamplingParams) -> Generation:
    """One request on the engine directly, timed from send to the last event."""
    started = time.perf_counter()
    parts: list[str] = []
    usage = Usage(0, 0)
    async for event in engine.generate(EngineRequest(kind="chat", messages=messages, adapter=adapter, params=params)):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Usage):
            usage = event
    return Generation("".join(parts).strip(), usage.prompt_tokens, usage.completion_tokens,
                      time.perf_counter() - started)


async def gateway_generate(client: httpx.AsyncClient, body: dict[str, Any], messages: Messages) -> Generation:
    """One request through the gateway's HTTP API; it must take the adapter route."""
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json={**body, "messages": messages})
    seconds = time.perf_counter() - started
    response.raise_for_status()
    route = response.headers.get("x-promptintern-route")
    if route != "adapter":
        raise RuntimeError(f"the gateway sent the app's full prompt down the {route!r} route, not 'adapter'")
    data = response.json()
    usage = data["usage"]
    original = (usage.get("promptintern") or {}).get("original_prompt_tokens")
    return Generation((data["choices"][0]["message"]["content"] or "").strip(), int(usage["prompt_tokens"]),
                      int(usage["completion_tokens"]), seconds, original)


async def _concurrently(send: Send, batch: Sequence[Messages], concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(messages: Messages) -> None:
        async with semaphore:
            await send(messages)

    started = time.perf_counter()
    await asyncio.gather(*(one(m) for m in batch))
    return time.perf_counter() - started


async def measure(condition: Condition, send: Send, work: Workload, progress: Progress) -> Measurement:
    """Warm-up, then every test row at concurrency 1 (scored and timed), then a pass at concurrency 8."""
    label = f"row {condition.number} {condition.id}"
    key = input_key(condition)
    inputs = work.inputs[key]
    started = time.monotonic()
    for messages in work.warmup[key]:
        await send(messages)
    progress.say(f"{label}: {len(inputs)} requests at concurrency 1 (scored and timed)")
    gens: list[Generation] = []
    since = time.monotonic()
    for i, messages in enumerate(inputs):
        gens.append(await send(messages))
        progress.tick(f"{label} c=1", i + 1, len(inputs), since)
    progress.say(f"{label}: {work.throughput_requests} requests at concurrency {CONCURRENCY}")
    batch = [inputs[i % len(inputs)] for i in range(work.throughput_requests)]
    wall = await _concurrently(send, batch, CONCURRENCY)
    m = summarise(condition, gens, work, work.throughput_requests / wall, time.monotonic() - started)
    progress.say(f"{label}: done in {clock(m.seconds or 0)}: {m.input_tokens:.0f} input tokens, BLEU {m.bleu:.1f}, "
                 f"EM {m.exact_match:.1f}%, p50 {statistics.median(m.latencies_s):.2f} s, "
                 f"{m.throughput_rps_c8:.2f} req/s at c={CONCURRENCY}")
    return m


def summarise(condition: Condition, gens: Sequence[Generation], work: Workload, throughput: float,
              seconds: float) -> Measurement:
    """A row's measurement from its scored generations and its throughput pass."""
    from trainer.evaluate import score

    predictions = [g.text for g in gens]
    references = work.references[: len(gens)]
    figures = score(predictions, references)
    originals = [g.original_prompt_tokens for g in gens if g.original_prompt_tokens is not None]
    return Measurement(
        condition=condition, n=len(gens),
        input_tokens=statistics.fmean(g.prompt_tokens for g in gens),
        original_input_tokens=statistics.fmean(originals) if originals else None,
        output_tokens=statistics.fmean(g.completion_tokens for g in gens),
        bleu=figures["bleu"], exact_match=figures["exact_match"],
        bleu_ci95=bootstrap_bleu(predictions, references) if len(gens) > 1 else None,
        latencies_s=[g.seconds for g in gens], throughput_rps_c8=throughput, predictions=predictions,
        throughput_requests=work.throughput_requests, seconds=seconds,
        samples=[{"query": q, "reference": refs[0], "prediction": p}
                 for q, refs, p in zip(work.queries[:SAMPLES], work.references[:SAMPLES], predictions[:SAMPLES],
                                       strict=False)],
    )


def adapter_name(schedule: str) -> str:
    """The name a schedule's adapter is loaded under on the engine."""
    return f"paper-{schedule.replace('_', '-')}@v1"


async def measure_on_engine(settings: Settings, conditions: Sequence[Condition], adapters: dict[str, AdapterInfo],
                            work: Workload, max_new_tokens: int, progress: Progress) -> list[Measurement]:
    """Rows served by the engine directly (no gateway), with their adapters loaded by name."""
    from gateway.app import build_engine

    engine = build_engine(settings)
    await engine.start()
    try:
        wanted = sorted({c.adapter for c in conditions if c.adapter and not c.merged})
        for schedule in wanted:
            await engine.load_adapter(adapter_name(schedule), adapters[schedule].path)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=STOP)
        out = []
        for condition in conditions:
            # A merged row's adapter is in the engine's weights: its requests name the engine's model.
            name = adapter_name(condition.adapter) if condition.adapter and not condition.merged else None

            async def send(messages: Messages, name: str | None = name) -> Generation:
                return await engine_generate(engine, messages, name, params)

            out.append(await measure(condition, send, work, progress))
        for schedule in wanted:
            await engine.unload_adapter(adapter_name(schedule))
        return out
    finally:
        await engine.close()


def measure_through_gateway(settings: Settings, condition: Condition, example: Any, adapter: AdapterInfo,
                            work: Workload, max_new_tokens: int, root: Path, progress: Progress) -> Measurement:
    """Row 8: the real gateway on the same engine, the worked-example prompt registered with its adapter (an
    absolute path inside the gateway's import folder: a relative one is read relative to that folder)."""
    adapter_path = adapter.path.resolve()
    gateway_settings = settings.model_copy(update={
        "data_dir": root / "gateway-data", "adapter_dir": root / "gateway-adapters",
        "admin_key": SecretStr(secrets.token_urlsafe(24)), "port": free_port(), "host": "127.0.0.1", "api_keys": [],
        "model_aliases": [], "import_dir": adapter_path.parent})
    progress.say(f"row {condition.number}: starting the gateway ({settings.engine} engine) and registering "
                 f"{example.name!r} with {adapter.path}")
    with LocalGateway(gateway_settings) as gateway:
        with gateway.admin() as admin:
            response = admin.post("/v1/prompts", json={**example.registration(), "adapter_path": str(adapter_path)})
            if response.status_code != 201:
                raise RuntimeError(f"registering {example.name!r} with {adapter_path}: {response.status_code} "
                                   f"{response.text}")
            status = response.json().get("status")
            if status != "ready":
                raise RuntimeError(f"the registered prompt is {status!r}, not ready")
        body = {"model": settings.served_model_name, "max_tokens": max_new_tokens, "temperature": 0,
                "stop": list(STOP)}

        async def go() -> Measurement:
            limits = httpx.Limits(max_connections=2 * CONCURRENCY)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=600, limits=limits) as client:
                async def send(messages: Messages) -> Generation:
                    return await gateway_generate(client, body, messages)

                return await measure(condition, send, work, progress)

        m = asyncio.run(go())
    total = len(work.warmup[input_key(condition)]) + m.n + work.throughput_requests
    m.note = f"all {total} requests sent the full prompt over HTTP and took the adapter route"
    return m


@contextmanager
def serving(kind: str, settings: Settings, model_dir: Path, *, prefix_caching: bool, eager: bool,
            log_dir: Path) -> Iterator[Settings]:
    """Settings for a running engine: a vLLM server started here, or the embedded engine in process."""
    if kind == "embedded":
        yield settings.model_copy(update={"engine": "embedded", "base_model": model_dir})
        return
    log_path = log_dir / f"vllm-prefix-caching-{'on' if prefix_caching else 'off'}.log"
    log_path.unlink(missing_ok=True)
    port = free_port()
    with VLLMProcess(settings, model_dir, port=port, log_path=log_path, fast_start=eager,
                     prefix_caching=prefix_caching, threads=vllm_threads(settings)):
        yield settings.model_copy(update={"engine": "vllm", "vllm_url": f"http://127.0.0.1:{port}",
                                          "base_model": model_dir})


MERGED_MODEL_NAME = "paper-promptintern@merged"


@contextmanager
def serving_merged(settings: Settings, model_dir: Path, adapter: AdapterInfo, *, eager: bool, root: Path,
                   log_dir: Path, progress: Progress) -> Iterator[Settings]:
    """Row 9's engine: the adapter merged into the base weights (trainer/merge.py, as merged serving writes it),
    on a vLLM of its own without LoRA, started like the gateway's merged engine (prefix caching off here, as for
    every row but 4)."""
    from trainer.merge import merge_adapter

    progress.say(f"merging {adapter.path} into the base weights")
    merged_dir = merge_adapter(model_dir, adapter.path, root / "merged", progress=False)
    log_path = log_dir / "vllm-merged.log"
    log_path.unlink(missing_ok=True)
    port = free_port()
    with VLLMProcess(settings, merged_dir, port=port, log_path=log_path, fast_start=eager, prefix_caching=False,
                     threads=vllm_threads(settings), lora=False, served_model_name=MERGED_MODEL_NAME):
        yield settings.model_copy(update={"engine": "vllm", "vllm_url": f"http://127.0.0.1:{port}",
                                          "base_model": merged_dir, "served_model_name": MERGED_MODEL_NAME})
