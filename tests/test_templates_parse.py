"""Template text parsing: the brace-to-brace parser agrees with a character-by-character reading on any text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.templates import SLOT_NAME, Part, Slot, TemplateError, parse_text


def reference_parse(text: str, param: str) -> tuple[Part, ...]:
    """The parser as first written: one character at a time (slow on long templates, obviously right)."""
    parts: list[Part] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "{":
            if i + 1 < n and text[i + 1] == "{":
                buf.append("{")
                i += 2
                continue
            end = text.find("}", i + 1)
            if end == -1:
                raise TemplateError(f"unbalanced '{{' at character {i}", param)
            name = text[i + 1 : end]
            if not SLOT_NAME.fullmatch(name):
                raise TemplateError(
                    f"invalid slot name {name!r} at character {i}: use letters, digits and '_' "
                    "(write '{{' and '}}' for literal braces)",
                    param,
                )
            if buf:
                parts.append("".join(buf))
                buf = []
            elif parts and isinstance(parts[-1], Slot):
                raise TemplateError(
                    f"slots {{{parts[-1].name}}} and {{{name}}} touch: put static text between them",
                    param,
                )
            parts.append(Slot(name))
            i = end + 1
        elif ch == "}":
            if i + 1 < n and text[i + 1] == "}":
                buf.append("}")
                i += 2
                continue
            raise TemplateError(f"unbalanced '}}' at character {i}", param)
        else:
            buf.append(ch)
            i += 1
    if buf:
        parts.append("".join(buf))
    return tuple(parts)



def outcome(text: str) -> tuple[Part, ...] | str:
    try:
        return parse_text(text, "p")
    except TemplateError as exc:
        return f"error: {exc}"


def reference_outcome(text: str) -> tuple[Part, ...] | str:
    try:
        return reference_parse(text, "p")
    except TemplateError as exc:
        return f"error: {exc}"


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["{", "}", "{{", "}}", "a", " ", "x_1", "\n", "é", "{q}", "{bad name}"]),
                max_size=14).map("".join))
def test_the_fast_parser_reads_every_text_as_the_reference_does(text: str) -> None:
    assert outcome(text) == reference_outcome(text)


@pytest.mark.parametrize("text,parts", [
    ("Input: {query}\nOutput:", ("Input: ", Slot("query"), "\nOutput:")),
    ("{{literal}} {x}", ("{literal} ", Slot("x"))),
    ("", ()),
])
def test_examples(text: str, parts: tuple[Part, ...]) -> None:
    assert parse_text(text, "p") == parts
