"""How figures are written in the report, its findings and the README section: one dash where a figure does
not apply, so that no row ever shows None or nan."""

from __future__ import annotations

import datetime as dt
from typing import Any

DASH = "—"


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    """A number with a format spec, or a dash."""
    return DASH if value is None else f"{value:{spec}}{suffix}"


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return DASH if value is None else f"{100 * value:.1f}%"


def times(value: float | None) -> str:
    """A ratio as '4.20×'."""
    return DASH if value is None else f"{value:.2f}×"


def speed(value: float | None) -> str:
    """A latency ratio in words: '2.10× faster' or '1.90× slower'."""
    if value is None:
        return DASH
    return f"{value:.2f}× faster" if value >= 1 else f"{1 / value:.2f}× slower"


def duration(seconds: float | None) -> str:
    """Seconds below a minute, minutes with one decimal above."""
    if seconds is None:
        return DASH
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def code(text: str) -> str:
    """Inline code that survives backticks in the text."""
    if not text:
        return "(empty)"
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def date_utc(iso: str) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM UTC' (the text unchanged when it is not one)."""
    try:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso
