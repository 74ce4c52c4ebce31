"""The one error a benchmark raises for a missing or unusable input, so the CLI can say it in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class BenchInputError(Exception):
    """A benchmark's input is missing or unusable (a results folder, the deploy files, an optional package);
    `promptintern bench` prints the message as one line and exits with status 2, without a traceback."""


def read_results(path: Path, hint: str) -> dict[str, Any]:
    """A benchmark's results JSON (to rebuild or resume from): a missing or unreadable file is a BenchInputError
    naming it, with `hint` (what to run first)."""
    if not path.is_file():
        raise BenchInputError(f"no {path}: {hint}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchInputError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BenchInputError(f"{path} is not a results document (a JSON object)")
    return doc


def rebuild_from(path: Path, hint: str, write: Callable[[dict[str, Any]], Path]) -> Path:
    """`write` the report of the results JSON at `path` again (`--rebuild`): a document that lacks what the report
    needs (a key, a field of the wrong type) is a BenchInputError naming the file, not a traceback."""
    doc = read_results(path, hint)
    try:
        return write(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BenchInputError(f"{path} is not a complete results document ({type(exc).__name__}: {exc})") from exc
