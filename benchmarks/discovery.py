"""`promptintern bench discovery`: the discovery miner's figures.

1. The response path: `PromptDiscovery.offer` (sample, fingerprint, enqueue) on a 2,000-token passthrough chat
   request, median and p99 in microseconds (the goal is under 50 µs median).
2. The background: milliseconds of mining per request, recurring and one-off.
3. Memory: the miner's heap (tracemalloc) after 10,000 distinct one-off requests, at its cluster cap.
4. Quality on the property tests' generator (`benchmarks.discovery_traffic`): recall (templates proposed whose
   candidate matches at least 95% of fresh requests), precision (candidates that are one template's and capture
   no noise), noise requests captured.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.discovery_traffic import make_template, noise, static_text
from core.basemodel import base_model_dir
from core.config import Settings
from core.templates import PromptTemplate, normalize, parse_template
from gateway.discovery.miner import PromptMiner, Summary, observation
from gateway.discovery.service import PromptDiscovery
from gateway.engines.base import EngineRequest, SamplingParams
from gateway.metrics import GatewayMetrics
from gateway.openai_api.planning import Plan
from gateway.registry.store import PromptRegistry
from gateway.tokens import TokenCounter

Request = list[tuple[str, str]] | str


def _texts(request: Request) -> list[str]:
    return [normalize(request)] if isinstance(request, str) else [normalize(t) for _, t in request]


def _observe(miner: PromptMiner, kind: str, request: Request) -> None:
    if isinstance(request, str):
        miner.observe(observation(None, "completion", prompt=request))
    else:
        miner.observe(observation(None, kind, messages=request))


def response_path(settings: Settings, request_tokens: int, repeats: int) -> tuple[int, list[float]]:
    """Microseconds per `offer` of one passthrough chat request of about `request_tokens` tokens."""
    counter = TokenCounter.from_model_dir(base_model_dir(settings))
    rng = random.Random(1)
    words = request_tokens // 8
    while True:
        messages = [{"role": "system", "content": static_text(rng, words)},
                    {"role": "user", "content": static_text(rng, 40)}]
        tokens = counter.count_chat(messages)
        if tokens >= request_tokens:
            break
        words += max(5, (request_tokens - tokens) // 6)
    plan = Plan("chat", settings.served_model_name, "passthrough", "",
                EngineRequest(kind="chat", params=SamplingParams(max_tokens=16), messages=messages))
    with tempfile.TemporaryDirectory() as tmp:
        registry = PromptRegistry(f"sqlite:///{Path(tmp) / 'bench.db'}")
        try:
            discovery = PromptDiscovery(settings, registry, counter, GatewayMetrics())

            async def timed() -> list[float]:
                queue = discovery._queue  # drained after each offer, so none is dropped
                out = []
                for _ in range(repeats):
                    started = time.perf_counter_ns()
                    discovery.offer(plan)
                    out.append((time.perf_counter_ns() - started) / 1000)
                    queue.get_nowait()
                return out

            return tokens, asyncio.run(timed())
        finally:
            registry.close()


def mining_cost(requests: int) -> tuple[float, float]:
    """Milliseconds of background mining per request: one recurring template's, and one-off requests'."""
    rng = random.Random(2)
    template = make_template(rng, "chat", 2)
    miner = PromptMiner()
    recurring = [template.request(rng) for _ in range(requests)]
    started = time.perf_counter()
    for request in recurring:
        _observe(miner, "chat", request)
    per_recurring = (time.perf_counter() - started) / requests * 1000
    one_offs = [noise(rng) for _ in range(requests)]
    started = time.perf_counter()
    for kind, request in one_offs:
        _observe(miner, kind, request)
    return per_recurring, (time.perf_counter() - started) / requests * 1000


def memory(distinct: int, words: int, max_clusters: int) -> tuple[float, float, int]:
    """MiB the miner holds (and its peak) after `distinct` one-off requests of about `words` words each."""
    rng = random.Random(3)
    miner = PromptMiner(max_clusters=max_clusters)
    tracemalloc.start()
    try:
        for i in range(distinct):
            request = [("system", static_text(rng, words)), ("user", f"request {i}")]
            _observe(miner, "chat", request)
            del request
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current / 2**20, peak / 2**20, len(miner)


def _compiled(summary: Summary) -> PromptTemplate:
    if summary.kind == "completion":
        assert isinstance(summary.template, str)
        return parse_template(prompt=summary.template)
    assert isinstance(summary.template, list)
    return parse_template(messages=summary.template)


def quality(trials: int, min_requests: int = 20, fresh: int = 100) -> dict[str, float]:
    """Precision and recall of the miner over `trials` generated traffic mixes."""
    templates_total = proposed_ok = candidates_total = candidates_ok = noise_total = noise_captured = 0
    fresh_rates: list[float] = []
    for trial in range(trials):
        rng = random.Random(1000 + trial)
        templates = [make_template(rng, rng.choice(["chat", "completion"]), rng.randint(1, 4))
                     for _ in range(rng.randint(1, 5))]
        traffic = [(i, t.kind, t.request(rng)) for i, t in enumerate(templates)
                   for _ in range(rng.randint(min_requests + 2, 40))]
        noises = [(-1, *noise(rng)) for _ in range(rng.randint(0, 100))]
        traffic += noises
        rng.shuffle(traffic)
        miner = PromptMiner()
        for _, kind, request in traffic:
            _observe(miner, kind, request)
        summaries = [s for s in miner.summaries(min_requests) if s.static_chars >= 0.5 * s.chars_total / s.requests]
        covered: set[int] = set()
        captured_noise: set[int] = set()
        for summary in summaries:
            template = _compiled(summary)
            sources = {i for i, kind, request in traffic
                       if kind == summary.kind and template.match(_texts(request)) is not None}
            captured_noise |= {n for n, (_, kind, request) in enumerate(noises)
                               if kind == summary.kind and template.match(_texts(request)) is not None}
            real = sources - {-1}
            ok = len(real) == 1 and -1 not in sources
            if ok:
                generator = templates[next(iter(real))]
                rate = sum(template.match(_texts(generator.request(rng))) is not None for _ in range(fresh)) / fresh
                fresh_rates.append(rate)
                ok = rate >= 0.95
                if ok:
                    covered.add(next(iter(real)))
            candidates_ok += ok
        templates_total += len(templates)
        proposed_ok += len(covered)
        candidates_total += len(summaries)
        noise_total += len(noises)
        noise_captured += len(captured_noise)
    return {"trials": trials, "templates": templates_total, "candidates": candidates_total,
            "recall": proposed_ok / templates_total, "precision": candidates_ok / max(1, candidates_total),
            "noise requests": noise_total, "noise captured": noise_captured,
            "fresh match (mean)": statistics.fmean(fresh_rates) if fresh_rates else 0.0}


def run(settings: Settings, *, request_tokens: int = 2000, repeats: int = 5000, distinct: int = 10_000,
        words: int = 300, trials: int = 40) -> None:
    print(f"1/4 response path: offer() of a {request_tokens}-token passthrough chat request, {repeats} times")
    tokens, micros = response_path(settings, request_tokens, repeats)
    micros.sort()
    print(f"    {tokens} tokens: median {statistics.median(micros):.2f} µs, p99 {micros[int(len(micros) * 0.99)]:.2f} "
          f"µs (goal: under 50 µs median)")
    print("2/4 background mining, 1,000 requests each (2-slot chat template, then one-off requests)")
    recurring, one_off = mining_cost(1000)
    print(f"    {recurring:.3f} ms per recurring request, {one_off:.3f} ms per one-off request")
    print(f"3/4 memory after {distinct:,} distinct requests of about {words} words (cap "
          f"{settings.discovery_max_clusters} clusters)")
    current, peak, held = memory(distinct, words, settings.discovery_max_clusters)
    print(f"    {current:.1f} MiB held ({held} clusters), peak {peak:.1f} MiB")
    print(f"4/4 precision and recall on the property tests' generator, {trials} traffic mixes")
    figures = quality(trials)
    for name, figure in figures.items():
        print(f"    {name}: {figure:.3f}" if isinstance(figure, float) else f"    {name}: {figure}")
