"""JSON Lines, parsed one way for the trainer's files and the gateway's imports."""

from __future__ import annotations

import json
from typing import Any


def parse_jsonl(text: str) -> list[Any]:
    """The values of a JSONL text, blank lines skipped; a bad line raises ValueError naming its number."""
    rows: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not valid JSON ({exc.msg})") from None
    return rows
