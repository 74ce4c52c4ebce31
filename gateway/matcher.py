"""Which registered template, if any, a request is an instance of.

Templates are indexed by a key built from each message: the whole text of a message without
slots, and the start and end of the static text around the slots of the others (cut to a power
of two up to `ANCHOR_CHARS`, so the distinct cuts, and with them the look-ups a request costs, stay
few however many templates there are). A request computes its own key once per cut shape, looks
up the candidates, and checks only those with `PromptTemplate.match`, best candidate first.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from core.templates import COMPLETION_ROLE, MessageTemplate, PromptTemplate, TemplateKind, normalize

ANCHOR_CHARS = 64
EXACT = -1

Group = tuple[TemplateKind, tuple[str, ...]]
Shape = tuple[tuple[int, int], ...]
Key = tuple[object, ...]


@dataclass(frozen=True)
class Match:
    name: str
    template: PromptTemplate
    values: dict[str, str]


@dataclass(frozen=True)
class _Entry:
    rank: tuple[int, str]
    name: str
    template: PromptTemplate


@dataclass(frozen=True)
class _Index:
    """One immutable generation of the index, so readers never see a half-applied change."""

    entries: dict[str, _Entry]
    buckets: dict[tuple[Group, Shape, Key], tuple[_Entry, ...]]
    shapes: dict[Group, tuple[Shape, ...]]
    shape_counts: dict[tuple[Group, Shape], int]


def _cut(n: int) -> int:
    """Anchor length for `n` static characters: the largest power of two not above it, capped."""
    return 0 if n == 0 else min(1 << (n.bit_length() - 1), ANCHOR_CHARS)


def _message_shape(message: MessageTemplate) -> tuple[int, int]:
    if message.is_static:
        return (EXACT, EXACT)
    return (_cut(len(message.static_prefix)), _cut(len(message.static_suffix)))


def _key(texts: Sequence[str], shape: Shape) -> Key:
    """What a template of this shape anchors on, read from (normalised) message texts."""
    key: list[object] = []
    for text, (head, tail) in zip(texts, shape, strict=True):
        if head == EXACT:
            key.append(text)
        else:
            key.append((text[:head], text[max(0, len(text) - tail) :] if tail else ""))
    return tuple(key)


def _template_parts(template: PromptTemplate) -> tuple[Group, Shape, Key]:
    """Where a template is filed: the same key that a request filling it in computes."""
    shape = tuple(_message_shape(m) for m in template.messages)
    key: list[object] = []
    for message, (head, tail) in zip(template.messages, shape, strict=True):
        if head == EXACT:
            key.append(message.static_text)
        else:
            suffix = message.static_suffix
            key.append((message.static_prefix[:head], suffix[len(suffix) - tail :] if tail else ""))
    return (template.kind, template.roles), shape, tuple(key)


class Matcher:
    """Index of registered templates; detection cost grows with the request's length, not the number of templates."""

    def __init__(self) -> None:
        self._index = _Index({}, {}, {}, {})
        self._write_lock = threading.Lock()

    def add(self, name: str, template: PromptTemplate) -> None:
        """Register (or replace) `name`; readers switch to the new index in one reference swap."""
        with self._write_lock:
            self._index = self._changed(self._index, name, template)

    def remove(self, name: str) -> None:
        """Stop matching `name`; unknown names are ignored so deletes can be retried."""
        with self._write_lock:
            if name in self._index.entries:
                self._index = self._changed(self._index, name, None)

    def __len__(self) -> int:
        return len(self._index.entries)

    def names(self) -> list[str]:
        return sorted(self._index.entries)

    def match_chat(self, messages: Sequence[tuple[str, str]]) -> Match | None:
        """The best chat template that (role, raw text) pairs fill in, if any."""
        roles = tuple(role for role, _ in messages)
        return self._match(("chat", roles), [normalize(text) for _, text in messages])

    def match_completion(self, prompt: str) -> Match | None:
        """The best completion template that the whole prompt string fills in, if any."""
        return self._match(("completion", (COMPLETION_ROLE,)), [normalize(prompt)])

    def _match(self, group: Group, texts: list[str]) -> Match | None:
        index = self._index
        candidates: list[_Entry] = []
        for shape in index.shapes.get(group, ()):
            candidates.extend(index.buckets.get((group, shape, _key(texts, shape)), ()))
        if len(candidates) > 1:
            candidates.sort(key=lambda entry: entry.rank)
        for entry in candidates:
            values = entry.template.match(texts)
            if values is not None:
                return Match(entry.name, entry.template, values)
        return None

    @staticmethod
    def _changed(index: _Index, name: str, template: PromptTemplate | None) -> _Index:
        """A copy of `index` without `name`, then with `template` under it when one is given."""
        entries, buckets = dict(index.entries), dict(index.buckets)
        counts = dict(index.shape_counts)
        touched: set[Group] = set()
        old = entries.pop(name, None)
        if old is not None:
            group, shape, key = _template_parts(old.template)
            rest = tuple(e for e in buckets[(group, shape, key)] if e.name != name)
            if rest:
                buckets[(group, shape, key)] = rest
            else:
                del buckets[(group, shape, key)]
            counts[(group, shape)] -= 1
            if not counts[(group, shape)]:
                del counts[(group, shape)]
            touched.add(group)
        if template is not None:
            entry = _Entry((-template.static_chars, name), name, template)
            entries[name] = entry
            group, shape, key = _template_parts(template)
            bucket = (*buckets.get((group, shape, key), ()), entry)
            buckets[(group, shape, key)] = tuple(sorted(bucket, key=lambda e: e.rank))
            counts[(group, shape)] = counts.get((group, shape), 0) + 1
            touched.add(group)
        shapes = dict(index.shapes)
        for group in touched:
            present = tuple(sorted(s for g, s in counts if g == group))
            if present:
                shapes[group] = present
            else:
                shapes.pop(group, None)
        return _Index(entries, buckets, shapes, counts)
