"""Each stage's training sequences: the stage input rendered and tokenised, then the response.

Chat inputs go through the base tokenizer's chat template with the generation prompt, exactly as
the gateway renders a request; the target is the response followed by the end-of-turn token, and
only those tokens carry loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.templates import PromptTemplate, bare_query_content
from trainer.compress import SelfInformationCompressor
from trainer.data import RESPONSE, Row, TrainDataError, slot_values
from trainer.prompting import PromptLayout, Rendered
from trainer.retrieval import ExamplePool, RetrievalMethod
from trainer.schedule import Stage


@dataclass(frozen=True)
class Encoded:
    """One training sequence; tokens from `prompt_len` on are the target."""

    row: int
    input_ids: tuple[int, ...]
    prompt_len: int

    @property
    def target_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def prompt_text(tokenizer: Any, rendered: Rendered) -> str:
    """A rendered input as the model reads it: chat messages through the chat template, text as is."""
    if isinstance(rendered, str):
        return rendered
    return str(tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False))


def encode(tokenizer: Any, row: int, prompt: str, response: str) -> Encoded:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(response + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    return Encoded(row=row, input_ids=tuple(prompt_ids + target_ids), prompt_len=len(prompt_ids))


def encode_prompt(tokenizer: Any, row: int, rendered: Rendered) -> Encoded:
    """A prompt alone (no target), to check its length."""
    ids = tokenizer(prompt_text(tokenizer, rendered), add_special_tokens=False)["input_ids"]
    return Encoded(row=row, input_ids=tuple(ids), prompt_len=len(ids))


class StageBuilder:
    """Builds stage inputs for the training rows from one template, its examples and the pool."""

    def __init__(
        self,
        template: PromptTemplate,
        examples: Sequence[Row],
        train_rows: Sequence[Row],
        *,
        compressor: SelfInformationCompressor | None,
        retrieval: RetrievalMethod,
        max_examples: int,
    ) -> None:
        self.template = template
        self.layout = PromptLayout.build(template, examples)
        self.train_rows = list(train_rows)
        self.pool_rows: list[Row] = [*examples, *train_rows]
        self.compressor = compressor
        self.neighbours: list[list[int]] = [[] for _ in train_rows]
        if max_examples > 0 and len(self.pool_rows) > 1:
            pool = ExamplePool([bare_query_content(template, r) for r in self.pool_rows], retrieval)
            offset = len(examples)
            for i, row in enumerate(self.train_rows):
                text = bare_query_content(template, row)
                self.neighbours[i] = pool.nearest(text, max_examples, member=offset + i)

    def retrieved(self, i: int, k: int) -> list[Row]:
        """The k pool examples for training row i, the most relevant last (nearest the query)."""
        return [self.pool_rows[j] for j in reversed(self.neighbours[i][:k])]

    def render(self, stage: Stage, i: int) -> Rendered:
        values = slot_values(self.template, self.train_rows[i])
        if stage.kind == "bare":
            return self.layout.bare(values)
        if stage.kind == "full_prompt":
            return self.layout.full_prompt(values)
        compressor = self.compressor
        if compressor is None:
            raise RuntimeError("compressed stages need a compressor")
        ratio = stage.keep_ratio
        return self.layout.render(
            values, examples=self.retrieved(i, stage.examples), compress=lambda t: compressor(t, ratio)
        )

    def encode_stage(self, stage: Stage, tokenizer: Any, row_ids: Sequence[int]) -> list[Encoded]:
        return [
            encode(tokenizer, row_ids[i], prompt_text(tokenizer, self.render(stage, i)), self.train_rows[i][RESPONSE])
            for i in range(len(self.train_rows))
        ]


def check_lengths(encoded: Mapping[str, Sequence[Encoded]], limit: int, what: str) -> None:
    """Raise TrainDataError naming the rows whose sequences exceed `limit` tokens."""
    too_long: dict[int, tuple[int, str]] = {}
    for stage_name, items in encoded.items():
        for e in items:
            n = len(e.input_ids)
            if n > limit and n > too_long.get(e.row, (0, ""))[0]:
                too_long[e.row] = (n, stage_name)
    if too_long:
        worst = sorted(too_long.items(), key=lambda kv: -kv[1][0])[:5]
        listed = ", ".join(f"row {r} ({n} tokens in {s})" for r, (n, s) in worst)
        raise TrainDataError(
            f"{len(too_long)} row(s) too long: {listed}; the limit is {limit} tokens ({what}). "
            "Shorten those rows or raise the limit."
        )
