"""Which registered template, if any, a request is an instance of.

Templates are filed under a key built from each message: the whole text of a message without
slots, and the start and end of the static text around the slots of the others (cut to a power
of two up to `ANCHOR_CHARS`, so the distinct cuts, and with them the look-ups a request costs, stay
few however many templates there are). A request computes its own key once per cut shape, looks
up the candidates, and checks only those, best candidate first. A candidate found under its key
already equals the request in every message without slots (the look-up compared them), so only its
messages with slots are read with `MessageTemplate.match`.

Adding or removing a template touches only its own bucket, so it costs the same whether ten or a
hundred thousand are registered. Changes are made in place, under a lock that only writers take;
every value a reader looks up (a bucket, the shapes of a group) is an immutable tuple replaced in
one assignment, so a reader sees a template either wholly filed or not at all. A replacement files
the new template before it takes the old one out: a request never finds neither.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from core.templates import COMPLETION_ROLE, MessageTemplate, PromptTemplate, Slot, TemplateKind

ANCHOR_CHARS = 64
EXACT = -1

Group = tuple[TemplateKind, tuple[str, ...]]
Cuts = tuple[tuple[int, int], ...]
Key = tuple[object, ...]


def _normalize(text: str) -> str:
    """`core.templates.normalize` (CRLF to LF, trailing whitespace dropped) without its scan for CRLF when the
    text has no CR at all: finding one character is several times faster than `str.replace`'s search."""
    return text.replace("\r\n", "\n").rstrip() if "\r" in text else text.rstrip()


@dataclass(frozen=True)
class Match:
    name: str
    template: PromptTemplate
    values: dict[str, str]


def _nothing(_: Sequence[str]) -> tuple[()]:
    return ()


class _Shape:
    """One way of cutting a group's messages into a key: `(head, tail)` characters of static text kept
    around the slots of each message, or `EXACT` for a message without slots (kept whole)."""

    __slots__ = ("anchored", "cuts", "exact")

    def __init__(self, cuts: Cuts) -> None:
        self.cuts = cuts
        whole = [i for i, (head, _) in enumerate(cuts) if head == EXACT]
        # itemgetter picks the whole messages in C: one index gives the text itself, several a tuple.
        self.exact: Any = itemgetter(*whole) if whole else _nothing
        self.anchored = tuple((i, head, tail) for i, (head, tail) in enumerate(cuts) if head != EXACT)

    def request_key(self, texts: Sequence[str]) -> Key:
        """What a request files under in this shape, read from its (normalised) message texts."""
        key: list[object] = [self.exact(texts)]
        for i, head, tail in self.anchored:
            text = texts[i]
            key.append(text[:head])
            key.append(text[max(0, len(text) - tail) :] if tail else "")
        return tuple(key)

    def template_key(self, template: PromptTemplate) -> Key:
        """The key of every request that fills `template` in: the same one `request_key` reads from them."""
        messages = template.messages
        key: list[object] = [self.exact([m.static_text for m in messages])]
        for i, head, tail in self.anchored:
            suffix = messages[i].static_suffix
            key.append(messages[i].static_prefix[:head])
            key.append(suffix[len(suffix) - tail :] if tail else "")
        return tuple(key)


class _Reader:
    """`MessageTemplate.match` of one message with slots, with what it reads from the template worked out once:
    the same leftmost reading (each slot as short as possible, linear in the text), without its per-call walk
    over the template's parts (most of its cost on a long request)."""

    __slots__ = ("first", "prefix", "steps", "suffix")

    def __init__(self, message: MessageTemplate) -> None:
        self.prefix, self.suffix = message.static_prefix, message.static_suffix
        parts = message.parts
        body = parts[1 if self.prefix else 0 : len(parts) - 1 if self.suffix else len(parts)]
        # Slots never touch, so the body is slot, (static text, slot)*.
        names = [p.name for p in body if isinstance(p, Slot)]
        separators = [p for p in body if isinstance(p, str)]
        self.first = names[0]
        self.steps = tuple(zip(separators, names[1:], strict=True))

    def read(self, text: str) -> dict[str, str] | None:
        prefix, suffix = self.prefix, self.suffix
        if not (text.startswith(prefix) and text.endswith(suffix)):
            return None
        pos, end = len(prefix), len(text) - len(suffix)
        values: dict[str, str] = {}
        pending = self.first
        for separator, name in self.steps:
            hit = text.find(separator, pos + 1, end - 1)
            if hit == -1:
                return None
            values[pending] = text[pos:hit]
            pos, pending = hit + len(separator), name
        if end - pos < 1:
            return None
        values[pending] = text[pos:end]
        return values


@dataclass(frozen=True, slots=True)
class _Entry:
    rank: tuple[int, str]
    name: str
    template: PromptTemplate
    filed: tuple[Group, _Shape, Key]
    slotted: tuple[tuple[int, _Reader], ...]  # the messages the key does not settle

    def fill(self, texts: Sequence[str]) -> dict[str, str] | None:
        """Slot values if `texts` fill this template in (its messages without slots already compared equal)."""
        if len(self.slotted) == 1:
            i, reader = self.slotted[0]
            return reader.read(texts[i])
        values: dict[str, str] = {}
        for i, reader in self.slotted:
            found = reader.read(texts[i])
            if found is None:
                return None
            values.update(found)
        return values


def _rank(entry: _Entry) -> tuple[int, str]:
    return entry.rank


def _cut(n: int) -> int:
    """Anchor length for `n` static characters: the largest power of two not above it, capped."""
    return 0 if n == 0 else min(1 << (n.bit_length() - 1), ANCHOR_CHARS)


def _message_cuts(message: MessageTemplate) -> tuple[int, int]:
    if message.is_static:
        return (EXACT, EXACT)
    return (_cut(len(message.static_prefix)), _cut(len(message.static_suffix)))


class Matcher:
    """Index of registered templates: detection cost grows with the request's length and adding a template
    costs the same, whatever the number registered."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._buckets: dict[tuple[_Shape, Key], tuple[_Entry, ...]] = {}  # best first
        self._shapes: dict[Group, tuple[_Shape, ...]] = {}  # shapes with at least one template
        self._shape_of: dict[tuple[Group, Cuts], _Shape] = {}  # one object per shape in use (hashed by identity)
        self._filed: dict[tuple[Group, _Shape], int] = {}  # templates per shape in use
        self._write_lock = threading.Lock()

    def add(self, name: str, template: PromptTemplate) -> None:
        """Register (or replace) `name`."""
        with self._write_lock:
            self._add(name, template)

    def add_many(self, templates: Iterable[tuple[str, PromptTemplate]]) -> None:
        """Register (or replace) each `(name, template)`: a bulk load (start-up) takes the lock once."""
        with self._write_lock:
            for name, template in templates:
                self._add(name, template)

    def remove(self, name: str) -> None:
        """Stop matching `name`; unknown names are ignored so deletes can be retried."""
        with self._write_lock:
            old = self._entries.pop(name, None)
            if old is not None:
                self._unfile(old)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries.copy())  # one C call: no writer can change the dict while it is copied

    def match_chat(self, messages: Sequence[tuple[str, str]]) -> Match | None:
        """The best chat template that (role, raw text) pairs fill in, if any."""
        roles = tuple(role for role, _ in messages)
        return self._match(("chat", roles), [_normalize(text) for _, text in messages])

    def match_completion(self, prompt: str) -> Match | None:
        """The best completion template that the whole prompt string fills in, if any."""
        return self._match(("completion", (COMPLETION_ROLE,)), [_normalize(prompt)])

    def _match(self, group: Group, texts: list[str]) -> Match | None:
        shapes = self._shapes.get(group)
        if not shapes:
            return None
        buckets = self._buckets
        found: list[tuple[_Entry, ...]] = []
        for shape in shapes:
            bucket = buckets.get((shape, shape.request_key(texts)))
            if bucket:
                found.append(bucket)
        if not found:
            return None
        candidates: Sequence[_Entry] = found[0]
        if len(found) > 1:
            candidates = sorted((e for bucket in found for e in bucket), key=_rank)
        for entry in candidates:
            values = entry.fill(texts)
            if values is not None:
                return Match(entry.name, entry.template, values)
        return None

    # -- writers, under the lock ---------------------------------------------------------------

    def _add(self, name: str, template: PromptTemplate) -> None:
        group: Group = (template.kind, template.roles)
        cuts = tuple(_message_cuts(m) for m in template.messages)
        shape = self._shape_of.get((group, cuts))
        if shape is None:
            shape = self._shape_of[(group, cuts)] = _Shape(cuts)
        slotted = tuple((i, _Reader(m)) for i, m in enumerate(template.messages) if not m.is_static)
        entry = _Entry((-template.static_chars, name), name, template, (group, shape, shape.template_key(template)),
                       slotted)
        old = self._entries.get(name)
        self._file(entry)
        self._entries[name] = entry
        if old is not None:
            self._unfile(old)

    def _file(self, entry: _Entry) -> None:
        group, shape, key = entry.filed
        bucket = list(self._buckets.get((shape, key), ()))
        bisect.insort(bucket, entry, key=_rank)
        self._buckets[(shape, key)] = tuple(bucket)
        filed = self._filed.get((group, shape), 0)
        self._filed[(group, shape)] = filed + 1
        if not filed:  # a new shape for the group: readers look it up from now on, its bucket already there
            shapes = self._shapes.get(group, ())
            self._shapes[group] = tuple(sorted((*shapes, shape), key=lambda s: s.cuts))

    def _unfile(self, entry: _Entry) -> None:
        group, shape, key = entry.filed
        rest = tuple(e for e in self._buckets[(shape, key)] if e is not entry)
        if rest:
            self._buckets[(shape, key)] = rest
        else:
            del self._buckets[(shape, key)]
        filed = self._filed[(group, shape)] - 1
        if filed:
            self._filed[(group, shape)] = filed
        else:
            del self._filed[(group, shape)]
            del self._shape_of[(group, shape.cuts)]
            shapes = tuple(s for s in self._shapes[group] if s is not shape)
            if shapes:
                self._shapes[group] = shapes
            else:
                del self._shapes[group]
