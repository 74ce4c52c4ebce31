"""Mining recurring prompts out of passthrough traffic: an online anchor/alignment miner, pure and synchronous.

Each request (its normalised message texts, as the matcher reads them) joins a cluster whose template it
matches, or is aligned against the clusters it shares the most anchors with, or starts a cluster of its own.

- **Anchors.** A request's anchors are the smallest hashes of its word 4-grams (a bottom-k sketch); a cluster's are
  those of its template's static text. Requests of one template share the anchors of its static text, unrelated
  ones almost none, so only a few clusters are ever aligned against, however many are kept.
- **Alignment.** The template (static tokens, a wildcard for each slot) is aligned with the request's tokens
  (`difflib.SequenceMatcher`, longest common blocks first, so the long static runs anchor the alignment). Tokens in
  both stay static; every stretch that differs becomes one slot. A template only ever loses static tokens, so it
  goes on matching every request it was mined from. Short, wordless static runs between two slots (a space, a
  comma: chance agreements of two slot values) are folded into the slot, and a slot the request leaves empty takes
  a neighbouring token (slot values may not be empty). A merge is kept only when the template keeps at least
  `merge_share` of the request's characters as static text; otherwise the request starts a cluster of its own.
- **No token-count branching.** Drain, the classic online log-template miner, first branches on a line's token
  count and treats each token position as a possible parameter: it assumes a slot is one token. Here a slot is a
  user's text (a question, a document, several lines), so one template's requests have every length; branching
  on the count would split each template into one cluster per value length, none of which ever gathers enough
  requests. Clusters are therefore keyed on (tenant, kind, roles) only, and slots are inferred from aligned
  differences, whatever their length.
- **Bounded memory.** At most `max_clusters` clusters, in two LRU segments: clusters seen once (most of them
  one-off requests) are evicted first, and recurring ones keep at most 80% of the room, so a flood of one-off
  requests cannot push out a recurring template, nor recurring ones starve new arrivals. A cluster keeps its
  template's static text, counts, and at most `MAX_EXAMPLES` example slot values. Requests longer than
  `max_chars` are ignored.

The gateway's matching rules (`core.templates`) are the judge: a cluster's template is a `MessageTemplate` per
message, and a request belongs to it exactly when `MessageTemplate.match` says so.
"""

from __future__ import annotations

import difflib
import hashlib
import heapq
import json
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from core.templates import COMPLETION_ROLE, SLOT_NAME, MessageTemplate, Part, Slot, normalize

TOKEN = re.compile(r"\w+|[^\w\s]|\s+")
WORD = re.compile(r"\w")
SKETCH_SIZE = 32  # anchors kept per request and per cluster
SHINGLE = 4  # words per anchor
MAX_EXAMPLES = 3  # example slot values kept per cluster
HINTS = 4096  # fingerprints remembered with the cluster their last request joined
ALIGN_CANDIDATES = 3  # clusters a new request is aligned against, most shared anchors first
MIN_SHARED_ANCHORS = 3
WEAK_RUN_WORD_CHARS = 3  # a static run between two slots with fewer word characters is a chance agreement
PROTECTED_SHARE = 0.8  # of max_clusters, at most, for clusters seen more than once
LABEL = re.compile(r"([A-Za-z][A-Za-z0-9_ -]{0,40}?)\s*[:=]\s*$")

Item = str | None  # a static token, or None for a slot
Key = tuple[str | None, str, tuple[str, ...]]  # tenant, kind, roles


@dataclass(frozen=True)
class Observation:
    """One passthrough request as the miner sees it: texts as sent (normalised here), seen at `at` (epoch s)."""

    tenant: str | None
    kind: str  # chat | completion
    roles: tuple[str, ...]  # `prompt` for a completion
    texts: tuple[str, ...]
    at: float


@dataclass
class Cluster:
    serial: int
    key: Key
    messages: list[list[Item]]  # per message: static runs (joined) and None for each slot
    count: int
    chars_total: int  # characters of every request counted (normalised texts)
    first_seen: float
    last_seen: float
    anchors: frozenset[int]
    examples: deque[tuple[str, ...]] = field(default_factory=lambda: deque(maxlen=MAX_EXAMPLES))
    compiled: tuple[MessageTemplate, ...] = ()

    @property
    def slot_count(self) -> int:
        return sum(1 for items in self.messages for item in items if item is None)

    @property
    def static_chars(self) -> int:
        return sum(len(item) for items in self.messages for item in items if item is not None)


@dataclass(frozen=True)
class Summary:
    """A cluster with at least one slot, as the service stores and ranks it."""

    id: str
    tenant: str | None
    kind: str
    template: list[dict[str, str]] | str  # source, `{slot}` names, literal braces doubled
    slots: list[str]
    requests: int
    chars_total: int
    static_chars: int
    examples: list[dict[str, str]]
    first_seen: float
    last_seen: float


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def _sketch(texts: Iterable[str]) -> frozenset[int]:
    """The SKETCH_SIZE smallest hashes of the word 4-grams (whitespace skipped) of these texts."""
    hashes: set[int] = set()
    for message, text in enumerate(texts):
        words = [t for t in TOKEN.findall(text) if not t.isspace()]
        if len(words) < SHINGLE:
            if words:
                hashes.add(hash((message, *words)))
            continue
        hashes.update(hash((message, *words[i:i + SHINGLE])) for i in range(len(words) - SHINGLE + 1))
    return frozenset(heapq.nsmallest(SKETCH_SIZE, hashes))


def _template_sketch(messages: Sequence[Sequence[Item]]) -> frozenset[int]:
    """Anchors of the static text only: the 4-grams that do not cross a slot."""
    hashes: set[int] = set()
    for message, items in enumerate(messages):
        run: list[str] = []
        for item in [*items, None]:
            if item is not None:
                run.extend(t for t in TOKEN.findall(item) if not t.isspace())
                continue
            if 0 < len(run) < SHINGLE:
                hashes.add(hash((message, *run)))
            hashes.update(hash((message, *run[i:i + SHINGLE])) for i in range(len(run) - SHINGLE + 1))
            run = []
    return frozenset(heapq.nsmallest(SKETCH_SIZE, hashes))


def _compile(items: Sequence[Item], role: str) -> MessageTemplate:
    parts: list[Part] = []
    slot = 0
    for item in items:
        if item is None:
            parts.append(Slot(f"s{slot}"))
            slot += 1
        elif item:
            parts.append(item)
    return MessageTemplate(role=role, parts=tuple(parts))


def _joined(items: Iterable[Item]) -> list[Item]:
    """Static tokens joined into runs, neighbouring slots into one."""
    out: list[Item] = []
    for item in items:
        if item is None:
            if not out or out[-1] is not None:
                out.append(None)
        elif item:
            if out and out[-1] is not None:
                out[-1] = out[-1] + item
            else:
                out.append(item)
    return out


def _expanded(items: Sequence[Item]) -> list[Item]:
    """Static runs split into tokens (the unit of alignment)."""
    out: list[Item] = []
    for item in items:
        if item is None:
            out.append(None)
        else:
            out.extend(TOKEN.findall(item))
    return out


class _Wildcard:
    """A slot in an alignment: equal to nothing, so no request token is ever matched to it."""

    __slots__ = ()


def align(items: Sequence[Item], text: str) -> list[Item] | None:
    """The template generalised so that it also matches `text` (None if no template can: an empty text against
    a slot-free one is impossible to tell apart, and is left to the caller's share check)."""
    template = _expanded(items)
    request = TOKEN.findall(text)
    keys: list[object] = [_Wildcard() if t is None else t for t in template]
    matcher = difflib.SequenceMatcher(None, keys, request, autojunk=False)  # type: ignore[arg-type]
    # Per template token: kept (matched) or not; per gap between kept tokens: the request's characters there.
    kept = [False] * len(template)
    pairs: list[tuple[int, int]] = []  # (template index, request index) of each kept token
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            kept[a + k] = True
            pairs.append((a + k, b + k))
    return _settle(template, request, pairs)


def _settle(template: list[Item], request: list[str], pairs: list[tuple[int, int]]) -> list[Item] | None:
    """Build the merged template from the kept token pairs: a slot wherever template or request differ, no slot
    empty in the request, and no weak static run between two slots."""
    while True:
        merged: list[Item] = []
        empty_slot_at: int | None = None  # index into pairs of the kept token after an empty slot
        prev_a, prev_b = -1, -1
        for index, (a, b) in enumerate([*pairs, (len(template), len(request))]):
            gap_template = a - prev_a - 1
            gap_request = b - prev_b - 1
            if gap_template or gap_request:
                if gap_request == 0:
                    empty_slot_at = index
                    break
                merged.append(None)
            if index < len(pairs):
                merged.append(template[a])
            prev_a, prev_b = a, b
        if empty_slot_at is not None:
            # The request has nothing where the template differs: widen the gap by one kept token.
            if not pairs:
                return None
            drop = empty_slot_at if empty_slot_at < len(pairs) else empty_slot_at - 1
            pairs = pairs[:drop] + pairs[drop + 1:]
            continue
        weak = _weak_run(merged)
        if weak is None:
            return _joined(merged)
        # Drop the kept tokens of that run and settle again.
        start, end = weak
        run_positions = [i for i, item in enumerate(merged) if item is not None]
        run_ordinals = {pos: n for n, pos in enumerate(run_positions)}
        doomed = {run_ordinals[i] for i in range(start, end)}
        pairs = [p for n, p in enumerate(pairs) if n not in doomed]


def _weak_run(merged: Sequence[Item]) -> tuple[int, int] | None:
    """The first static run between two slots with too few word characters to be anything but chance."""
    i = 0
    while i < len(merged):
        if merged[i] is not None:
            i += 1
            continue
        j = i + 1
        while j < len(merged) and merged[j] is not None:
            j += 1
        if j < len(merged) and j > i + 1:  # merged[i] and merged[j] are slots, static in between
            words = sum(len(t) for t in merged[i + 1:j] if t is not None and WORD.match(t))
            if words < WEAK_RUN_WORD_CHARS:
                return i + 1, j
        i = j
    return None


def slot_names(messages: Sequence[Sequence[Item]]) -> list[str]:
    """Names for a template's slots: the label written before a slot (`Question: {question}`) when it makes a
    unique identifier, `query` for a lone slot, else `slot1`, `slot2`, ..."""
    total = sum(1 for items in messages for item in items if item is None)
    names: list[str] = []
    ordinal = 0
    for items in messages:
        before = ""
        for item in items:
            if item is not None:
                before = item
                continue
            ordinal += 1
            found = LABEL.search(before[-48:])
            label = re.sub(r"[^A-Za-z0-9_]+", "_", found.group(1).strip()).strip("_").lower() if found else ""
            if label and SLOT_NAME.fullmatch(label) and label not in names:
                names.append(label)
            elif total == 1:
                names.append("query")
            else:
                name = f"slot{ordinal}"
                while name in names:
                    name += "_"
                names.append(name)
            before = ""
    return names


def source(messages: Sequence[Sequence[Item]], roles: Sequence[str], kind: str,
           names: Sequence[str]) -> list[dict[str, str]] | str:
    """The template as registration source: `{name}` for slots, literal braces doubled."""
    slots = iter(names)
    texts = ["".join("{" + next(slots) + "}" if item is None else item.replace("{", "{{").replace("}", "}}")
                     for item in items) for items in messages]
    if kind == "completion":
        return texts[0]
    return [{"role": role, "content": text} for role, text in zip(roles, texts, strict=True)]


def candidate_id(tenant: str | None, kind: str, template: list[dict[str, str]] | str) -> str:
    """The hash of the template (and of its tenant, when it has one: each tenant's candidates are its own)."""
    blob: dict[str, object] = {"kind": kind, "template": template}
    if tenant is not None:
        blob["tenant"] = tenant
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


class PromptMiner:
    """The clusters of one process's sampled passthrough traffic; not thread-safe (the service holds a lock)."""

    def __init__(self, max_clusters: int = 1000, merge_share: float = 0.4, max_chars: int = 200_000) -> None:
        self.max_clusters = max_clusters
        self.merge_share = merge_share
        self.max_chars = max_chars
        self._once: OrderedDict[int, Cluster] = OrderedDict()  # seen once, least recent first
        self._recurring: OrderedDict[int, Cluster] = OrderedDict()
        self._index: dict[int, set[int]] = {}  # anchor hash -> cluster serials
        self._hints: OrderedDict[int, int] = OrderedDict()  # request fingerprint -> cluster serial
        self._serial = 0
        self.observed = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._once) + len(self._recurring)

    def clusters(self) -> list[Cluster]:
        return [*self._recurring.values(), *self._once.values()]

    def _get(self, serial: int) -> Cluster | None:
        return self._recurring.get(serial) or self._once.get(serial)

    # -- observing ---------------------------------------------------------------------------------------------

    def observe(self, obs: Observation, fingerprint: int | None = None) -> Cluster | None:
        """Count one request; the cluster it joined or started (None: ignored, too long or empty). `fingerprint`
        (a cheap hash of the request's shape and start) names the cluster to try first: the one its last request
        with that fingerprint joined."""
        texts = tuple(normalize(t) for t in obs.texts)
        size = sum(len(t) for t in texts)
        if size == 0 or size > self.max_chars:
            return None
        self.observed += 1
        key: Key = (obs.tenant, obs.kind, obs.roles)
        joined = self._join(key, texts, size, obs.at, fingerprint)
        if fingerprint is not None:
            self._hints[fingerprint] = joined.serial
            self._hints.move_to_end(fingerprint)
            if len(self._hints) > HINTS:
                self._hints.popitem(last=False)
        return joined

    def _join(self, key: Key, texts: tuple[str, ...], size: int, at: float, fingerprint: int | None) -> Cluster:
        hinted = self._get(self._hints.get(fingerprint, -1)) if fingerprint is not None else None
        if hinted is not None and hinted.key == key:
            values = self._match(hinted, texts)
            if values is not None:
                self._count(hinted, texts, values, at)
                return hinted
        sketch = _sketch(texts)
        candidates = self._candidates(key, sketch)
        for cluster in candidates:
            values = self._match(cluster, texts)
            if values is not None:
                self._count(cluster, texts, values, at)
                return cluster
        for cluster in candidates[:ALIGN_CANDIDATES]:
            if self._merge(cluster, texts, size, at):
                return cluster
        return self._start(key, texts, sketch, at)

    def _candidates(self, key: Key, sketch: frozenset[int]) -> list[Cluster]:
        shared: dict[int, int] = {}
        for anchor in sketch:
            for serial in self._index.get(anchor, ()):
                shared[serial] = shared.get(serial, 0) + 1
        need = min(MIN_SHARED_ANCHORS, max(1, len(sketch) // 4))
        ranked = sorted((n, s) for s, n in shared.items() if n >= need)
        out = []
        for _, serial in reversed(ranked):
            cluster = self._get(serial)
            if cluster is not None and cluster.key == key:
                out.append(cluster)
        return out

    @staticmethod
    def _match(cluster: Cluster, texts: Sequence[str]) -> tuple[str, ...] | None:
        values: list[str] = []
        for message, text in zip(cluster.compiled, texts, strict=True):
            found = message.match(text)
            if found is None:
                return None
            values.extend(found[f"s{i}"] for i in range(len(found)))
        return tuple(values)

    def _count(self, cluster: Cluster, texts: Sequence[str], values: tuple[str, ...], at: float) -> None:
        cluster.count += 1
        cluster.chars_total += sum(len(t) for t in texts)
        cluster.last_seen = max(cluster.last_seen, at)
        cluster.first_seen = min(cluster.first_seen, at)
        if values:
            cluster.examples.append(values)
        self._touch(cluster)

    def _merge(self, cluster: Cluster, texts: Sequence[str], size: int, at: float) -> bool:
        merged: list[list[Item]] = []
        for items, text in zip(cluster.messages, texts, strict=True):
            aligned = align(items, text)
            if aligned is None:
                return False
            merged.append(aligned)
        static = sum(len(i) for items in merged for i in items if i is not None)
        mean = max(size, cluster.chars_total / cluster.count)
        if static < self.merge_share * mean:
            return False
        roles = cluster.key[2]
        compiled = tuple(_compile(items, role) for items, role in zip(merged, roles, strict=True))
        old_texts = [self._render(cluster, values) for values in cluster.examples]
        candidate = Cluster(cluster.serial, cluster.key, merged, cluster.count, cluster.chars_total,
                            cluster.first_seen, cluster.last_seen, _template_sketch(merged), compiled=compiled)
        values = self._match(candidate, texts)
        if values is None:  # the alignment's promise did not hold: never keep a template that misses its request
            return False
        for old in old_texts:
            again = self._match(candidate, old)
            if again is not None:
                candidate.examples.append(again)
        self._unindex(cluster)
        cluster.messages, cluster.compiled, cluster.anchors = merged, compiled, candidate.anchors
        cluster.examples = candidate.examples
        self._index_cluster(cluster)
        self._count(cluster, texts, values, at)
        return True

    @staticmethod
    def _render(cluster: Cluster, values: tuple[str, ...]) -> tuple[str, ...]:
        it = iter(values)
        return tuple("".join(next(it) if item is None else item for item in items) for items in cluster.messages)

    def _start(self, key: Key, texts: tuple[str, ...], sketch: frozenset[int], at: float) -> Cluster:
        self._serial += 1
        messages: list[list[Item]] = [[t] if t else [] for t in texts]
        roles = key[2]
        cluster = Cluster(self._serial, key, messages, 1, sum(len(t) for t in texts), at, at, sketch,
                          compiled=tuple(_compile(m, r) for m, r in zip(messages, roles, strict=True)))
        self._once[cluster.serial] = cluster
        self._index_cluster(cluster)
        self._evict()
        return cluster

    # -- memory --------------------------------------------------------------------------------------------------

    def _touch(self, cluster: Cluster) -> None:
        if cluster.serial in self._once:
            del self._once[cluster.serial]
            self._recurring[cluster.serial] = cluster
            limit = max(1, int(self.max_clusters * PROTECTED_SHARE))
            while len(self._recurring) > limit:
                self._drop(next(iter(self._recurring.values())))
        else:
            self._recurring.move_to_end(cluster.serial)

    def _evict(self) -> None:
        while len(self) > self.max_clusters:
            oldest = next(iter(self._once.values())) if self._once else next(iter(self._recurring.values()))
            self._drop(oldest)

    def _drop(self, cluster: Cluster) -> None:
        self._once.pop(cluster.serial, None)
        self._recurring.pop(cluster.serial, None)
        self._unindex(cluster)
        self.evicted += 1

    def _index_cluster(self, cluster: Cluster) -> None:
        for anchor in cluster.anchors:
            self._index.setdefault(anchor, set()).add(cluster.serial)

    def _unindex(self, cluster: Cluster) -> None:
        for anchor in cluster.anchors:
            serials = self._index.get(anchor)
            if serials is not None:
                serials.discard(cluster.serial)
                if not serials:
                    del self._index[anchor]

    def forget(self, ids: Iterable[str]) -> int:
        """Drop the clusters whose candidate id is in `ids` (registered: their requests now match a prompt)."""
        doomed = set(ids)
        gone = 0
        for cluster in self.clusters():
            if cluster.slot_count and self.summary(cluster).id in doomed:
                self._drop(cluster)
                self.evicted -= 1
                gone += 1
        return gone

    # -- reading ------------------------------------------------------------------------------------------------

    def summary(self, cluster: Cluster) -> Summary:
        tenant, kind, roles = cluster.key
        names = slot_names(cluster.messages)
        template = source(cluster.messages, roles, kind, names)
        examples = [dict(zip(names, values, strict=True)) for values in cluster.examples
                    if len(values) == len(names)]
        return Summary(candidate_id(tenant, kind, template), tenant, kind, template, names, cluster.count,
                       cluster.chars_total, cluster.static_chars, examples, cluster.first_seen, cluster.last_seen)

    def summaries(self, min_requests: int = 2) -> list[Summary]:
        """Clusters seen at least `min_requests` times that have a slot (a template with none is one repeated
        request, not a template)."""
        return [self.summary(c) for c in self._recurring.values() if c.count >= min_requests and c.slot_count]


def observation(tenant: str | None, kind: str, messages: Sequence[tuple[str, str]] | None = None,
                prompt: str | None = None, at: float = 0.0) -> Observation:
    """An Observation from chat messages ((role, text) pairs) or a completion prompt."""
    if prompt is not None:
        return Observation(tenant, "completion", (COMPLETION_ROLE,), (prompt,), at)
    assert messages is not None
    return Observation(tenant, kind, tuple(r for r, _ in messages), tuple(t for _, t in messages), at)
