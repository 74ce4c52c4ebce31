"""The paper's table from measured figures: cost, ratios to row 1, `paper.json`, the Markdown report, the plots.

Everything here is a pure function of what `promptintern bench paper` measured (no model), so the
report can be rebuilt from `paper.json` and tested on synthetic figures, and no number in it is
typed by hand.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Inputs = Literal["full", "bare", "compressed"]

ROW_IDS: tuple[str, ...] = (
    "base_full", "base_bare", "compressed_keep0.5", "compressed_keep0.2", "base_full_prefix_cache",
    "full_prompt_ft", "direct_ft", "promptintern", "promptintern_gateway",
)
FIGURE_KEYS: tuple[str, ...] = (
    "input_tokens", "bleu", "exact_match", "latency_p50_s", "latency_p95_s", "throughput_rps_c8",
    "cost_per_1k_requests_usd", "training_time_s", "token_reduction", "speedup", "cost_saving",
)
BASELINE = "base_full"
# The paper's headline figures (PromptIntern vs the full prompt), as the issue quotes them.
PAPER_HEADLINE = {"token_reduction": 0.90, "speedup": 4.2, "cost_saving": 0.883}
PAPER_SHOWN = {"token_reduction": ">90%", "speedup": "4.2×", "cost_saving": "88.3%"}


@dataclass(frozen=True)
class Condition:
    """One row of the table: what the engine receives, on which weights, with or without prefix caching."""

    id: str
    number: str
    label: str
    inputs: Inputs
    adapter: str | None = None  # the trainer schedule whose adapter serves the row
    keep_ratio: float | None = None
    prefix_caching: bool = False
    gateway: bool = False


CONDITIONS: tuple[Condition, ...] = (
    Condition("base_full", "1", "Base model, full prompt (instructions + few-shot examples)", "full"),
    Condition("base_bare", "2", "Base model, bare query", "bare"),
    Condition("compressed_keep0.5", "3a", "Compressed prompt, keep_ratio 0.5 (LLMLingua-style)", "compressed",
              keep_ratio=0.5),
    Condition("compressed_keep0.2", "3b", "Compressed prompt, keep_ratio 0.2 (LLMLingua-style)", "compressed",
              keep_ratio=0.2),
    Condition("base_full_prefix_cache", "4", "Base model, full prompt, vLLM automatic prefix caching", "full",
              prefix_caching=True),
    Condition("full_prompt_ft", "5", "Full-prompt fine-tuning (prompt kept at inference)", "full",
              adapter="full_prompt"),
    Condition("direct_ft", "6", "Direct fine-tuning, bare query", "bare", adapter="direct"),
    Condition("promptintern", "7", "PromptIntern (progressive), bare query", "bare", adapter="promptintern"),
    Condition("promptintern_gateway", "8", "PromptIntern through the gateway (app sends the full prompt)", "full",
              adapter="promptintern", gateway=True),
)


@dataclass(frozen=True)
class Prices:
    """USD per 1,000 input and output tokens (PRICE_INPUT_PER_1K, PRICE_OUTPUT_PER_1K)."""

    input_per_1k: float
    output_per_1k: float

    def per_1k_requests(self, input_tokens: float, output_tokens: float) -> float:
        """Cost of 1,000 requests of this mean size: tokens x price per 1,000 tokens, times 1,000 / 1,000."""
        return input_tokens * self.input_per_1k + output_tokens * self.output_per_1k


@dataclass
class Measurement:
    """What one row measured; figures stay None where the row does not apply on this engine."""

    condition: Condition
    n: int = 0
    input_tokens: float | None = None
    original_input_tokens: float | None = None
    output_tokens: float | None = None
    bleu: float | None = None
    bleu_ci95: tuple[float, float] | None = None
    exact_match: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    throughput_rps_c8: float | None = None
    throughput_requests: int = 0
    training_time_s: float | None = None
    seconds: float | None = None
    note: str = ""
    samples: list[dict[str, str]] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return bool(self.latencies_s)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (the same definition as `bench engines`)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bootstrap_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], *, samples: int = 200,
                   seed: int = 0) -> tuple[float, float]:
    """95% interval of corpus BLEU over test rows resampled with replacement (how much the row set matters)."""
    from trainer.evaluate import score

    rng = random.Random(seed)
    n = len(predictions)
    values = []
    for _ in range(samples):
        picks = [rng.randrange(n) for _ in range(n)]
        values.append(score([predictions[i] for i in picks], [references[i] for i in picks])["bleu"])
    values.sort()
    return values[int(0.025 * samples)], values[min(samples - 1, int(0.975 * samples))]


def project_seconds(measurements: Sequence[Measurement], total_s: float, *, rows: int, warmup: int,
                    throughput_requests: int) -> float:
    """How long a run with `rows` test rows would take at the rates this run measured (same engine mode)."""
    serving = sum(m.seconds or 0.0 for m in measurements)
    projected = max(0.0, total_s - serving)  # start-ups, loading, compression, writing
    for m in measurements:
        if m.measured and m.throughput_rps_c8:
            projected += statistics.fmean(m.latencies_s) * (rows + warmup) + throughput_requests / m.throughput_rps_c8
    return projected


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def base_figures(m: Measurement, prices: Prices) -> dict[str, float | None]:
    """A row's own figures (no ratios); None where it measured nothing."""
    if not m.measured:
        return {"input_tokens": None, "bleu": None, "exact_match": None, "latency_p50_s": None,
                "latency_p95_s": None, "throughput_rps_c8": m.throughput_rps_c8,
                "cost_per_1k_requests_usd": None, "training_time_s": m.training_time_s}
    cost = None
    if m.input_tokens is not None and m.output_tokens is not None:
        cost = prices.per_1k_requests(m.input_tokens, m.output_tokens)
    return {
        "input_tokens": m.input_tokens, "bleu": m.bleu, "exact_match": m.exact_match,
        "latency_p50_s": statistics.median(m.latencies_s), "latency_p95_s": percentile(m.latencies_s, 0.95),
        "throughput_rps_c8": m.throughput_rps_c8, "cost_per_1k_requests_usd": cost,
        "training_time_s": m.training_time_s,
    }


def ratios(row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """A row against row 1: fraction of input tokens removed, latency speed-up (p50), fraction of cost saved."""
    tokens = _ratio(row["input_tokens"], baseline["input_tokens"])
    speedup = _ratio(baseline["latency_p50_s"], row["latency_p50_s"])
    cost = _ratio(row["cost_per_1k_requests_usd"], baseline["cost_per_1k_requests_usd"])
    return {
        "token_reduction": None if tokens is None else 1.0 - tokens,
        "speedup": speedup,
        "cost_saving": None if cost is None else 1.0 - cost,
    }


ROUNDING = {"input_tokens": 1, "bleu": 2, "exact_match": 2, "latency_p50_s": 3, "latency_p95_s": 3,
            "throughput_rps_c8": 3, "cost_per_1k_requests_usd": 6, "training_time_s": 1,
            "token_reduction": 4, "speedup": 3, "cost_saving": 4}


def table_rows(measurements: Sequence[Measurement], prices: Prices) -> list[dict[str, Any]]:
    """The JSON rows: id, label, every figure key (None where it does not apply), ratios to row 1, extras."""
    figures = {m.condition.id: base_figures(m, prices) for m in measurements}
    if BASELINE not in figures:
        raise ValueError(f"the table needs row {BASELINE!r} to compute ratios")
    baseline = figures[BASELINE]
    rows = []
    for m in measurements:
        values: dict[str, Any] = {**figures[m.condition.id], **ratios(figures[m.condition.id], baseline)}
        row: dict[str, Any] = {"id": m.condition.id, "row": m.condition.number, "label": m.condition.label}
        row.update({key: _round(values[key], ROUNDING[key]) for key in FIGURE_KEYS})
        row.update({
            "n": m.n,
            "output_tokens": _round(m.output_tokens, 2),
            "original_input_tokens": _round(m.original_input_tokens, 1),
            "bleu_ci95": [round(v, 2) for v in m.bleu_ci95] if m.bleu_ci95 else None,
            "throughput_requests": m.throughput_requests or None,
            "throughput_ratio": _round(_ratio(values["throughput_rps_c8"], baseline["throughput_rps_c8"]), 3),
            "inputs": m.condition.inputs, "adapter": m.condition.adapter, "keep_ratio": m.condition.keep_ratio,
            "prefix_caching": m.condition.prefix_caching, "via_gateway": m.condition.gateway,
            "seconds": _round(m.seconds, 1), "note": m.note, "samples": m.samples, "predictions": m.predictions,
        })
        rows.append(row)
    return rows


def paper_document(*, engine: str, machine: dict[str, Any], date: str, rows: list[dict[str, Any]],
                   settings: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`paper.json`: `{engine, machine, date, rows, ...}` with the headline comparison to the paper."""
    by_id = {r["id"]: r for r in rows}
    ours = by_id.get("promptintern", {})
    headline = {
        "ours": {k: ours.get(k) for k in PAPER_HEADLINE},
        "paper": dict(PAPER_HEADLINE),
        "compared": "row 7 (PromptIntern, bare query) against row 1 (base model, full prompt)",
    }
    return {"engine": engine, "machine": machine, "date": date, "rows": rows, "settings": settings,
            "headline": headline, **(extra or {})}


# -- Markdown -------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("#", "condition", "input tokens", "BLEU", "EM %", "p50 s", "p95 s", "req/s @8", "$ / 1k req",
              "training", "tokens −", "speed-up", "cost −")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        cells = (
            r["row"], r["label"], _fmt(r["input_tokens"], ".0f"), _fmt(r["bleu"], ".1f"),
            _fmt(r["exact_match"], ".1f"), _fmt(r["latency_p50_s"], ".2f"), _fmt(r["latency_p95_s"], ".2f"),
            _fmt(r["throughput_rps_c8"], ".2f"), _fmt(r["cost_per_1k_requests_usd"], ".4f"),
            _duration(r["training_time_s"]), _pct(r["token_reduction"]), _times(r["speedup"]),
            _pct(r["cost_saving"]),
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _speed(value: float | None) -> str:
    """A latency ratio in words: '2.10× faster' or '1.90× slower'."""
    if value is None:
        return "—"
    return f"{value:.2f}× faster" if value >= 1 else f"{1 / value:.2f}× slower"


def _compare(ours: float | None, key: str) -> str:
    target = PAPER_SHOWN[key]
    if ours is None:
        return f"not measured (paper: {target})"
    shown = f"{_times(ours)} ({_speed(ours)})" if key == "speedup" else _pct(ours)
    verdict = "at or above" if ours >= PAPER_HEADLINE[key] else "below"
    return f"{shown} — {verdict} the paper's {target}"


def findings(doc: dict[str, Any]) -> list[str]:
    """Sentences whose every number is read from the document."""
    by_id = {r["id"]: r for r in doc["rows"]}
    out: list[str] = []
    pi, base = by_id.get("promptintern"), by_id.get(BASELINE)
    head = doc["headline"]
    if pi and base and pi["input_tokens"] is not None:
        out.append(
            f"PromptIntern (row 7) against the full prompt (row 1): input tokens "
            f"{_compare(head['ours']['token_reduction'], 'token_reduction')}; "
            f"median-latency speed-up {_compare(head['ours']['speedup'], 'speedup')}; "
            f"cost {_compare(head['ours']['cost_saving'], 'cost_saving')}.")
    out += _where_time_goes(by_id)
    out += _under_load(by_id)
    out += _quality(by_id)
    gw = by_id.get("promptintern_gateway")
    if pi and gw and gw["latency_p50_s"] is not None and pi["latency_p50_s"] is not None:
        out.append(
            f"End to end (row 8): the app sent {_fmt(gw.get('original_input_tokens'), '.0f')} prompt tokens, the "
            f"model processed {_fmt(gw['input_tokens'], '.0f')} (row 7: {_fmt(pi['input_tokens'], '.0f')}); median "
            f"latency {gw['latency_p50_s']:.2f} s vs {pi['latency_p50_s']:.2f} s on the engine directly "
            f"({gw['latency_p50_s'] / pi['latency_p50_s']:.2f}×); {gw.get('note') or ''}".rstrip("; ") + ".")
    apc = by_id.get("base_full_prefix_cache")
    if apc and apc["latency_p50_s"] is not None and pi and pi["latency_p50_s"] is not None:
        out.append(
            f"Prefix caching (row 4) makes the full prompt {_speed(apc['speedup'])} than row 1 without removing a "
            f"token ({apc['latency_p50_s']:.2f} s median); PromptIntern is "
            f"{_speed(apc['latency_p50_s'] / pi['latency_p50_s'])} than that ({pi['latency_p50_s']:.2f} s), and its "
            f"billed input is {_pct(_reduction(pi['input_tokens'], apc['input_tokens']))} smaller (an API bills "
            "cached tokens at a discount at best; this table bills them in full).")
    elif apc:
        out.append(f"Row 4 (prefix caching) was not measured: {apc.get('note') or 'no vLLM'}.")
    for rid in ("compressed_keep0.5", "compressed_keep0.2"):
        c = by_id.get(rid)
        if c and base and c["bleu"] is not None and base["bleu"] is not None:
            out.append(
                f"Prompt compression at keep_ratio {c['keep_ratio']} (row {c['row']}): "
                f"{_pct(c['token_reduction'])} fewer tokens, BLEU {c['bleu']:.1f} (row 1: {base['bleu']:.1f}), "
                f"{_speed(c['speedup'])} than row 1.")
    return out


def _under_load(by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Throughput at concurrency 8, where the removed prefill shows even when single-request latency does not."""
    pi, base, apc = (by_id.get(k) for k in ("promptintern", BASELINE, "base_full_prefix_cache"))
    if not (_have(pi, "throughput_rps_c8") and _have(base, "throughput_rps_c8")):
        return []
    assert pi is not None and base is not None
    ours, theirs = pi["throughput_rps_c8"], base["throughput_rps_c8"]
    text = (f"Under load ({pi.get('throughput_requests') or '?'} requests at concurrency 8): PromptIntern serves "
            f"{ours:.2f} requests/s against row 1's {theirs:.2f} ({ours / theirs:.2f}×)")
    if _have(apc, "throughput_rps_c8"):
        assert apc is not None
        text += f" and prefix caching's {apc['throughput_rps_c8']:.2f} ({ours / apc['throughput_rps_c8']:.2f}×)"
    return [text + ": when the engine batches requests, each one without the long prompt takes less of a step, "
                   "so the token saving shows more in throughput than in one request's latency."]


def _quality(by_id: dict[str, dict[str, Any]]) -> list[str]:
    pi = by_id.get("promptintern")
    out = []
    for other, name in (("direct_ft", "direct fine-tuning (row 6)"),
                        ("full_prompt_ft", "full-prompt fine-tuning (row 5)"),
                        (BASELINE, "the base model with the full prompt (row 1)")):
        o = by_id.get(other)
        if pi and o and pi["bleu"] is not None and o["bleu"] is not None:
            overlap = _overlap(pi.get("bleu_ci95"), o.get("bleu_ci95"))
            out.append(
                f"Quality, PromptIntern vs {name}: BLEU {pi['bleu']:.1f} vs {o['bleu']:.1f}, exact match "
                f"{pi['exact_match']:.1f}% vs {o['exact_match']:.1f}% on {pi['n']} test rows"
                + (" (their 95% bootstrap intervals overlap: the difference is within what the choice of test "
                   "rows moves)" if overlap else " (their 95% bootstrap intervals do not overlap)") + ".")
    return out


def _have(row: dict[str, Any] | None, *keys: str) -> bool:
    return row is not None and all(row.get(k) is not None for k in keys)


def _where_time_goes(by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Prompt tokens against answer tokens and adapter overhead, from rows that differ in one thing."""
    full, bare, pi, ft = (by_id.get(k) for k in (BASELINE, "base_bare", "promptintern", "full_prompt_ft"))
    keys = ("input_tokens", "latency_p50_s", "output_tokens")
    out = []
    if _have(full, *keys) and _have(bare, *keys):
        assert full is not None and bare is not None
        extra = full["input_tokens"] - bare["input_tokens"]
        cheap = full["latency_p50_s"] < 1.5 * bare["latency_p50_s"]
        out.append(
            f"Rows 1 and 2 (same weights, only the prompt differs): {full['latency_p50_s']:.2f} s median with the "
            f"{full['input_tokens']:.0f}-token prompt and {full['output_tokens']:.1f} answer tokens on average, "
            f"{bare['latency_p50_s']:.2f} s with the {bare['input_tokens']:.0f}-token bare query and "
            f"{bare['output_tokens']:.1f} answer tokens: "
            + (f"on this engine prefilling the {extra:.0f} extra prompt tokens costs little next to decoding the "
               "answer, so removing them cannot buy much speed here." if cheap else
               f"the {extra:.0f} extra prompt tokens are a large share of a request's time here."))
    if _have(full, *keys) and _have(pi, *keys) and pi["output_tokens"] > full["output_tokens"]:  # type: ignore[index]
        assert full is not None and pi is not None
        out.append(
            f"PromptIntern's answers are longer than row 1's ({pi['output_tokens']:.1f} against "
            f"{full['output_tokens']:.1f} tokens on average), and every answer token is decoded one at a time, "
            "which lowers its speed-up and its cost saving.")
    if _have(bare, *keys) and _have(pi, *keys) and bare["output_tokens"] and pi["output_tokens"]:  # type: ignore[index]
        assert bare is not None and pi is not None
        ours = 1000 * pi["latency_p50_s"] / pi["output_tokens"]
        plain = 1000 * bare["latency_p50_s"] / bare["output_tokens"]
        out.append(
            f"Rows 2 and 7 get the same bare input: about {plain:.0f} ms per answer token on the base model against "
            f"{ours:.0f} ms with the PromptIntern adapter (median latency over mean answer length)"
            + (": the extra cost of serving a LoRA adapter on this engine." if ours > plain
               else ": the adapter adds no per-token cost visible here."))
    if _have(full, *keys) and _have(ft, *keys):
        assert full is not None and ft is not None
        out.append(
            f"Rows 1 and 5 get the same full prompt: {full['latency_p50_s']:.2f} s median on the base model, "
            f"{ft['latency_p50_s']:.2f} s through the full-prompt adapter ({ft['output_tokens']:.1f} vs "
            f"{full['output_tokens']:.1f} answer tokens): an adapter that keeps the long prompt pays for both.")
    return out


def _reduction(ours: float | None, other: float | None) -> float | None:
    r = _ratio(ours, other)
    return None if r is None else 1.0 - r


def _overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    return bool(a and b and a[0] <= b[1] and b[0] <= a[1])


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
        f"Measured {_date(doc['date'])} on {machine.get('description', '?')} with the **{doc['engine']}** engine "
        f"({s.get('engine_detail', '')}); {s.get('mode_detail', '')}. Produced by `{s.get('command', '')}` "
        f"in {_duration(doc.get('total_seconds'))}.",
        "",
        markdown_table(doc["rows"]),
        "",
        "Ratios (tokens −, speed-up, cost −) are against row 1. Speed-up is row 1's median latency over the row's. "
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
                     f"{_duration(doc['projected_full_run_seconds'])} at this run's rates and engine mode")
    for c in s.get("compression", []):
        lines.append(f"Compression at keep_ratio {c['keep_ratio']}: the static message(s) of the template "
                     f"({c['total_tokens']} tokens) pruned to {c['kept_tokens']} by the base model's per-token "
                     "self-information (the trainer's compressor); the query and its frame are kept")
    return lines


def _adapter_lines(doc: dict[str, Any]) -> list[str]:
    out = []
    for a in doc.get("adapters", []):
        line = (f"{a['schedule']}: `{a['path']}` ({a['source']}; cache key {a['cache_key'][:12]}…; "
                f"training {_duration(a.get('training_seconds'))}; created {a.get('created')})")
        evaluation = a.get("evaluation")
        if evaluation:
            figures = "; ".join(
                f"{name} BLEU {_fmt(c.get('bleu'), '.1f')}, EM {_fmt(c.get('exact_match'), '.1f')}%, "
                f"{_fmt(c.get('latency_s'), '.2f')} s"
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
        lines += [f"Query: {query} — reference: {_code(sample['reference'])}", ""]
        lines += [f"- row {r['row']}: {_code(r['samples'][i]['prediction'])}" for r in rows if i < len(r["samples"])]
        lines.append("")
    return lines


def _code(text: str) -> str:
    """Inline code that survives backticks in the text."""
    if not text:
        return "(empty)"
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _date(iso: str) -> str:
    try:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def render_readme_section(doc: dict[str, Any], report_path: str) -> str:
    """The README's section, generated so that no figure is typed in by hand (paste it whole; a test checks
    that the README carries the committed results folder's section verbatim)."""
    folder = report_path.rsplit("/", 1)[0] if "/" in report_path else "."
    machine = doc["machine"].get("description", "?")
    return "\n".join([
        "## The paper's table on this machine",
        "",
        f"`{doc['settings'].get('command', '')}` — measured {_date(doc['date'])} on {machine}, "
        f"{doc['engine']} engine ({doc['settings'].get('engine_detail', '')}), "
        f"{doc['settings'].get('mode_detail', '')}, in {_duration(doc.get('total_seconds'))}. "
        f"Full report: [{report_path}]({report_path}).",
        "",
        markdown_table(doc["rows"]),
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


# -- plots ----------------------------------------------------------------------------------------


def write_plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """quality_vs_tokens.png and latency.png (matplotlib's Figure API, no global state)."""
    return [_quality_plot(doc, out / "quality_vs_tokens.png"), _latency_plot(doc, out / "latency.png")]


def _quality_plot(doc: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = [r for r in doc["rows"] if r["input_tokens"] is not None and r["bleu"] is not None]
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    for ax, key, title in zip(fig.subplots(1, 2), ("bleu", "exact_match"), ("BLEU", "exact match %"), strict=True):
        for r in rows:
            trained = r["adapter"] is not None
            ax.scatter(r["input_tokens"], r[key], s=60, marker="o" if trained else "s",
                       color="tab:green" if trained else "tab:gray", zorder=3)
        for (x, y), numbers in _same_points(rows, key).items():
            ax.annotate(",".join(numbers), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([t for t in (25, 50, 100, 200, 400, 800, 1600, 3200)
                       if min(r["input_tokens"] for r in rows) / 2 <= t <= 2 * max(r["input_tokens"] for r in rows)])
        ax.set_ylim(0, max(5.0, 1.15 * max(r[key] for r in rows)))
        ax.set_xlabel("input tokens per request (log scale)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"NL2Bash, {doc['settings'].get('base_model', '')}: quality against tokens per request\n"
                 "green circles: fine-tuned, grey squares: base model; labels are row numbers", fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def _same_points(rows: Sequence[dict[str, Any]], key: str) -> dict[tuple[float, float], list[str]]:
    """Row numbers by plotted point, so rows that coincide (7 and 8) share one label."""
    points: dict[tuple[float, float], list[str]] = {}
    for r in rows:
        points.setdefault((round(r["input_tokens"], 0), round(r[key], 1)), []).append(r["row"])
    return points


def _latency_plot(doc: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    rows = [r for r in doc["rows"] if r["latency_p50_s"] is not None]
    fig = Figure(figsize=(9, 0.5 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    labels = [f"{r['row']}. {r['id']} ({r['input_tokens']:.0f} tok)" for r in rows][::-1]
    p50 = [r["latency_p50_s"] for r in rows][::-1]
    p95 = [r["latency_p95_s"] for r in rows][::-1]
    ax.barh(labels, p95, color="tab:blue", alpha=0.25, label="p95")
    ax.barh(labels, p50, color="tab:blue", label="median")
    for y, value in enumerate(p50):
        ax.annotate(f"{value:.2f} s", (value, y), textcoords="offset points", xytext=(4, -3), fontsize=8)
    ax.set_xlabel("seconds per request at concurrency 1")
    ax.set_title(f"Latency by condition ({doc['engine']} engine, {doc['machine'].get('cores', '?')} CPU cores)",
                 fontsize=10)
    ax.legend(loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)
    return path
