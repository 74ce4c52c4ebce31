"""Cut a registered template into instructions, declared example blocks and query frames, and build
each stage's input from those pieces.

A template carries its few-shot examples verbatim (the registry checks it). `PromptLayout` finds
them, infers their format (`Input: {q}\\nOutput: {r}`, say) from where they sit, and keeps the
rest of the static text as instructions, except the short text framing each slot on its own
line (`Input: ` before, `\\nOutput:` after), which stays as is until the bare stage. A stage's
input is the template with its instructions compressed, the example region holding the retrieved
examples instead of the declared ones, and the slots filled.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.templates import PromptTemplate, Slot, bare_query_content, bare_query_messages
from trainer.data import RESPONSE, TrainDataError

MAX_GAP = 200
MAX_FRAME = 200
DEFAULT_SEPARATOR = "\n\n"
SegmentKind = Literal["instruction", "frame", "slot", "examples"]
Rendered = list[dict[str, str]] | str


@dataclass(frozen=True)
class ExampleFormat:
    """How one example is written: prefix, slot values with the text after each, then the response."""

    prefix: str
    joins: tuple[str, ...]
    separator: str
    declared: bool

    def render(self, template: PromptTemplate, example: Mapping[str, Any]) -> str:
        if not self.declared:
            return f"Input: {bare_query_content(template, example)}\nOutput: {example[RESPONSE]}"
        out = [self.prefix]
        for name, join in zip(template.slots, self.joins, strict=True):
            out += [example[name], join]
        out.append(example[RESPONSE])
        return "".join(out)

    def render_many(self, template: PromptTemplate, examples: Sequence[Mapping[str, Any]]) -> str:
        return self.separator.join(self.render(template, e) for e in examples)


DEFAULT_FORMAT = ExampleFormat(prefix="Input: ", joins=("\nOutput: ",), separator=DEFAULT_SEPARATOR, declared=False)


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    text: str = ""


@dataclass(frozen=True)
class MessageLayout:
    role: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class _Found:
    message: int
    part: int
    start: int
    end: int
    joins: tuple[str, ...]


def _locate(text: str, values: Sequence[str], response: str, start: int) -> list[tuple[int, int, tuple[str, ...]]]:
    """Every place at or after `start` where the values then the response follow each other closely."""
    found = []
    pos = text.find(values[0], start)
    while pos != -1:
        cursor = pos + len(values[0])
        joins: list[str] = []
        for piece in [*values[1:], response]:
            nxt = text.find(piece, cursor)
            if nxt == -1 or nxt - cursor > MAX_GAP:
                break
            joins.append(text[cursor:nxt])
            cursor = nxt + len(piece)
        else:
            found.append((pos, cursor, tuple(joins)))
        pos = text.find(values[0], pos + 1)
    return found


def _common_suffix(texts: Sequence[str]) -> str:
    first = texts[0]
    n = 0
    while n < len(first) and all(len(t) > n and t[-1 - n] == first[-1 - n] for t in texts):
        n += 1
    return first[len(first) - n :]


def _lead_frame(text: str) -> int:
    """Length of the text right after a slot that frames it: the rest of its line and the next line."""
    first = text.find("\n")
    if first == -1:
        return len(text) if len(text) <= MAX_FRAME else 0
    second = text.find("\n", first + 1)
    end = len(text) if second == -1 else second
    if end <= MAX_FRAME:
        return end
    return first if first <= MAX_FRAME else 0


def _trail_frame(text: str) -> int:
    """Length of the text right before a slot that frames it: the start of the slot's line."""
    n = len(text) - (text.rfind("\n") + 1)
    return n if n <= MAX_FRAME else 0


def _split_static(text: str, after_slot: bool, before_slot: bool) -> list[Segment]:
    lead = _lead_frame(text) if after_slot else 0
    trail = _trail_frame(text) if before_slot else 0
    if lead + trail >= len(text):
        return [Segment("frame", text)] if text else []
    out = []
    if lead:
        out.append(Segment("frame", text[:lead]))
    out.append(Segment("instruction", text[lead : len(text) - trail]))
    if trail:
        out.append(Segment("frame", text[len(text) - trail :]))
    return out


@dataclass(frozen=True)
class PromptLayout:
    """A template cut into segments; `render` builds one stage's input for one row."""

    template: PromptTemplate
    messages: tuple[MessageLayout, ...]
    example_format: ExampleFormat

    @classmethod
    def build(cls, template: PromptTemplate, examples: Sequence[Mapping[str, Any]]) -> PromptLayout:
        found = _find_examples(template, examples)
        fmt = DEFAULT_FORMAT
        region: tuple[int, int, int, int] | None = None  # message, part, start, end
        if found:
            fmt, region = _infer_format(template, found)
        messages = []
        for mi, message in enumerate(template.messages):
            segments: list[Segment] = []
            parts = message.parts
            for pi, part in enumerate(parts):
                if isinstance(part, Slot):
                    segments.append(Segment("slot", part.name))
                    continue
                after_slot = pi > 0 and isinstance(parts[pi - 1], Slot)
                before_slot = pi + 1 < len(parts) and isinstance(parts[pi + 1], Slot)
                if region is not None and region[:2] == (mi, pi):
                    _, _, start, end = region
                    segments += _split_static(part[:start], after_slot, False)
                    segments.append(Segment("examples"))
                    segments += _split_static(part[end:], False, before_slot)
                else:
                    segments += _split_static(part, after_slot, before_slot)
            messages.append(MessageLayout(message.role, tuple(segments)))
        if region is None:
            messages = _insert_default_region(template, messages)
        return cls(template=template, messages=tuple(messages), example_format=fmt)

    def instruction_texts(self) -> list[str]:
        """The texts a compressor sees (instruction segments without their surrounding whitespace)."""
        return [s.text.strip() for m in self.messages for s in m.segments if s.kind == "instruction" and s.text.strip()]

    def render(
        self,
        values: Mapping[str, str],
        *,
        examples: Sequence[Mapping[str, Any]],
        compress: Callable[[str], str],
    ) -> Rendered:
        """The stage input: instructions through `compress`, the given examples, the slots filled."""
        shown = self.example_format.render_many(self.template, examples)
        texts: list[str] = []
        for message in self.messages:
            out: list[str] = []
            for seg in message.segments:
                if seg.kind == "slot":
                    out.append(values[seg.text])
                elif seg.kind == "frame":
                    out.append(seg.text)
                elif seg.kind == "instruction":
                    out.append(_compress_core(seg.text, compress))
                elif shown and self.example_format.declared:
                    out.append(shown)
                elif shown:
                    lead = DEFAULT_SEPARATOR if out and not "".join(out).endswith("\n") else ""
                    out.append(lead + shown + DEFAULT_SEPARATOR)
            texts.append(_tidy("".join(out)))
        if self.template.kind == "completion":
            return texts[0]
        return [
            {"role": m.role, "content": t} for m, t in zip(self.messages, texts, strict=True) if t
        ]

    def full_prompt(self, values: Mapping[str, str]) -> Rendered:
        return self.template.render(values)

    def bare(self, values: Mapping[str, str]) -> Rendered:
        return bare_query_messages(self.template, values)


def _compress_core(text: str, compress: Callable[[str], str]) -> str:
    """Compress the text between its leading and trailing whitespace, which is kept as a boundary."""
    core = text.strip()
    if not core:
        return text
    start = text.index(core)
    return text[:start] + compress(core) + text[start + len(core) :]


def _tidy(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n").rstrip()


def _find_examples(template: PromptTemplate, examples: Sequence[Mapping[str, Any]]) -> list[_Found]:
    """Where each declared example sits: the tightest free occurrence (shortest text between its parts)."""
    claimed: list[_Found] = []
    for n, example in enumerate(examples):
        values = [example[s] for s in template.slots]
        candidates: list[_Found] = []
        for mi, message in enumerate(template.messages):
            for pi, part in enumerate(message.parts):
                if isinstance(part, Slot):
                    continue
                for s, e, joins in _locate(part, values, example[RESPONSE], 0):
                    if not any(c.message == mi and c.part == pi and s < c.end and c.start < e for c in claimed):
                        candidates.append(_Found(mi, pi, s, e, joins))
        if not candidates:
            raise TrainDataError(
                f"example {n} does not appear verbatim in the template (its slot values then its "
                f"response, at most {MAX_GAP} characters apart, inside one message)"
            )
        claimed.append(min(candidates, key=lambda f: (sum(map(len, f.joins)), f.message, f.part, f.start)))
    return claimed


def _infer_format(template: PromptTemplate, found: list[_Found]) -> tuple[ExampleFormat, tuple[int, int, int, int]]:
    places = {(f.message, f.part) for f in found}
    if len(places) != 1:
        raise TrainDataError("the declared examples must sit together in one message of the template")
    mi, pi = places.pop()
    text = template.messages[mi].parts[pi]
    assert isinstance(text, str)
    spans = sorted(found, key=lambda f: f.start)
    before_first = text[: spans[0].start]
    gaps = [text[a.end : b.start] for a, b in itertools.pairwise(spans)]
    if gaps:
        prefix = _common_suffix([*gaps, before_first]).lstrip()
        separator = gaps[0][: len(gaps[0]) - len(prefix)] or "\n"
    else:
        prefix = before_first[before_first.rfind("\n") + 1 :]
        separator = DEFAULT_SEPARATOR
    fmt = ExampleFormat(prefix=prefix, joins=spans[0].joins, separator=separator, declared=True)
    return fmt, (mi, pi, spans[0].start - len(prefix), spans[-1].end)


def _insert_default_region(template: PromptTemplate, messages: list[MessageLayout]) -> list[MessageLayout]:
    """No declared examples: retrieved ones go just before the first slot's frame."""
    first_slot = template.slots[0]
    out = []
    for message in messages:
        segs = list(message.segments)
        for i, seg in enumerate(segs):
            if seg.kind == "slot" and seg.text == first_slot:
                at = i - 1 if i > 0 and segs[i - 1].kind == "frame" else i
                segs.insert(at, Segment("examples"))
                break
        out.append(MessageLayout(message.role, tuple(segs)))
    return out
