"""The worked example: an NL2Bash prompt (instructions + few-shot examples) and its train/test split.

The 300 (request, command) pairs come from the `icalfa` package's NL2Bash files (its folder is found
with importlib, the package is never imported). Everything is deterministic: examples and the split
are chosen by the SHA-256 of each request, not by file order.

    python -m trainer.nl2bash --out examples/nl2bash   # template.json, train.jsonl, test.jsonl
    promptintern train --example nl2bash --schedule promptintern
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.packaged import package_dir
from core.templates import PromptTemplate, escape, parse_template
from trainer.data import Row, write_jsonl

PACKAGE = "icalfa"
FILES = [f"nl2bash_fs_{i}.json" for i in range(1, 6)]
NAME = "nl2bash"
N_EXAMPLES = 24
N_TEST = 70
MAX_EXAMPLE_CHARS = 90

INSTRUCTIONS = """\
You are an expert Linux system administrator. Translate the user's request into Bash.

Rules:
- Answer with exactly one command line (pipes, `&&` and `;` are fine) and nothing else: no explanation, \
no Markdown, no code fences, no leading `$`.
- Use standard tools (coreutils, findutils, grep, sed, awk, tar, xargs); prefer the simplest command that \
does the job.
- Keep every path, file name, pattern and number exactly as the request gives it, and quote patterns so \
the shell does not expand them.
- When the request names no directory, work in the current directory.

Examples:"""


@dataclass(frozen=True)
class WorkedExample:
    """The prompt as a user registers it, plus the rows it is trained and tested on."""

    name: str
    messages: list[dict[str, str]]
    examples: list[Row]
    train: list[Row]
    test: list[Row]

    @property
    def template(self) -> PromptTemplate:
        return parse_template(messages=self.messages)

    def registration(self) -> dict[str, Any]:
        """The body of `POST /v1/prompts` (and of `--template-file`)."""
        return {"name": self.name, "messages": self.messages, "examples": self.examples}


def dataset_dir() -> Path:
    return package_dir(PACKAGE, "pip install --no-deps icalfa==0.3.6") / "assets" / "datasets"


def load_pairs() -> list[dict[str, Any]]:
    """All pairs, in file order, as `{query, gold, gold2, difficulty}`."""
    folder = dataset_dir()
    pairs: list[dict[str, Any]] = []
    for name in FILES:
        pairs += json.loads((folder / name).read_text())
    return pairs


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _row(pair: dict[str, Any]) -> Row:
    query, gold, gold2 = pair["query"].strip(), pair["gold"].strip(), pair.get("gold2", "").strip()
    return {"query": query, "response": gold, "references": [gold2] if gold2 and gold2 != gold else []}


def build() -> WorkedExample:
    pairs = sorted(load_pairs(), key=lambda p: _key(p["query"]))
    # Short examples, taken round-robin over the three difficulty levels.
    by_level: dict[int, list[dict[str, Any]]] = {}
    for p in pairs:
        if len(p["query"]) + len(p["gold"]) <= MAX_EXAMPLE_CHARS and "\n" not in p["gold"]:
            by_level.setdefault(int(p["difficulty"]), []).append(p)
    chosen: list[dict[str, Any]] = []
    levels = sorted(by_level)
    while len(chosen) < N_EXAMPLES and any(by_level.values()):
        for level in levels:
            if by_level[level] and len(chosen) < N_EXAMPLES:
                chosen.append(by_level[level].pop(0))
    chosen_ids = {id(p) for p in chosen}
    rest = [p for p in pairs if id(p) not in chosen_ids]
    examples = [{"query": p["query"].strip(), "response": p["gold"].strip()} for p in chosen]
    shots = "\n\n".join(f"Input: {e['query']}\nOutput: {e['response']}" for e in examples)
    messages = [
        {"role": "system", "content": escape(f"{INSTRUCTIONS}\n\n{shots}")},
        {"role": "user", "content": "Input: {query}\nOutput:"},
    ]
    return WorkedExample(
        name=NAME,
        messages=messages,
        examples=examples,
        train=[_row(p) for p in rest[N_TEST:]],
        test=[_row(p) for p in rest[:N_TEST]],
    )


def write(out: Path) -> WorkedExample:
    example = build()
    out.mkdir(parents=True, exist_ok=True)
    (out / "template.json").write_text(json.dumps(example.registration(), indent=2, ensure_ascii=False) + "\n")
    write_jsonl(out / "train.jsonl", example.train)
    write_jsonl(out / "test.jsonl", example.test)
    return example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the NL2Bash worked example (template and split).")
    parser.add_argument("--out", type=Path, default=Path("examples/nl2bash"), help="Folder to write into.")
    args = parser.parse_args(argv)
    example = write(args.out)
    print(f"{args.out}: {len(example.examples)} examples in the template, "
          f"{len(example.train)} training rows, {len(example.test)} test rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
