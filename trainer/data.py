"""Training rows: reading JSONL, validating against a template's slots, the held-out split.

A row is `{<slot>: value, ..., response, references?}`; for a one-slot template `query` may name
the slot. Every problem is a `TrainDataError` whose message says which row and why (the REST
layer answers it with a 422).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.jsonl import parse_jsonl
from core.templates import PromptTemplate

QUERY_ALIAS = "query"
RESPONSE = "response"
REFERENCES = "references"
MAX_REPORTED = 5


class TrainDataError(ValueError):
    """Training data that cannot be used; the message is meant for the person who sent it."""


Row = dict[str, Any]


def slot_values(template: PromptTemplate, row: Mapping[str, Any]) -> dict[str, str]:
    return {name: row[name] for name in template.slots}


def _check_row(template: PromptTemplate, raw: Any, *, allow_references: bool) -> Row:
    if not isinstance(raw, Mapping):
        raise ValueError(f"must be an object with the slots and 'response', got {type(raw).__name__}")
    row = dict(raw)
    slots = template.slots
    if len(slots) == 1 and slots[0] not in row and QUERY_ALIAS in row:
        row[slots[0]] = row.pop(QUERY_ALIAS)
    missing = [s for s in slots if s not in row]
    if missing:
        raise ValueError(f"missing slot(s) {', '.join(missing)} (template slots: {', '.join(slots)})")
    out: Row = {}
    for name in slots:
        value = row[name]
        if not isinstance(value, str):
            raise ValueError(f"slot {name!r} must be a string, got {type(value).__name__}")
        value = value.replace("\r\n", "\n").rstrip()
        if not value:
            raise ValueError(f"slot {name!r} is empty")
        out[name] = value
    response = row.get(RESPONSE)
    if not isinstance(response, str) or not response.strip():
        raise ValueError("needs a non-empty string 'response'")
    out[RESPONSE] = response.replace("\r\n", "\n")
    refs = row.get(REFERENCES)
    if refs is not None:
        if not allow_references:
            raise ValueError("examples take no 'references'")
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise ValueError("'references' must be a list of strings")
        out[REFERENCES] = [r for r in refs if r.strip()]
    elif allow_references:
        out[REFERENCES] = []
    return out


def _validate(template: PromptTemplate, rows: Any, what: str, *, allow_references: bool) -> list[Row]:
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise TrainDataError(f"{what}s must be a list of objects")
    out: list[Row] = []
    problems: list[str] = []
    for i, raw in enumerate(rows):
        try:
            out.append(_check_row(template, raw, allow_references=allow_references))
        except ValueError as exc:
            problems.append(f"{what} {i}: {exc}")
    if problems:
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise TrainDataError("; ".join(problems[:MAX_REPORTED]) + more)
    return out


def validate_rows(template: PromptTemplate, rows: Any) -> list[Row]:
    """Rows normalised to `{slot: value, ..., response, references}`; raises TrainDataError."""
    if isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) and not rows:
        raise TrainDataError("no training rows: give at least one {slot..., response} row")
    return _validate(template, rows, "row", allow_references=True)


def validate_examples(template: PromptTemplate, examples: Any) -> list[Row]:
    """The template's declared few-shot examples, `{slot|query: value, response}` each."""
    return _validate(template, examples or [], "example", allow_references=False)


def load_jsonl(path: Path) -> list[Any]:
    """Parse a JSONL file (blank lines skipped); errors name the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainDataError(f"data file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise TrainDataError(f"data file {path} is not UTF-8 text: {exc}") from None
    try:
        rows = parse_jsonl(text)
    except ValueError as exc:
        raise TrainDataError(f"{path}, {exc}") from None
    if not rows:
        raise TrainDataError(f"data file {path} has no rows")
    return rows


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def row_key(template: PromptTemplate, row: Mapping[str, Any]) -> str:
    """A row's identity for the split: its slot values and response, not its position."""
    blob = json.dumps({"values": slot_values(template, row), RESPONSE: row[RESPONSE]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def split_indices(template: PromptTemplate, rows: Sequence[Row], eval_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic (train, test) row indices by each row's hash, so reordering the file changes nothing."""
    if not 0.0 <= eval_fraction < 1.0:
        raise TrainDataError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    n_test = math.ceil(len(rows) * eval_fraction) if eval_fraction > 0 else 0
    if n_test and len(rows) - n_test < 1:
        raise TrainDataError(f"{len(rows)} row(s) leave nothing to train on after holding out {n_test} for evaluation")
    order = sorted(range(len(rows)), key=lambda i: (row_key(template, rows[i]), i))
    test_ids = order[:n_test]
    chosen = set(test_ids)
    return [i for i in range(len(rows)) if i not in chosen], test_ids


def split_rows(template: PromptTemplate, rows: Sequence[Row], eval_fraction: float) -> tuple[list[Row], list[Row]]:
    train_ids, test_ids = split_indices(template, rows, eval_fraction)
    return [rows[i] for i in train_ids], [rows[i] for i in test_ids]


def rows_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, ensure_ascii=False).encode()).hexdigest()
