"""The Markdown report and the README's section, rendered from `paper.json` alone (`--rebuild` gives the same
files from the same JSON): table, findings, caveats, settings, adapters, machine, sample answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.paper.findings import findings
from benchmarks.paper.formatting import code, date_utc, duration, fmt, pct, times


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table, one line per row, every figure formatted (a dash where it does not apply)."""
    header = ("#", "condition", "input tokens", "BLEU", "EM %", "p50 s", "p95 s", "req/s @8", "$ / 1k req",
              "training", "tokens −", "speed-up", "cost −", "speed-up vs 5")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        cells = (
            r["row"], r["label"], fmt(r["input_tokens"], ".0f"), fmt(r["bleu"], ".1f"),
            fmt(r["exact_match"], ".1f"), fmt(r["latency_p50_s"], ".2f"), fmt(r["latency_p95_s"], ".2f"),
            fmt(r["throughput_rps_c8"], ".2f"), fmt(r["cost_per_1k_requests_usd"], ".4f"),
            duration(r["training_time_s"]), pct(r["token_reduction"]), times(r["speedup"]),
            pct(r["cost_saving"]), times(r.get("speedup_vs_ft")),
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


CAVEATS = """\
- **Scale.** The paper fine-tunes multi-billion-parameter models on GPUs and reports on large test
  sets. Here a 135M-parameter model serves on 2 CPU cores; absolute quality is low for every row,
  and the test slice is small, so BLEU differences of a few points are noise (see the bootstrap
  intervals in `paper.json`, and the trainer's own evaluation of each adapter on all test rows
  under Adapters).
- **Speed.** Removing the prompt saves its prefill, but the answer still has to be decoded token
  by token, so the speed-up is bounded by the prompt's share of a request's time. That share
  depends on the prompt's length against the answer's and on the hardware (prefill is parallel
  work, decoding is sequential); the paper's 4.2× comes from its models, GPUs, prompts and
  answers, the figure here from SmolLM2 on these cores with this prompt.
- **Cost.** Cost is computed from token counts at API list prices (PRICE_INPUT_PER_1K,
  PRICE_OUTPUT_PER_1K), as a hosted API bills, not from this machine's electricity. Output tokens
  are billed too, so the saving is smaller than the token reduction when answers are long.
- **Training time** is read from each adapter's manifest (measured when it was trained, on this
  machine, possibly while it was shared); cached adapters are reused, not retrained.
"""


def render_report(doc: dict[str, Any]) -> str:
    """The Markdown report: table, findings, settings, machine, adapters, plots."""
    s = doc["settings"]
    machine = doc["machine"]
    lines = [
        "# PromptIntern on this machine: the paper's table",
        "",
        f"Measured {date_utc(doc['date'])} on {machine.get('description', '?')} with the **{doc['engine']}** engine "
        f"({s.get('engine_detail', '')}); {s.get('mode_detail', '')}. Produced by `{s.get('command', '')}` "
        f"in {duration(doc.get('total_seconds'))}.",
        "",
        markdown_table(doc["rows"]),
        "",
        "Ratios (tokens −, speed-up, cost −) are against row 1. Speed-up is row 1's median latency over the row's; "
        "speed-up vs 5 is row 5's (full-prompt fine-tuning: the quality of a trained adapter, the prompt kept) "
        "over the row's. "
        "Cost per 1,000 requests = mean input tokens × PRICE_INPUT_PER_1K + mean output tokens × "
        f"PRICE_OUTPUT_PER_1K (here ${s['price_input_per_1k']} and ${s['price_output_per_1k']} per 1,000 tokens). "
        "A dash: the figure does not apply (no training, or the row cannot run on this engine).",
        "",
        "## What the figures say",
        "",
        *[f"- {f}" for f in findings(doc)],
        "",
        "## Where this differs from the paper, and why",
        "",
        CAVEATS,
        "## Settings",
        "",
        *[f"- {line}" for line in _settings_lines(doc)],
        "",
        "## Adapters",
        "",
        *[f"- {line}" for line in _adapter_lines(doc)],
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        "## Plots",
        "",
        "![quality against input tokens](quality_vs_tokens.png)",
        "",
        "![latency by condition](latency.png)",
        "",
        "## Sample answers (first test rows)",
        "",
        *_sample_lines(doc),
        "",
        "The same figures are in `paper.json` for tools.",
        "",
    ]
    return "\n".join(lines)


def _settings_lines(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    lines = [
        f"Task: {s.get('task', '')}",
        f"Test rows: {s.get('test_rows')} of {s.get('test_rows_available')} (the trainer's deterministic split); "
        f"{s.get('train_rows')} training rows; the prompt has {s.get('examples')} few-shot examples",
        f"Base model: {s.get('base_model')}",
        f"Decoding: {s.get('decoding')}",
        f"Latency: concurrency 1 over the test rows, the same generations that are scored; "
        f"{s.get('warmup')} warm-up requests per row, not counted",
        f"Throughput: {s.get('throughput_requests')} requests at concurrency 8 per row",
        f"Prefix caching: {s.get('prefix_caching')}",
    ]
    if s.get("max_lora_rank"):
        lines.append(f"LoRA slots: MAX_LORA_RANK {s['max_lora_rank']}, the largest rank of the adapters served "
                     "(vLLM sizes every LoRA layer's work by it)")
    if doc.get("projected_full_run_seconds"):
        lines.append(f"A full run ({s.get('test_rows_available')} test rows) would take about "
                     f"{duration(doc['projected_full_run_seconds'])} at this run's rates and engine mode")
    for c in s.get("compression", []):
        lines.append(f"Compression at keep_ratio {c['keep_ratio']}: the static message(s) of the template "
                     f"({c['total_tokens']} tokens) pruned to {c['kept_tokens']} by the base model's per-token "
                     "self-information (the trainer's compressor); the query and its frame are kept")
    return lines


def _adapter_lines(doc: dict[str, Any]) -> list[str]:
    out = []
    for a in doc.get("adapters", []):
        line = (f"{a['schedule']}: `{a['path']}` ({a['source']}; cache key {a['cache_key'][:12]}…; "
                f"training {duration(a.get('training_seconds'))}; created {a.get('created')})")
        evaluation = a.get("evaluation")
        if evaluation:
            figures = "; ".join(
                f"{name} BLEU {fmt(c.get('bleu'), '.1f')}, EM {fmt(c.get('exact_match'), '.1f')}%, "
                f"{fmt(c.get('latency_s'), '.2f')} s"
                for name, c in evaluation.get("conditions", {}).items() if name.startswith("adapter"))
            line += (f". The trainer's own evaluation in its manifest ({evaluation.get('rows')} test rows, HF "
                     f"transformers, {evaluation.get('decoding')}, no stop at newline): {figures}")
        out.append(line)
    return out or ["none"]


def _sample_lines(doc: dict[str, Any]) -> list[str]:
    rows = [r for r in doc["rows"] if r.get("samples")]
    if not rows:
        return ["(none)"]
    lines = []
    for i, sample in enumerate(rows[0]["samples"]):
        query = sample["query"].replace("*", "\\*").replace("_", "\\_")
        lines += [f"Query: {query} — reference: {code(sample['reference'])}", ""]
        lines += [f"- row {r['row']}: {code(r['samples'][i]['prediction'])}" for r in rows if i < len(r["samples"])]
        lines.append("")
    return lines


def render_readme_section(doc: dict[str, Any], report_path: str) -> str:
    """The README's section, generated so that no figure is typed in by hand (paste it whole; a test checks
    that the README carries the committed results folder's section verbatim)."""
    folder = report_path.rsplit("/", 1)[0] if "/" in report_path else "."
    machine = doc["machine"].get("description", "?")
    return "\n".join([
        "## The paper's table on this machine",
        "",
        f"`{doc['settings'].get('command', '')}` — measured {date_utc(doc['date'])} on {machine}, "
        f"{doc['engine']} engine ({doc['settings'].get('engine_detail', '')}), "
        f"{doc['settings'].get('mode_detail', '')}, in {duration(doc.get('total_seconds'))}. "
        f"Full report: [{report_path}]({report_path}).",
        "",
        markdown_table(doc["rows"]),
        "",
        "Speed-up is row 1's median latency over the row's; speed-up vs 5 is row 5's (full-prompt fine-tuning: "
        "trained answers, the prompt kept) over the row's.",
        "",
        *[f"- {f}" for f in findings(doc)],
        "",
        f"Plots: [quality against input tokens]({folder}/quality_vs_tokens.png), "
        f"[latency by condition]({folder}/latency.png); the figures as JSON: "
        f"[{folder}/paper.json]({folder}/paper.json). "
        f"Where and why this differs from the paper ({doc['settings'].get('base_model', 'a small model')} on "
        "CPU cores against the paper's multi-billion-parameter models on GPUs) is in the report's section "
        "*Where this differs from the paper*.",
        "",
    ])
