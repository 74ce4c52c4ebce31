"""The NL2Bash worked example: a realistic prompt size, a deterministic split with enough test pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.trainer_fixtures import smollm_dir, tiny_tokenizer, trainer_tiny_model
from trainer import nl2bash
from trainer.data import validate_examples, validate_rows
from trainer.prompting import PromptLayout

__all__ = ["smollm_dir", "tiny_tokenizer", "trainer_tiny_model"]


def test_prompt_has_instructions_and_20_to_30_examples_in_600_to_900_tokens(tiny_tokenizer: Any) -> None:
    example = nl2bash.build()
    assert 20 <= len(example.examples) <= 30
    full = example.template.render({"query": "list files"})
    text = tiny_tokenizer.apply_chat_template(full, add_generation_prompt=True, tokenize=False)
    assert 600 <= len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) <= 900
    layout = PromptLayout.build(example.template, validate_examples(example.template, example.examples))
    assert layout.example_format.declared and layout.example_format.prefix == "Input: "
    assert "Rules:" in layout.instruction_texts()[0]


def test_split_is_deterministic_disjoint_and_large_enough() -> None:
    a, b = nl2bash.build(), nl2bash.build()
    assert a == b
    assert len(a.test) >= 60 and len(a.train) >= 150
    assert len(a.examples) + len(a.train) + len(a.test) == len(nl2bash.load_pairs()) == 300
    queries = [e["query"] for e in a.examples], [r["query"] for r in a.train], [r["query"] for r in a.test]
    assert len(set().union(*map(set, queries))) == 300
    validate_rows(a.template, a.train + a.test)
    assert any(r["references"] for r in a.test)


def test_write_produces_a_registration_and_jsonl(tmp_path: Path) -> None:
    nl2bash.main(["--out", str(tmp_path)])
    registration = json.loads((tmp_path / "template.json").read_text())
    assert registration["name"] == "nl2bash" and len(registration["examples"]) == nl2bash.N_EXAMPLES
    lines = (tmp_path / "test.jsonl").read_text().splitlines()
    assert len(lines) == nl2bash.N_TEST and set(json.loads(lines[0])) == {"query", "response", "references"}
