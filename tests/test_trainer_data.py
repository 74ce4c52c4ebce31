"""Reading and validating training rows; the held-out split. Errors must say which row and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.templates import parse_template
from tests.trainer_fixtures import tiny_messages, tiny_rows
from trainer.data import TrainDataError, load_jsonl, split_rows, validate_examples, validate_rows

ONE_SLOT = parse_template(messages=tiny_messages())
TWO_SLOTS = parse_template(prompt="Translate from {source}:\n{text}\n")


def test_query_names_the_slot_of_a_one_slot_template() -> None:
    single = parse_template(prompt="Q: {question}\nA:")
    rows = validate_rows(single, [{"query": "why?", "response": "because", "references": ["since"]}])
    assert rows == [{"question": "why?", "response": "because", "references": ["since"]}]


def test_rows_are_normalised() -> None:
    rows = validate_rows(TWO_SLOTS, [{"source": "en", "text": "hi  \r\n", "response": "a\r\nb", "extra": 1}])
    assert rows == [{"source": "en", "text": "hi", "response": "a\nb", "references": []}]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "no training rows"),
        ("not a list", "must be a list"),
        ([{"source": "en", "response": "x"}], "row 0: missing slot(s) text (template slots: source, text)"),
        ([{"query": "en", "response": "x"}], "row 0: missing slot(s) source, text"),
        ([{"source": "en", "text": "t", "response": "ok"}, {"source": "en", "text": "", "response": "x"}],
         "row 1: slot 'text' is empty"),
        ([{"source": "en", "text": 3, "response": "x"}], "slot 'text' must be a string"),
        ([{"source": "en", "text": "t"}], "row 0: needs a non-empty string 'response'"),
        ([{"source": "en", "text": "t", "response": "x", "references": "y"}], "'references' must be a list"),
        ([["en", "t", "x"]], "row 0: must be an object"),
    ],
)
def test_bad_rows_give_clear_errors(rows: object, message: str) -> None:
    with pytest.raises(TrainDataError) as err:
        validate_rows(TWO_SLOTS, rows)
    assert message in str(err.value)


def test_many_bad_rows_are_summarised() -> None:
    with pytest.raises(TrainDataError, match=r"\(and 5 more\)"):
        validate_rows(ONE_SLOT, [{"response": "x"}] * 10)


def test_examples_take_no_references() -> None:
    with pytest.raises(TrainDataError, match="example 0: examples take no 'references'"):
        validate_examples(ONE_SLOT, [{"query": "a", "response": "b", "references": []}])


def test_load_jsonl_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainDataError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TrainDataError, match="has no rows"):
        load_jsonl(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "a", "response": "b"}\n\n{"query": "c", "response": \n')
    with pytest.raises(TrainDataError, match=r"line 3: not valid JSON"):
        load_jsonl(broken)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TrainDataError, match="not UTF-8"):
        load_jsonl(binary)


def test_load_jsonl_reads_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in tiny_rows()) + "\n\n")
    assert load_jsonl(path) == tiny_rows()


def test_split_is_deterministic_and_ignores_row_order() -> None:
    rows = validate_rows(ONE_SLOT, tiny_rows())
    train, test = split_rows(ONE_SLOT, rows, 0.25)
    assert len(test) == 4 and len(train) == 12
    assert not {r["query"] for r in train} & {r["query"] for r in test}
    _, test2 = split_rows(ONE_SLOT, list(reversed(rows)), 0.25)
    assert sorted(r["query"] for r in test2) == sorted(r["query"] for r in test)
    assert split_rows(ONE_SLOT, rows, 0.0) == (rows, [])
    with pytest.raises(TrainDataError, match="eval_fraction"):
        split_rows(ONE_SLOT, rows, 1.0)
    with pytest.raises(TrainDataError, match="nothing to train on"):
        split_rows(ONE_SLOT, rows[:1], 0.5)
