"""The matched workload on both engines: full prompt on the base model vs bare query on the adapter.

Rows, side by side in one run: the embedded engine, vLLM with automatic prefix caching off,
and vLLM with it on (the alternative users would otherwise pick: vLLM's default) — each for the
full NL2Bash worked-example prompt on the base model and the bare query on a LoRA adapter, at
concurrency 1 and 8. The adapter has random weights: speed does not depend on what it learnt.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.latency import percentile
from core.basemodel import base_model_dir
from core.config import Settings
from core.templates import bare_query_messages
from gateway.engines.base import Engine, EngineRequest, SamplingParams, Usage
from gateway.engines.embedded import EmbeddedEngine
from gateway.engines.vllm import VLLMEngine
from gateway.local_server import free_port
from gateway.vllm_server import VLLMProcess, vllm_python
from trainer.lora import random_lora

ADAPTER = "bench@v1"


@dataclass
class Row:
    engine: str
    prefix_caching: str
    workload: str
    concurrency: int
    input_tokens: float
    p50_s: float
    p95_s: float
    throughput_rps: float


def _workload(requests: int) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    from trainer.nl2bash import build

    example = build()
    template = example.template
    queries = [row["query"] for row in example.test[:requests]]
    full = [template.render({"query": q}) for q in queries]
    bare = [bare_query_messages(template, {"query": q}) for q in queries]
    return full, bare  # type: ignore[return-value]


async def _run(engine: Engine, batches: list[list[dict[str, str]]], adapter: str | None, concurrency: int,
               max_tokens: int) -> tuple[list[float], float, float]:
    """Latencies, wall time and mean prompt tokens of one condition."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens: list[int] = []

    async def one(messages: list[dict[str, str]]) -> None:
        async with semaphore:
            started = time.perf_counter()
            request = EngineRequest(kind="chat", messages=messages, adapter=adapter,
                                    params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
            async for event in engine.generate(request):
                if isinstance(event, Usage):
                    tokens.append(event.prompt_tokens)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(m) for m in batches))
    return latencies, time.perf_counter() - started, statistics.fmean(tokens)


async def _measure(engine: Engine, label: str, caching: str, full: list[Any], bare: list[Any], max_tokens: int,
                   rows: list[Row], progress: Callable[[str], None]) -> None:
    await _run(engine, bare[:2], ADAPTER, 1, max_tokens)  # warm-up
    for workload, batches, adapter in (("full prompt, base", full, None), ("bare query, adapter", bare, ADAPTER)):
        for concurrency in (1, 8):
            progress(f"{label} ({caching}): {workload}, concurrency {concurrency}, {len(batches)} requests")
            latencies, wall, tokens = await _run(engine, batches, adapter, concurrency, max_tokens)
            rows.append(Row(label, caching, workload, concurrency, tokens, statistics.median(latencies),
                            percentile(latencies, 0.95), len(batches) / wall))


def run(settings: Settings, requests: int = 16, max_tokens: int = 16, fast_start: bool = False,
        skip_vllm: bool = False) -> list[Row]:
    def progress(text: str) -> None:
        print(f"[bench engines] {text}", flush=True)

    model_dir = base_model_dir(settings)
    full, bare = _workload(requests)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="promptintern-bench-") as tmp:
        root = Path(tmp)
        adapter = random_lora(model_dir, root / "adapter", seed=0)

        async def embedded() -> None:
            engine = EmbeddedEngine(model_dir, max_lora_rank=settings.max_lora_rank, threads=settings.torch_threads)
            await engine.start()
            await engine.load_adapter(ADAPTER, adapter)
            await _measure(engine, "embedded", "n/a", full, bare, max_tokens, rows, progress)
            await engine.close()

        asyncio.run(embedded())
        if skip_vllm or not vllm_python().exists():
            progress("vLLM rows skipped" + ("" if skip_vllm else ": no .venv-vllm (make vllm-venv)"))
        else:
            for caching in (False, True):
                port = free_port()
                with VLLMProcess(settings, model_dir, port=port, log_path=root / f"vllm-{caching}.log",
                                 fast_start=fast_start, prefix_caching=caching):
                    engine_settings = settings.model_copy(update={"vllm_url": f"http://127.0.0.1:{port}"})
                    _run_vllm(engine_settings, adapter, "on" if caching else "off", full, bare, max_tokens, rows,
                              progress)
    _print(rows, max_tokens, fast_start)
    return rows


def _run_vllm(settings: Settings, adapter: Path, caching: str, full: list[Any], bare: list[Any], max_tokens: int,
              rows: list[Row], progress: Callable[[str], None]) -> None:
    async def go() -> None:
        engine = VLLMEngine(settings)
        await engine.start()
        await engine.load_adapter(ADAPTER, adapter)
        await _measure(engine, "vllm", caching, full, bare, max_tokens, rows, progress)
        await engine.close()

    asyncio.run(go())


def _print(rows: list[Row], max_tokens: int, fast_start: bool) -> None:
    print(f"\nEngines on the NL2Bash worked example, greedy, {max_tokens} new tokens per request"
          + (", vLLM in eager mode (--fast-start)" if fast_start else ""))
    header = f"{'engine':<10}{'prefix cache':<14}{'workload':<22}{'conc.':>6}{'in tok':>8}{'p50 s':>8}" \
             f"{'p95 s':>8}{'req/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.engine:<10}{r.prefix_caching:<14}{r.workload:<22}{r.concurrency:>6}{r.input_tokens:>8.0f}"
              f"{r.p50_s:>8.2f}{r.p95_s:>8.2f}{r.throughput_rps:>8.2f}")
    by_key = {(r.engine, r.prefix_caching, r.workload, r.concurrency): r for r in rows}
    print("\nSpeed-up of bare query on the adapter over the full prompt (same engine, p50 and throughput):")
    for (engine, caching, workload, conc), r in by_key.items():
        if workload != "bare query, adapter":
            continue
        base = by_key.get((engine, caching, "full prompt, base", conc))
        if base:
            print(f"  {engine:<9} prefix cache {caching:<4} c={conc}: latency x{base.p50_s / r.p50_s:.1f}, "
                  f"throughput x{r.throughput_rps / base.throughput_rps:.1f}, "
                  f"input tokens -{100 * (1 - r.input_tokens / base.input_tokens):.0f}%")
    apc = by_key.get(("vllm", "on", "full prompt, base", 1))
    ours = by_key.get(("vllm", "off", "bare query, adapter", 1))
    if apc and ours:
        print(f"  bare query on vLLM (caching off) vs full prompt with vLLM prefix caching on, c=1: "
              f"latency x{apc.p50_s / ours.p50_s:.1f}")
