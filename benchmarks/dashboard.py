"""The cost dashboard as one PNG: the main panels of deploy/grafana's dashboard, queried from Prometheus and drawn.

Grafana needs a browser and a running stack; a picture drawn from the same PromQL can go into the
README and into bench results. `render` draws from any Prometheus that scrapes a gateway; `run`
without a Prometheus URL first builds a small stack (gateway, Prometheus, a mixed workload).
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import prometheus as prom
from benchmarks.deploy import DeployFiles
from core.config import Settings

DEFAULT_OUT = Path("results/dashboard.png")
# Panels of deploy/grafana/dashboards/promptintern-cost.json, found by title: the picture follows the file.
STAT_TITLES = ("Prompt tokens saved", "Dollars saved", "Share of prompt tokens removed", "Requests served by adapters",
               "Projected saving, per month")
GRAPH_TITLES = (
    "Prompt tokens saved per second, by prompt",
    "Share of prompt tokens removed, by prompt",
    "Requests per second, by route",
    "Request duration, by route",
    "Prompt tokens per second: sent by the apps vs processed by the model",
)
DOLLARS_TITLE = "Dollars saved since the start of the window, by prompt"
DOLLARS_EXPR = 'sum by (prompt) (promptintern_saved_cost_usd_total{prompt=~"$prompt"})'
UNIT_LABELS = {"short": "tokens / s", "currencyUSD": "USD", "percentunit": "share", "reqps": "requests / s",
               "s": "seconds"}
ROUTE_COLORS = {"adapter": "#2ca02c", "fallback": "#ff7f0e", "passthrough": "#7f7f7f"}
LINE_STYLES = ("-", "--", ":")


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """One dashboard panel: its title, Grafana unit and queries (as written, with `$variables`)."""

    title: str
    unit: str
    targets: tuple[Target, ...]


def load_panels(path: Path) -> dict[str, Panel]:
    """The panels of a dashboard JSON by title (rows' nested panels included)."""
    found: dict[str, Panel] = {}

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            targets = tuple(Target(t["expr"], t.get("legendFormat", "")) for t in node.get("targets") or []
                            if t.get("expr"))
            if targets:
                unit = ((node.get("fieldConfig") or {}).get("defaults") or {}).get("unit", "short")
                found[node["title"]] = Panel(node["title"], unit, targets)
            walk(node.get("panels") or [])

    walk(json.loads(Path(path).read_text()).get("panels", []))
    return found


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label value."""
    if fmt in ("", "__auto"):
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    return out


def cumulative(points: Sequence[tuple[float, float]], appeared_late: bool) -> list[float]:
    """A counter's increase since the first point, across resets (as `increase` counts it).

    A series that appears after the window starts was at 0 before, so its first value counts.
    """
    total = points[0][1] if appeared_late and points else 0.0
    out = [total] if points else []
    for (_t0, before), (_t1, after) in itertools.pairwise(points):
        total += after - before if after >= before else after
        out.append(total)
    return out


def dollars(value: float) -> str:
    """USD without exponents: cents for large sums, three significant digits for fractions of a cent."""
    if value == 0 or abs(value) >= 10:
        return f"${value:,.2f}"
    decimals = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"${value:.{decimals}f}"


def _number(value: float, unit: str) -> str:
    if math.isnan(value):
        return "no data"
    if unit == "percentunit":
        return f"{value:.1%}"
    if unit == "currencyUSD":
        return dollars(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _format_axis(ax: Any, unit: str) -> None:
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    if unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    elif unit == "currencyUSD":
        top = max(abs(y) for y in ax.get_ylim()) or 1.0
        decimals = max(2, 1 - math.floor(math.log10(top)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"${v:,.{decimals}f}"))
    elif unit == "s":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v * 1000:.0f} ms" if v < 1 else f"{v:g} s"))
    else:  # the tick labels carry the other units themselves
        ax.set_ylabel(UNIT_LABELS.get(unit, unit))


def _line_color(labels: dict[str, str], index: int) -> str:
    return ROUTE_COLORS.get(labels.get("route", ""), f"C{index % 10}")


def _tile(ax: Any, value: float, title: str, unit: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#f4f7fb")
    for spine in ax.spines.values():
        spine.set_color("#c8d3e0")
    ax.text(0.5, 0.6, _number(value, unit), ha="center", va="center", fontsize=24, weight="bold", color="#1f5f99",
            transform=ax.transAxes)
    ax.text(0.5, 0.17, title, ha="center", va="center", fontsize=11, transform=ax.transAxes)


@dataclass(frozen=True)
class Frame:
    """Where and how a picture queries Prometheus: the time range, step and Grafana variables."""

    url: str
    start: float
    end: float
    step: float
    variables: dict[str, str]


def _graph(ax: Any, panel: Panel, frame: Frame) -> None:
    import matplotlib.dates as mdates

    drawn = 0
    for j, target in enumerate(panel.targets):
        expr = prom.substitute(target.expr, frame.variables)
        for series in prom.query_range(frame.url, expr, frame.start, frame.end, frame.step):
            points = [(float(t), float(v)) for t, v in series["values"]]
            ys = [v for _t, v in points]
            if panel.title == DOLLARS_TITLE:
                ys = cumulative(points, appeared_late=points[0][0] > frame.start + frame.step)
            xs = mdates.date2num([datetime.fromtimestamp(t) for t, _v in points])
            ax.plot(xs, ys, LINE_STYLES[j % len(LINE_STYLES)], color=_line_color(series["metric"], drawn),
                    label=legend(target.legend, series["metric"]), linewidth=1.8)
            drawn += 1
    ax.set_title(textwrap.fill(panel.title, 60), fontsize=11, loc="left")
    ax.set_xlim(*mdates.date2num([datetime.fromtimestamp(frame.start), datetime.fromtimestamp(frame.end)]))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.grid(alpha=0.3)
    _format_axis(ax, panel.unit)
    if drawn:
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#999999", transform=ax.transAxes)


def render(prometheus_url: str, out: Path, window: str = "5m", *, deploy: DeployFiles = DeployFiles(),
           prompt: str = ".+", rate_interval: str | None = None, end: float | None = None, subtitle: str = "") -> Path:
    """Draw the cost dashboard's main panels over the last `window` into a PNG at `out`; returns `out`.

    The panels are read from `deploy`'s dashboard file (default: `deploy/` in the working directory).
    `$__rate_interval` follows Grafana (max of 4 scrape intervals and step + 1 scrape interval)
    unless `rate_interval` is given; `prompt` is the regex of the dashboard's Prompt variable.
    """
    from matplotlib.figure import Figure  # drawn by Agg on savefig; no pyplot, no global backend

    panels = load_panels(deploy.checked().dashboard)
    end = time.time() if end is None else end
    span = prom.parse_duration(window)
    scrape = prom.scrape_interval_seconds(prometheus_url)
    step = max(scrape, span / 200)
    rate = rate_interval or f"{max(4 * scrape, step + scrape):g}s"
    frame = Frame(prometheus_url, end - span, end, step,
                  {"prompt": prompt, "__rate_interval": rate, "__interval": f"{step:g}s", "__range": window})

    fig = Figure(figsize=(18, 11), dpi=110)
    tiles = fig.add_gridspec(1, len(STAT_TITLES), top=0.90, bottom=0.81, wspace=0.25)
    for i, title in enumerate(STAT_TITLES):
        panel = panels[title]
        result = prom.query(prometheus_url, prom.substitute(panel.targets[0].expr, frame.variables), at=end)
        _tile(fig.add_subplot(tiles[0, i]), float(result[0]["value"][1]) if result else math.nan, title, panel.unit)
    grid = fig.add_gridspec(2, 3, top=0.74, bottom=0.04, hspace=0.32, wspace=0.2)
    graphs = [panels[GRAPH_TITLES[0]], Panel(DOLLARS_TITLE, "currencyUSD", (Target(DOLLARS_EXPR, "{{prompt}}"),)),
              *(panels[t] for t in GRAPH_TITLES[1:])]
    for i, panel in enumerate(graphs):
        _graph(fig.add_subplot(grid[i // 3, i % 3]), panel, frame)
    fig.suptitle("PromptIntern gateway: cost and savings", fontsize=18, weight="bold", y=0.985)
    first, last = datetime.fromtimestamp(frame.start), datetime.fromtimestamp(end)
    line = f"last {window}: {first:%Y-%m-%d %H:%M:%S} to {last:%H:%M:%S} · rate interval {rate} · {subtitle}"
    fig.text(0.5, 0.945, line.rstrip(" ·"), ha="center", fontsize=11, color="#555555")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def run(settings: Settings, out: Path = DEFAULT_OUT, *, prometheus_url: str | None = None, window: str = "5m",
        duration: float = 45.0, model_path: Path | None = None, deploy: DeployFiles = DeployFiles()) -> Path:
    """Render from a running Prometheus, or, without a URL, from a demo stack fed for `duration` seconds.

    The demo stack is the embedded gateway on `model_path` (default: the base model), Prometheus
    scraping it every second with `deploy`'s rules, and `benchmarks.workload`'s mixed traffic.
    """
    deploy.checked()
    if prometheus_url:
        return render(prometheus_url, out, window, deploy=deploy)
    from benchmarks.workload import demo_stack

    with demo_stack(settings, model_path, deploy) as stack:
        started = time.time()
        sent = stack.drive(duration)
        done = prom.wait_for_scrapes(stack.prometheus_url, 1, job=prom.GATEWAY_JOB)
        prom.wait_for_scrapes(stack.prometheus_url, done + 2, job=prom.GATEWAY_JOB)
        span = f"{math.ceil(time.time() - started) + 5}s"
        model = settings.served_model_name if model_path is None else model_path.name
        print(f"[bench dashboard] {sent} requests in {duration:.0f} s; drawing {out}", flush=True)
        return render(stack.prometheus_url, out, span, deploy=deploy, rate_interval="15s",
                      subtitle=f"demo: {sent} requests of up to 4 tokens, {model} on the embedded engine, "
                               f"input price ${settings.price_input_per_1k:g} / 1K tokens")
