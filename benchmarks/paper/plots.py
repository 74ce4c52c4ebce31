"""The report's two plots, drawn from `paper.json` with matplotlib's Figure API (no pyplot, no global state):
quality against input tokens, and latency by condition."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
