"""One `promptintern bench paper` run: adapters, compression, every row measured, then `paper.json`, the report,
the plots and the README section written; `rebuild_report` re-renders them from an existing `paper.json`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.errors import rebuild_from
from benchmarks.paper.adapters import AdapterInfo, lora_rank_limit, manifest_evaluation, resolve_adapter
from benchmarks.paper.conditions import CONDITIONS, Measurement, Prices
from benchmarks.paper.inputs import CompressedTemplate, Workload, build_inputs, compress_template
from benchmarks.paper.machine import machine_info, vllm_threads, vllm_version
from benchmarks.paper.measure import (
    measure_on_engine,
    measure_through_gateway,
    serving,
    serving_merged,
)
from benchmarks.paper.options import (
    CONCURRENCY,
    KEEP_RATIOS,
    SCHEDULES,
    THROUGHPUT_REQUESTS,
    WARMUP,
    PaperOptions,
    Progress,
)
from benchmarks.paper.plots import write_plots
from benchmarks.paper.report import render_readme_section, render_report
from benchmarks.paper.table import complete_rows, paper_document, project_seconds, table_rows
from core.basemodel import base_model_dir
from core.config import Settings
from gateway.vllm_server import VLLM_VENV, vllm_python


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
    write_results(doc, out)
    progress.say(f"wrote {out}/report.md, paper.json, quality_vs_tokens.png, latency.png, readme_section.md")
    print("\n" + (out / "report.md").read_text().split("## What the figures say")[0])
    return out


def _measure_all(kind: str, settings: Settings, model_dir: Path, example: Any, adapters: dict[str, AdapterInfo],
                 work: Workload, options: PaperOptions, out: Path, progress: Progress) -> list[Measurement]:
    """Every row in table order: the engine's rows and row 8 on one start, row 4 on a second and row 9 (the
    merged adapter) on a third (vLLM only)."""
    by_id = {c.id: c for c in CONDITIONS}
    direct = [c for c in CONDITIONS if not c.prefix_caching and not c.gateway and not c.merged]
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
    merged = by_id["promptintern_merged"]
    if kind == "vllm":
        progress.say("phase 3/4: third vLLM start, the PromptIntern adapter merged into the weights: row 9")
        with tempfile.TemporaryDirectory(prefix="promptintern-paper-merged-") as tmp, \
                serving_merged(settings, model_dir, adapters["promptintern"], eager=options.eager, root=Path(tmp),
                               log_dir=log_dir, progress=progress) as s:
            results[merged.id] = asyncio.run(measure_on_engine(s, [merged], adapters, work, options.max_new_tokens,
                                                               progress))[0]
    else:
        results[merged.id] = Measurement(condition=merged)
    return [results[c.id] for c in CONDITIONS]


def _annotate(measurements: list[Measurement], adapters: dict[str, AdapterInfo],
              compressed: Sequence[CompressedTemplate], kind: str, why: str) -> None:
    """Each row's note: what was compressed, where its adapter came from, how row 8 compares with row 7."""
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
        if m.condition.merged:
            m.note = (f"row 7's adapter ({adapters[m.condition.adapter or 'promptintern'].source}) merged into the "
                      "base weights, on a vLLM of its own without LoRA (its own start)" if kind == "vllm"
                      else f"merged serving runs on vLLM only ({why})")
    pi = by_id.get("promptintern")
    for other in (by_id.get("promptintern_gateway"), by_id.get("promptintern_merged")):
        if pi and other and other.measured and pi.measured:
            same = sum(x == y for x, y in zip(pi.predictions, other.predictions, strict=False))
            other.note += f"; {same}/{other.n} answers identical to row 7's"


def _settings_doc(settings: Settings, options: PaperOptions, example: Any, n: int, kind: str,
                  compressed: Sequence[CompressedTemplate], prices: Prices) -> dict[str, Any]:
    """`paper.json`'s settings: the command as typed, the engine, the data and decoding, prices, compression."""
    flags = [("--quick", options.quick), ("--fast-start", options.fast_start), ("--skip-vllm", options.skip_vllm),
             (f"--requests {options.rows}", options.rows is not None),
             (f"--throughput-requests {options.throughput_requests}", options.throughput_requests is not None)]
    command = " ".join(["promptintern bench paper", *(flag for flag, on in flags if on)])
    if kind == "vllm":
        engine_detail = f"{vllm_version()}, " + (
            "eager mode (--enforce-eager -O0: fast start, slower serving)" if options.eager
            else "compiled (vLLM's default optimisation level)") + f", {vllm_threads(settings)} OpenMP threads"
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
        "prefix_caching": ("off for every row except row 4 (a second vLLM start with it on); row 9's merged "
                           "engine is a third start" if kind == "vllm"
                           else "none (the embedded engine has no prefix cache)"),
        "price_input_per_1k": prices.input_per_1k, "price_output_per_1k": prices.output_per_1k,
        "compression": [{"keep_ratio": c.keep_ratio, "kept_tokens": c.kept_tokens, "total_tokens": c.total_tokens}
                        for c in compressed],
    }


def write_results(doc: dict[str, Any], out: Path) -> None:
    """paper.json, the plots, report.md and readme_section.md in `out`, all from `doc`."""
    (out / "paper.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    write_plots(doc, out)
    (out / "report.md").write_text(render_report(doc))
    (out / "readme_section.md").write_text(render_readme_section(doc, str(out / "report.md")))


def rebuild_report(out: Path) -> None:
    """Re-render report.md, the plots and readme_section.md from an existing paper.json; an adapter entry
    without the trainer's own evaluation gets it from its manifest when the cache key still matches."""
    from core.adapter_store import read_manifest

    def write(doc: dict[str, Any]) -> Path:
        complete_rows(doc["rows"])
        for adapter in doc.get("adapters", []):
            manifest = read_manifest(Path(adapter["path"])) or {}
            if adapter.get("evaluation") is None and manifest.get("cache_key") == adapter.get("cache_key"):
                adapter["evaluation"] = manifest_evaluation(manifest)
        write_results(doc, out)
        return out

    rebuild_from(out / "paper.json", "run `promptintern bench paper` first, or point --out at a results folder",
                 write)
