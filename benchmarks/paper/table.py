"""The paper's table from measured figures: cost, ratios to row 1, rounding, and the `paper.json` document.

Everything here is a pure function of what `promptintern bench paper` measured (no model), so the
report can be rebuilt from `paper.json` and tested on synthetic figures, and no number in it is
typed by hand.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.latency import percentile
from benchmarks.paper.conditions import CONDITIONS, Measurement, Prices

FIGURE_KEYS: tuple[str, ...] = (
    "input_tokens", "bleu", "exact_match", "latency_p50_s", "latency_p95_s", "throughput_rps_c8",
    "cost_per_1k_requests_usd", "training_time_s", "token_reduction", "speedup", "cost_saving", "speedup_vs_ft",
)
BASELINE = "base_full"
# The second speed-up column's reference: row 5 answers as well as an adapter does, with the prompt kept.
FINE_TUNED_BASELINE = "full_prompt_ft"
# The paper's headline figures (PromptIntern vs the full prompt), as the issue quotes them.
PAPER_HEADLINE = {"token_reduction": 0.90, "speedup": 4.2, "cost_saving": 0.883}
PAPER_SHOWN = {"token_reduction": ">90%", "speedup": "4.2×", "cost_saving": "88.3%"}
ROUNDING = {"input_tokens": 1, "bleu": 2, "exact_match": 2, "latency_p50_s": 3, "latency_p95_s": 3,
            "throughput_rps_c8": 3, "cost_per_1k_requests_usd": 6, "training_time_s": 1,
            "token_reduction": 4, "speedup": 3, "cost_saving": 4, "speedup_vs_ft": 3}


def project_seconds(measurements: Sequence[Measurement], total_s: float, *, rows: int, warmup: int,
                    throughput_requests: int) -> float:
    """How long a run with `rows` test rows would take at the rates this run measured (same engine mode)."""
    serving = sum(m.seconds or 0.0 for m in measurements)
    projected = max(0.0, total_s - serving)  # start-ups, loading, compression, writing
    for m in measurements:
        if m.measured and m.throughput_rps_c8:
            projected += statistics.fmean(m.latencies_s) * (rows + warmup) + throughput_requests / m.throughput_rps_c8
    return projected


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None where either is missing or the denominator is 0."""
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
    tokens = ratio(row["input_tokens"], baseline["input_tokens"])
    speedup = ratio(baseline["latency_p50_s"], row["latency_p50_s"])
    cost = ratio(row["cost_per_1k_requests_usd"], baseline["cost_per_1k_requests_usd"])
    return {
        "token_reduction": None if tokens is None else 1.0 - tokens,
        "speedup": speedup,
        "cost_saving": None if cost is None else 1.0 - cost,
    }


def table_rows(measurements: Sequence[Measurement], prices: Prices) -> list[dict[str, Any]]:
    """The JSON rows: id, label, every figure key (None where it does not apply), ratios to row 1, extras."""
    figures = {m.condition.id: base_figures(m, prices) for m in measurements}
    if BASELINE not in figures:
        raise ValueError(f"the table needs row {BASELINE!r} to compute ratios")
    baseline = figures[BASELINE]
    fine_tuned = figures.get(FINE_TUNED_BASELINE, {})
    rows = []
    for m in measurements:
        own = figures[m.condition.id]
        rows.append(_row(m, {**own, **ratios(own, baseline),
                             "speedup_vs_ft": ratio(fine_tuned.get("latency_p50_s"), own["latency_p50_s"]),
                             "throughput_ratio": ratio(own["throughput_rps_c8"], baseline["throughput_rps_c8"])}))
    return rows


def _row(m: Measurement, values: dict[str, Any]) -> dict[str, Any]:
    """One JSON row: id, label, the figures rounded, and what the report and plots read besides."""
    row: dict[str, Any] = {"id": m.condition.id, "row": m.condition.number, "label": m.condition.label}
    row.update({key: _round(values.get(key), ROUNDING[key]) for key in FIGURE_KEYS})
    row.update({
        "n": m.n,
        "output_tokens": _round(m.output_tokens, 2),
        "original_input_tokens": _round(m.original_input_tokens, 1),
        "bleu_ci95": [round(v, 2) for v in m.bleu_ci95] if m.bleu_ci95 else None,
        "throughput_requests": m.throughput_requests or None,
        "throughput_ratio": _round(values.get("throughput_ratio"), 3),
        "inputs": m.condition.inputs, "adapter": m.condition.adapter, "keep_ratio": m.condition.keep_ratio,
        "prefix_caching": m.condition.prefix_caching, "via_gateway": m.condition.gateway,
        "merged": m.condition.merged,
        "seconds": _round(m.seconds, 1), "note": m.note, "samples": m.samples, "predictions": m.predictions,
    })
    return row


def complete_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a `paper.json` written before a column existed, given that column from their own figures
    (the speed-up against row 5 is row 5's median latency over the row's), so `--rebuild` renders them."""
    by_id = {r["id"]: r for r in rows}
    fine_tuned = by_id.get(FINE_TUNED_BASELINE, {}).get("latency_p50_s")
    for r in rows:
        if "speedup_vs_ft" not in r:
            r["speedup_vs_ft"] = _round(ratio(fine_tuned, r.get("latency_p50_s")), ROUNDING["speedup_vs_ft"])
        r.setdefault("merged", False)
    for condition in CONDITIONS:
        if condition.id not in by_id:
            rows.append(_row(Measurement(condition=condition, note="this run predates the row"), {}))
    order = {c.id: i for i, c in enumerate(CONDITIONS)}
    rows.sort(key=lambda r: order.get(r["id"], len(order)))
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
