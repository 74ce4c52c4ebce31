"""`promptintern bench paper`: the paper's table on this machine, every row side by side in one run.

NL2Bash (icalfa's pairs, the trainer's deterministic split and worked-example prompt) on the base
model, all rows served by one engine: vLLM when `.venv-vllm` is set up, else the embedded engine.
Prefix caching is off for every row except row 4, which gets a second vLLM start with it on.
Quality and latency come from the same greedy generations at concurrency 1; throughput from a
second pass at concurrency 8. Adapters come from the trainer's cache (same data, schedule and base
model give the same key) and are trained only when missing. `--quick` runs the same pipeline on a
few test rows with vLLM in eager mode.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from core.basemodel import base_model_dir
from benchmarks.paper_report import (
    CONDITIONS,
    Condition,
    Measurement,
    Prices,
    bootstrap_bleu,
    paper_document,
    project_seconds,
    render_readme_section,
    render_report,
    table_rows,
    write_plots,
)
from core.config import Settings
from gateway.engines.base import Engine, EngineRequest, SamplingParams, TextDelta, Usage
from gateway.local_server import LocalGateway, free_port
from core.templates import PromptTemplate, bare_query_messages
from gateway.vllm_server import VLLM_LORA_RANKS, VLLM_VENV, VLLMProcess, vllm_python

Messages = list[dict[str, str]]
STOP = ("\n",)
WARMUP = 2
CONCURRENCY = 8
THROUGHPUT_REQUESTS = 32
QUICK_ROWS = 8
QUICK_THROUGHPUT_REQUESTS = 8
KEEP_RATIOS = (0.5, 0.2)
SCHEDULES = ("full_prompt", "direct", "promptintern")
# --quick trains only when an adapter is missing from the cache, and then only this long.
QUICK_STEPS = {"promptintern": (2, 2, 2, 4), "direct": (10,), "full_prompt": (10,)}
QUICK_ADAPTER_DIR = "nl2bash-quick"
SAMPLES = 3


@dataclass(frozen=True)
class PaperOptions:
    """What `promptintern bench paper` was asked for."""

    quick: bool = False
    rows: int | None = None
    throughput_requests: int | None = None
    max_new_tokens: int = 48
    fast_start: bool = False
    skip_vllm: bool = False
    out: Path = Path("results/paper")
    prices: Prices | None = None

    def test_rows(self, available: int) -> int:
        wanted = self.rows or (QUICK_ROWS if self.quick else available)
        return max(1, min(available, wanted))

    @property
    def throughput(self) -> int:
        return self.throughput_requests or (QUICK_THROUGHPUT_REQUESTS if self.quick else THROUGHPUT_REQUESTS)

    @property
    def eager(self) -> bool:
        return self.fast_start or self.quick


class Progress:
    """Timestamped progress lines; `tick` prints at most every 15 s (and at the end) with an ETA."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._last_tick = 0.0

    def say(self, text: str) -> None:
        print(f"[bench paper {_clock(time.monotonic() - self.started)}] {text}", flush=True)

    def tick(self, label: str, done: int, total: int, since: float) -> None:
        now = time.monotonic()
        if done < total and now - self._last_tick < 15:
            return
        self._last_tick = now
        per = (now - since) / max(done, 1)
        self.say(f"{label}: {done}/{total} requests, {per:.2f} s each, ETA {_clock(per * (total - done))}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- adapters --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    """Where one schedule's adapter came from, and what its manifest says about its training."""

    schedule: str
    path: Path
    source: str
    cache_key: str
    training_seconds: float | None
    created: str | None
    evaluation: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "path": str(self.path), "source": self.source,
                "cache_key": self.cache_key, "training_seconds": self.training_seconds, "created": self.created,
                "evaluation": self.evaluation}


def _train_job(settings: Settings, example: Any, schedule: Any, out_dir: Path) -> Any:
    """The job `promptintern train --example nl2bash` builds, so the cache key is the same."""
    from trainer.data import validate_examples, validate_rows
    from trainer.evaluate import EvalOptions
    from trainer.train import TrainJob

    template = example.template
    return TrainJob(
        name=example.name, template=template, rows=validate_rows(template, example.train),
        examples=validate_examples(template, example.examples), test_rows=validate_rows(template, example.test),
        out_dir=out_dir, base_model_dir=base_model_dir(settings), served_model_name=settings.served_model_name,
        schedule=schedule, evaluation=EvalOptions(enabled=False), lora_rank=settings.lora_rank,
        lora_targets=tuple(settings.lora_targets), cache_dir=settings.data_dir / "trainer-cache",
        threads=settings.torch_threads, show_progress=True,
    )


def _adapter_info(schedule: str, path: Path, source: str, key: str) -> AdapterInfo:
    from core.adapter_store import read_manifest

    manifest = read_manifest(path) or {}
    seconds = manifest.get("training_seconds")
    return AdapterInfo(schedule, path, source, key, float(seconds) if seconds is not None else None,
                       manifest.get("created"), manifest_evaluation(manifest))


def manifest_evaluation(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's own held-out figures from a manifest (its decoding, its rows), for comparison."""
    evaluation = manifest.get("evaluation")
    if not isinstance(evaluation, dict):
        return None
    keep = ("n", "bleu", "exact_match", "input_tokens", "latency_s")
    return {"decoding": evaluation.get("decoding"), "rows": evaluation.get("rows"),
            "conditions": {name: {k: c.get(k) for k in keep}
                           for name, c in (evaluation.get("conditions") or {}).items()}}


def resolve_adapter(settings: Settings, example: Any, schedule: str, quick: bool, progress: Progress) -> AdapterInfo:
    """The cached adapter for this schedule, else one trained now (a tiny schedule under --quick)."""
    from trainer.cache import find_cached_adapter, next_version_dir
    from trainer.schedule import preset
    from trainer.train import adapter_cache_key_for, train_prompt

    prompt_dir = settings.adapter_dir / example.name
    job = _train_job(settings, example, preset(schedule), next_version_dir(prompt_dir))
    key = adapter_cache_key_for(job)
    cached = find_cached_adapter(prompt_dir, key)
    if cached is not None:
        return _adapter_info(schedule, cached, "trainer cache", key)
    source = "trained by this run (it was not in the cache)"
    if quick:
        quick_dir = settings.adapter_dir / QUICK_ADAPTER_DIR / schedule
        job = _train_job(settings, example, preset(schedule, steps_per_stage=QUICK_STEPS[schedule]),
                         next_version_dir(quick_dir))
        key = adapter_cache_key_for(job)
        cached = find_cached_adapter(quick_dir, key)
        tiny = f"tiny --quick schedule, {sum(QUICK_STEPS[schedule])} steps: NOT the real adapter"
        if cached is not None:
            return _adapter_info(schedule, cached, f"quick cache ({tiny})", key)
        source = f"trained by this run ({tiny})"
    progress.say(f"adapter {schedule}: not in the cache; training into {job.out_dir}")
    train_prompt(job, progress=_training_progress(progress, schedule))
    return _adapter_info(schedule, job.out_dir, source, key)


def _training_progress(progress: Progress, schedule: str) -> Callable[[Any], None]:
    """A `train_prompt` callback: one line per phase change, and every 30 s."""
    last_phase = [""]
    last_at = [0.0]

    def report(p: Any) -> None:
        now = time.monotonic()
        if p.phase == last_phase[0] and now - last_at[0] < 30:
            return
        last_phase[0], last_at[0] = p.phase, now
        eta = f", ETA {_clock(p.eta_s)}" if p.eta_s is not None else ""
        loss = f", loss {p.loss:.3f}" if p.loss is not None else ""
        progress.say(f"training {schedule}: {p.phase} {p.stage_name} step {p.global_step}/{p.global_total_steps}"
                     f"{loss}{eta}")

    return report


# -- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressedTemplate:
    """The template's static messages pruned to `keep_ratio` of their tokens (slot messages kept)."""

    keep_ratio: float
    messages: dict[int, str]
    kept_tokens: int
    total_tokens: int


def lora_rank_limit(paths: Sequence[Path], limit: int) -> int:
    """The smallest rank vLLM accepts that fits every adapter served: vLLM sizes its LoRA weights (and, on
    CPU, the per-token work of every LoRA layer) by --max-lora-rank, not by the adapter's own rank."""
    from core.adapter_store import adapter_rank, read_adapter_config

    needed = max((adapter_rank(read_adapter_config(path, limit)) for path in paths), default=limit)
    return next((r for r in VLLM_LORA_RANKS if r >= needed), limit)


def compress_template(model_dir: Path, template: PromptTemplate, keep_ratios: Sequence[float]) -> list[
        CompressedTemplate]:
    """LLMLingua-style compression with the trainer's compressor (the base model's self-information)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.compress import SelfInformationCompressor

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    compressor = SelfInformationCompressor(model, tokenizer)
    out = []
    for keep in keep_ratios:
        texts: dict[int, str] = {}
        kept = total = 0
        for i, message in enumerate(template.messages):
            if message.is_static and message.static_text.strip():
                result = compressor.compress(message.static_text, keep)
                texts[i], kept, total = result.text, kept + result.kept_tokens, total + result.total_tokens
        out.append(CompressedTemplate(keep, texts, kept, total))
    del compressor, model
    gc.collect()
    return out


def input_key(condition: Condition) -> str:
    return f"compressed:{condition.keep_ratio}" if condition.inputs == "compressed" else condition.inputs


def build_inputs(template: PromptTemplate, queries: Sequence[str],
                 compressed: Sequence[CompressedTemplate]) -> dict[str, list[Messages]]:
    """Every row's messages: the app's full prompt, the bare query, the compressed prompts."""
    slot = template.slots[0]
    full: list[Messages] = [_chat(template.render({slot: q})) for q in queries]
    inputs = {"full": full, "bare": [bare_query_messages(template, {slot: q}) for q in queries]}
    for c in compressed:
        inputs[f"compressed:{c.keep_ratio}"] = [
            [{**m, "content": c.messages.get(i, m["content"])} for i, m in enumerate(messages)] for messages in full
        ]
    return inputs


def _chat(rendered: Any) -> Messages:
    if not isinstance(rendered, list):
        raise TypeError("the paper benchmark needs a chat template")
    return rendered


# -- measuring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
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


@dataclass(frozen=True)
class Workload:
    """The test rows every condition answers."""

    queries: list[str]
    references: list[list[str]]
    inputs: dict[str, list[Messages]]
    warmup: dict[str, list[Messages]]
    throughput_requests: int


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
    progress.say(f"{label}: done in {_clock(m.seconds or 0)}: {m.input_tokens:.0f} input tokens, BLEU {m.bleu:.1f}, "
                 f"EM {m.exact_match:.1f}%, p50 {statistics.median(m.latencies_s):.2f} s, "
                 f"{m.throughput_rps_c8:.2f} req/s at c={CONCURRENCY}")
    return m


def summarise(condition: Condition, gens: Sequence[Generation], work: Workload, throughput: float,
              seconds: float) -> Measurement:
    from trainer.evaluate import score

    predictions = [g.text for g in gens]
    figures = score(predictions, work.references[: len(gens)])
    originals = [g.original_prompt_tokens for g in gens if g.original_prompt_tokens is not None]
    return Measurement(
        condition=condition, n=len(gens),
        input_tokens=statistics.fmean(g.prompt_tokens for g in gens),
        original_input_tokens=statistics.fmean(originals) if originals else None,
        output_tokens=statistics.fmean(g.completion_tokens for g in gens),
        bleu=figures["bleu"], exact_match=figures["exact_match"],
        bleu_ci95=bootstrap_bleu(predictions, work.references[: len(gens)]) if len(gens) > 1 else None,
        latencies_s=[g.seconds for g in gens], throughput_rps_c8=throughput, predictions=predictions,
        throughput_requests=work.throughput_requests, seconds=seconds,
        samples=[{"query": q, "reference": refs[0], "prediction": p}
                 for q, refs, p in zip(work.queries[:SAMPLES], work.references[:SAMPLES], predictions[:SAMPLES],
                                       strict=False)],
    )


def adapter_name(schedule: str) -> str:
    return f"paper-{schedule.replace('_', '-')}@v1"


def _params(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=STOP)


async def measure_on_engine(settings: Settings, conditions: Sequence[Condition], adapters: dict[str, AdapterInfo],
                            work: Workload, max_new_tokens: int, progress: Progress) -> list[Measurement]:
    """Rows served by the engine directly (no gateway), with their adapters loaded by name."""
    from gateway.app import build_engine

    engine = build_engine(settings)
    await engine.start()
    try:
        wanted = sorted({c.adapter for c in conditions if c.adapter})
        for schedule in wanted:
            await engine.load_adapter(adapter_name(schedule), adapters[schedule].path)
        params = _params(max_new_tokens)
        out = []
        for condition in conditions:
            name = adapter_name(condition.adapter) if condition.adapter else None

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
    """Row 8: the real gateway on the same engine, the worked-example prompt registered with its adapter."""
    gateway_settings = settings.model_copy(update={
        "data_dir": root / "gateway-data", "adapter_dir": root / "gateway-adapters", "admin_key": "paper",
        "port": free_port(), "host": "127.0.0.1", "api_keys": [], "model_aliases": []})
    progress.say(f"row {condition.number}: starting the gateway ({settings.engine} engine) and registering "
                 f"{example.name!r} with {adapter.path}")
    with LocalGateway(gateway_settings) as gateway:
        with gateway.admin() as admin:
            response = admin.post("/v1/prompts", json={**example.registration(), "adapter_path": str(adapter.path)})
            response.raise_for_status()
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
    total = WARMUP + m.n + work.throughput_requests
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
                     prefix_caching=prefix_caching, threads=settings.torch_threads):
        yield settings.model_copy(update={"engine": "vllm", "vllm_url": f"http://127.0.0.1:{port}",
                                          "base_model": model_dir})


# -- the run ---------------------------------------------------------------------------------------


def choose_engine(options: PaperOptions) -> tuple[str, str]:
    """vLLM when its venv exists (and not --skip-vllm), else embedded; with the reason."""
    if options.skip_vllm:
        return "embedded", "--skip-vllm"
    if not vllm_python().exists():
        return "embedded", f"vLLM is not set up ({VLLM_VENV} missing; `make vllm-venv`)"
    return "vllm", f"vLLM is set up ({VLLM_VENV})"


def run(settings: Settings, options: PaperOptions) -> Path:
    """Measure every row, write report.md, paper.json, the plots and readme_section.md; returns the folder."""
    progress = Progress()
    started_at = dt.datetime.now(dt.UTC)
    kind, why = choose_engine(options)
    prices = options.prices or Prices(settings.price_input_per_1k, settings.price_output_per_1k)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)

    from trainer.nl2bash import build

    example = build()
    template = example.template
    n = options.test_rows(len(example.test))
    test = example.test[:n]
    model_dir = base_model_dir(settings)
    mode = "quick" if options.quick else "full" if n == len(example.test) else "partial"
    progress.say(f"{mode} run: {n} of {len(example.test)} test rows, "
                 f"{options.throughput} requests at concurrency {CONCURRENCY} per row, engine {kind} ({why})"
                 + (", vLLM eager (fast start)" if kind == "vllm" and options.eager else ""))

    progress.say("phase 1/4: adapters from the trainer's cache")
    adapters = {s: resolve_adapter(settings, example, s, options.quick, progress) for s in SCHEDULES}
    for a in adapters.values():
        progress.say(f"  {a.schedule}: {a.path} ({a.source}, trained in {a.training_seconds} s)")
    rank = lora_rank_limit([a.path for a in adapters.values()], settings.max_lora_rank)
    if rank != settings.max_lora_rank:
        progress.say(f"  the engine's LoRA slots are sized to the adapters' rank: MAX_LORA_RANK {rank} "
                     f"(setting: {settings.max_lora_rank})")
        settings = settings.model_copy(update={"max_lora_rank": rank})

    progress.say(f"phase 2/4: compressing the template at keep_ratio {', '.join(map(str, KEEP_RATIOS))}")
    compressed = compress_template(model_dir, template, KEEP_RATIOS)
    slot = template.slots[0]
    queries = [row[slot] for row in test]
    warmup_queries = [row[slot] for row in example.train[:WARMUP]]
    work = Workload(
        queries=queries, references=[[r["response"], *r.get("references", [])] for r in test],
        inputs=build_inputs(template, queries, compressed),
        warmup=build_inputs(template, warmup_queries, compressed), throughput_requests=options.throughput,
    )

    measurements = _measure_all(kind, settings, model_dir, example, adapters, work, options, out, progress)
    for m in measurements:
        if m.condition.adapter:
            m.training_time_s = adapters[m.condition.adapter].training_seconds
    _annotate(measurements, adapters, compressed, kind, why)

    progress.say("phase 4/4: writing the report")
    rows = table_rows(measurements, prices)
    total = time.monotonic() - progress.started
    projected = project_seconds(measurements, total, rows=len(example.test), warmup=WARMUP,
                                throughput_requests=THROUGHPUT_REQUESTS)
    doc = paper_document(
        engine=kind, machine=machine_info(), date=started_at.isoformat(timespec="seconds"), rows=rows,
        settings=_settings_doc(settings, options, example, n, kind, compressed, prices),
        extra={"mode": mode, "adapters": [a.as_dict() for a in adapters.values()],
               "total_seconds": round(total, 1),
               "projected_full_run_seconds": round(projected) if options.quick else None},
    )
    _write(doc, out)
    progress.say(f"wrote {out}/report.md, paper.json, quality_vs_tokens.png, latency.png, readme_section.md")
    print("\n" + (out / "report.md").read_text().split("## What the figures say")[0])
    return out


def _measure_all(kind: str, settings: Settings, model_dir: Path, example: Any, adapters: dict[str, AdapterInfo],
                 work: Workload, options: PaperOptions, out: Path, progress: Progress) -> list[Measurement]:
    by_id = {c.id: c for c in CONDITIONS}
    direct = [c for c in CONDITIONS if not c.prefix_caching and not c.gateway]
    results: dict[str, Measurement] = {}
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    progress.say(f"phase 3/4: serving ({kind}, prefix caching off): rows "
                 + ", ".join(c.number for c in direct) + ", then row 8 through the gateway")
    with tempfile.TemporaryDirectory(prefix="promptintern-paper-") as tmp, \
            serving(kind, settings, model_dir, prefix_caching=False, eager=options.eager, log_dir=log_dir) as s:
        for m in asyncio.run(measure_on_engine(s, direct, adapters, work, options.max_new_tokens, progress)):
            results[m.condition.id] = m
        gateway_row = by_id["promptintern_gateway"]
        results[gateway_row.id] = measure_through_gateway(s, gateway_row, example, adapters["promptintern"], work,
                                                          options.max_new_tokens, Path(tmp), progress)
    cached = by_id["base_full_prefix_cache"]
    if kind == "vllm":
        progress.say("phase 3/4: second vLLM start, prefix caching on: row 4")
        with serving(kind, settings, model_dir, prefix_caching=True, eager=options.eager, log_dir=log_dir) as s:
            results[cached.id] = asyncio.run(measure_on_engine(s, [cached], adapters, work, options.max_new_tokens,
                                                               progress))[0]
    else:
        results[cached.id] = Measurement(condition=cached)
    return [results[c.id] for c in CONDITIONS]


def _annotate(measurements: list[Measurement], adapters: dict[str, AdapterInfo],
              compressed: Sequence[CompressedTemplate], kind: str, why: str) -> None:
    by_id = {m.condition.id: m for m in measurements}
    for c in compressed:
        m = by_id.get(f"compressed_keep{c.keep_ratio}")
        if m is not None:
            m.note = f"static message pruned from {c.total_tokens} to {c.kept_tokens} tokens"
    apc = by_id["base_full_prefix_cache"]
    apc.note = ("prefix caching on (its own vLLM start); every other row has it off" if kind == "vllm"
                else f"the embedded engine has no prefix cache ({why})")
    for m in measurements:
        if m.condition.adapter and not m.condition.gateway:
            m.note = f"adapter {adapters[m.condition.adapter].source}"
    pi, gw = by_id.get("promptintern"), by_id.get("promptintern_gateway")
    if pi and gw and gw.measured and pi.measured:
        same = sum(x == y for x, y in zip(pi.predictions, gw.predictions, strict=False))
        gw.note += f"; {same}/{gw.n} answers identical to row 7's"


def _settings_doc(settings: Settings, options: PaperOptions, example: Any, n: int, kind: str,
                  compressed: Sequence[CompressedTemplate], prices: Prices) -> dict[str, Any]:
    flags = [("--quick", options.quick), ("--fast-start", options.fast_start), ("--skip-vllm", options.skip_vllm),
             (f"--requests {options.rows}", options.rows is not None),
             (f"--throughput-requests {options.throughput_requests}", options.throughput_requests is not None)]
    command = " ".join(["promptintern bench paper", *(flag for flag, on in flags if on)])
    if kind == "vllm":
        engine_detail = f"{vllm_version()}, " + (
            "eager mode (--enforce-eager -O0: fast start, slower serving)" if options.eager
            else "compiled (vLLM's default optimisation level)")
    else:
        engine_detail = "transformers + peft in this process, requests served one at a time"
    available = len(example.test)
    if options.quick:
        mode_detail = f"--quick: the first {n} of {available} test rows"
    elif n < available:
        mode_detail = f"partial run: the first {n} of {available} test rows (--requests {n})"
    else:
        mode_detail = f"full run: all {available} test rows"
    return {
        "command": command, "mode_detail": mode_detail, "engine_detail": engine_detail,
        "task": "NL2Bash (icalfa's pairs), the worked-example prompt of trainer/nl2bash.py",
        "test_rows": n, "test_rows_available": len(example.test), "train_rows": len(example.train),
        "examples": len(example.examples), "base_model": settings.served_model_name,
        "decoding": f"greedy, at most {options.max_new_tokens} new tokens, stopping at the first newline "
                    "(every row alike: the answer is one command line)",
        "warmup": WARMUP, "throughput_requests": options.throughput, "concurrency_throughput": CONCURRENCY,
        "max_lora_rank": settings.max_lora_rank,
        "prefix_caching": ("off for every row except row 4 (a second vLLM start with it on)" if kind == "vllm"
                           else "none (the embedded engine has no prefix cache)"),
        "price_input_per_1k": prices.input_per_1k, "price_output_per_1k": prices.output_per_1k,
        "compression": [{"keep_ratio": c.keep_ratio, "kept_tokens": c.kept_tokens, "total_tokens": c.total_tokens}
                        for c in compressed],
    }


def vllm_version() -> str:
    found = sorted((VLLM_VENV / "lib").glob("python*/site-packages/vllm*.dist-info"))
    if not found:
        return "vLLM (version unknown)"
    name, _, version = found[0].name.removesuffix(".dist-info").partition("-")
    return f"vLLM {version} ({name.replace('_', '-')})"


def machine_info() -> dict[str, Any]:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    memory = _memory_gib()
    return {
        "description": f"{cpu}, {cores} CPU cores, {memory:.0f} GiB RAM, no GPU used",
        "cpu": cpu, "cores": cores, "memory_gib": round(memory, 1), "os": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm_version(),
    }


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _write(doc: dict[str, Any], out: Path) -> None:
    (out / "paper.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    write_plots(doc, out)
    (out / "report.md").write_text(render_report(doc))
    (out / "readme_section.md").write_text(render_readme_section(doc, str(out / "report.md")))


def rebuild_report(out: Path) -> None:
    """Re-render report.md, the plots and readme_section.md from an existing paper.json; an adapter entry
    without the trainer's own evaluation gets it from its manifest when the cache key still matches."""
    from core.adapter_store import read_manifest

    doc = json.loads((out / "paper.json").read_text())
    for adapter in doc.get("adapters", []):
        manifest = read_manifest(Path(adapter["path"])) or {}
        if adapter.get("evaluation") is None and manifest.get("cache_key") == adapter.get("cache_key"):
            adapter["evaluation"] = manifest_evaluation(manifest)
    _write(doc, out)

