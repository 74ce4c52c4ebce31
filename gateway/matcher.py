"""Which registered template, if any, a request is an instance of.

Templates are filed under a key built from each message: the whole text of a message without
slots, and the start and end of the static text around the slots of the others (cut to a power
of two up to `ANCHOR_CHARS`, so the distinct cuts, and with them the look-ups a request costs, stay
few however many templates there are). A request computes its own key once per cut shape, looks
up the candidates, and checks only those, best candidate first. A candidate found under its key
already equals the request in every message without slots (the look-up compared them), so only its
messages with slots are read (`MessageTemplate.match`'s reading, worked out once per template).

Readers take one immutable generation of the index and never lock; writers build the next one and
swap it in. Buckets are spread by hash over 64 x 64 small dicts, and a change copies only the leaf it
touches and the two 64-slot tuples leading to it, so adding or removing a template costs the same
whether ten or a hundred thousand are registered (copying the whole index made registering n
templates cost n squared). `add_many` builds one generation for a whole batch (start-up).
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

    def template_key(self, messages: Sequence[MessageTemplate], static_texts: Sequence[str]) -> Key:
        """The key of every request that fills these messages in: the same one `request_key` reads from them."""
        key: list[object] = [self.exact(static_texts)]
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


def _message_cuts(message: MessageTemplate, is_static: bool) -> tuple[int, int]:
    if is_static:
        return (EXACT, EXACT)
    return (_cut(len(message.static_prefix)), _cut(len(message.static_suffix)))


BucketKey = tuple[_Shape, Key]
Leaf = dict[BucketKey, tuple[_Entry, ...]]  # each bucket best first

FANOUT_BITS = 6
FANOUT = 1 << FANOUT_BITS
_MASK = FANOUT - 1
_EMPTY_TABLE: tuple[tuple[Leaf, ...], ...] = tuple(tuple({} for _ in range(FANOUT)) for _ in range(FANOUT))


@dataclass(frozen=True, slots=True)
class _Index:
    """One immutable generation of the index, so readers never see a half-applied change.

    Buckets are spread by hash over FANOUT x FANOUT small dicts (`table[row][leaf]`): a change copies
    the two tuples on its path and the one leaf it touches, not the whole index.
    """

    table: tuple[tuple[Leaf, ...], ...]
    shapes: dict[Group, tuple[_Shape, ...]]  # the shapes with at least one template, per group


def _place(key: BucketKey) -> tuple[int, int]:
    h = hash(key)
    return h & _MASK, (h >> FANOUT_BITS) & _MASK


class _Draft:
    """The next generation, built from the current one by copying only what a change touches (once per batch)."""

    def __init__(self, index: _Index) -> None:
        self._index = index
        self._rows: dict[int, list[Leaf]] = {}
        self._copied: set[tuple[int, int]] = set()
        self.shapes = index.shapes
        self._shapes_copied = False

    def leaf(self, key: BucketKey) -> Leaf:
        """The writable leaf that holds `key`'s bucket."""
        row, leaf = _place(key)
        if row not in self._rows:
            self._rows[row] = list(self._index.table[row])
        if (row, leaf) not in self._copied:
            self._rows[row][leaf] = dict(self._rows[row][leaf])
            self._copied.add((row, leaf))
        return self._rows[row][leaf]

    def set_shapes(self, group: Group, shapes: tuple[_Shape, ...]) -> None:
        if not self._shapes_copied:
            self.shapes, self._shapes_copied = dict(self.shapes), True
        if shapes:
            self.shapes[group] = shapes
        else:
            del self.shapes[group]

    def build(self) -> _Index:
        if not self._rows and not self._shapes_copied:
            return self._index
        table = list(self._index.table)
        for row, leaves in self._rows.items():
            table[row] = tuple(leaves)
        return _Index(tuple(table), self.shapes)


class Matcher:
    """Index of registered templates: detection cost grows with the request's length, and adding or removing a
    template costs the same, whatever the number registered."""

    def __init__(self) -> None:
        self._index = _Index(_EMPTY_TABLE, {})
        # The writers' own books, under the lock: readers use only `_index`.
        self._entries: dict[str, _Entry] = {}
        self._shape_of: dict[tuple[Group, Cuts], _Shape] = {}  # one object per shape in use (hashed by identity)
        self._filed: dict[_Shape, int] = {}  # templates per shape in use
        self._write_lock = threading.Lock()

    def add(self, name: str, template: PromptTemplate) -> None:
        """Register (or replace) `name`; readers switch to the new index in one reference swap."""
        self.add_many([(name, template)])

    def add_many(self, templates: Iterable[tuple[str, PromptTemplate]]) -> None:
        """Register (or replace) each `(name, template)` in one new generation (a bulk load: start-up)."""
        with self._write_lock:
            draft = _Draft(self._index)
            try:
                for name, template in templates:
                    self._add(draft, name, template)
            finally:
                self._index = draft.build()

    def remove(self, name: str) -> None:
        """Stop matching `name`; unknown names are ignored so deletes can be retried."""
        with self._write_lock:
            old = self._entries.pop(name, None)
            if old is not None:
                draft = _Draft(self._index)
                self._unfile(draft, old)
                self._index = draft.build()

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
        index = self._index
        shapes = index.shapes.get(group)
        if not shapes:
            return None
        table = index.table
        found: list[tuple[_Entry, ...]] = []
        for shape in shapes:
            key = (shape, shape.request_key(texts))
            h = hash(key)
            bucket = table[h & _MASK][(h >> FANOUT_BITS) & _MASK].get(key)
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

    def _add(self, draft: _Draft, name: str, template: PromptTemplate) -> None:
        messages = template.messages
        group: Group = (template.kind, tuple(m.role for m in messages))
        static = [m.is_static for m in messages]
        static_texts = [m.static_text for m in messages]
        cuts = tuple(_message_cuts(m, s) for m, s in zip(messages, static, strict=True))
        shape = self._shape_of.get((group, cuts))
        if shape is None:
            shape = self._shape_of[(group, cuts)] = _Shape(cuts)
        slotted = tuple((i, _Reader(m)) for i, (m, s) in enumerate(zip(messages, static, strict=True)) if not s)
        rank = (-sum(map(len, static_texts)), name)  # the template's static_chars: the most static text first
        entry = _Entry(rank, name, template, (group, shape, shape.template_key(messages, static_texts)), slotted)
        old = self._entries.get(name)
        self._file(draft, entry)
        self._entries[name] = entry
        if old is not None:
            self._unfile(draft, old)

    def _file(self, draft: _Draft, entry: _Entry) -> None:
        group, shape, key = entry.filed
        leaf = draft.leaf((shape, key))
        bucket = list(leaf.get((shape, key), ()))
        bisect.insort(bucket, entry, key=_rank)
        leaf[(shape, key)] = tuple(bucket)
        filed = self._filed.get(shape, 0)
        self._filed[shape] = filed + 1
        if not filed:
            draft.set_shapes(group, tuple(sorted((*draft.shapes.get(group, ()), shape), key=lambda s: s.cuts)))

    def _unfile(self, draft: _Draft, entry: _Entry) -> None:
        group, shape, key = entry.filed
        leaf = draft.leaf((shape, key))
        rest = tuple(e for e in leaf[(shape, key)] if e is not entry)
        if rest:
            leaf[(shape, key)] = rest
        else:
            del leaf[(shape, key)]
        filed = self._filed[shape] - 1
        if filed:
            self._filed[shape] = filed
        else:
            del self._filed[shape]
            del self._shape_of[(group, shape.cuts)]
            draft.set_shapes(group, tuple(s for s in draft.shapes[group] if s is not shape))
