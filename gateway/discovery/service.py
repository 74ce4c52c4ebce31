"""PromptDiscovery: feeds sampled passthrough requests to the miner in the background, shares what it found through
the registry, and ranks and registers candidates.

The response path only draws the sample, takes a fingerprint (a hash of the request's shape and start) and puts
the request's texts on a bounded queue: no copying, no tokenising, no I/O (`promptintern bench discovery` times
it). One background task mines the queue in a thread; another writes this replica's findings to the registry
every DISCOVERY_FLUSH_SECONDS, so the candidates are every replica's counts added up. A listing flushes first, so
this replica's traffic shows at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from core.config import Settings
from core.templates import CHAT_ROLES, SLOT_NAME, MessageTemplate, PromptTemplate, Slot, TemplateError, parse_template
from gateway.discovery.miner import Observation, PromptMiner, Summary
from gateway.discovery.protocol import CandidateOut, RegisterCandidate
from gateway.errors import NotFound, Unprocessable
from gateway.metrics import GatewayMetrics
from gateway.openai_api.planning import Plan
from gateway.prompts.protocol import RegisterPrompt, TemplateMessage
from gateway.prompts.service import PromptService
from gateway.registry.store import DiscoveredPrompt, PromptRecord, PromptRegistry, check_prompt_name
from gateway.tasks import stop_task
from gateway.tokens import TokenCounter

log = logging.getLogger(__name__)
QUEUE_SIZE = 10_000  # requests waiting to be mined; beyond that, new ones are dropped (counted)
BATCH = 256  # requests mined per hop to a thread
FINGERPRINT_CHARS = 64
FLUSH_MIN_REQUESTS = 2  # a replica shares templates seen at least this often


@dataclass(frozen=True)
class _Figures:
    """What a template's tokens cost and what registering it would save, per request."""

    static_tokens: int
    bare_overhead: int  # the bare query's tokens besides the slot values (chat wrapper, `name: ` labels)


def _parsed(kind: str, template: object) -> PromptTemplate:
    if kind == "completion":
        assert isinstance(template, str)
        return parse_template(prompt=template)
    assert isinstance(template, list)
    return parse_template(messages=template)


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class PromptDiscovery:
    def __init__(self, settings: Settings, registry: PromptRegistry, counter: TokenCounter,
                 metrics: GatewayMetrics, replica: str | None = None,
                 draw: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.registry = registry
        self.counter = counter
        self.metrics = metrics
        self.replica = replica or uuid.uuid4().hex
        self.miner = PromptMiner(max_clusters=settings.discovery_max_clusters,
                                 merge_share=0.8 * settings.discovery_min_static_share,
                                 max_chars=settings.max_template_chars)
        self._draw = draw
        self._rate = settings.discovery_sample_rate
        self._queue: asyncio.Queue[tuple[Observation, int]] = asyncio.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()  # the miner: mined in a thread, read by flushes
        self._flush_lock = asyncio.Lock()
        self._figures: dict[str, _Figures] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- the response path ----------------------------------------------------------------------------------------

    def offer(self, plan: Plan) -> None:
        """Queue a passthrough request for mining (a sampled share; plain text only). Never blocks, never raises."""
        if plan.route != "passthrough":
            return
        request = plan.request
        if request.params.n not in (None, 1) or "tools" in request.extra or "functions" in request.extra:
            return
        if self._rate < 1.0 and self._draw() >= self._rate:
            return
        if request.kind == "completion":
            if not isinstance(request.prompt, str) or not request.prompt:
                return
            kind = "completion"
            roles: tuple[str, ...] = ("prompt",)
            texts: tuple[str, ...] = (request.prompt,)
        else:
            if not request.messages:
                return
            pairs = [(m.get("role"), m.get("content")) for m in request.messages]
            if any(role not in CHAT_ROLES or not isinstance(text, str) for role, text in pairs):
                return
            kind = "chat"
            roles = tuple(str(role) for role, _ in pairs)
            texts = tuple(str(text) for _, text in pairs)
        fingerprint = hash((kind, roles, texts[0][:FINGERPRINT_CHARS]))
        try:
            self._queue.put_nowait((Observation(plan.tenant, kind, roles, texts, time.time()), fingerprint))
        except asyncio.QueueFull:
            self.metrics.discovery_dropped.inc()

    # -- background -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._mine(), name="discovery-miner"),
                       asyncio.create_task(self._flush_every(), name="discovery-flush")]

    async def close(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []

    async def _mine(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._observe, batch)
            except Exception:
                log.exception("mining %d request(s) for recurring prompts failed", len(batch))

    def _observe(self, batch: list[tuple[Observation, int]]) -> None:
        with self._lock:
            for obs, fingerprint in batch:
                self.miner.observe(obs, fingerprint)
            clusters = len(self.miner)
        self.metrics.discovery_observed.inc(len(batch))
        self.metrics.discovery_clusters.set(clusters)

    async def mined(self) -> None:
        """Wait until every request queued so far has been mined (tests, benchmarks)."""
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self._lock.acquire)
        self._lock.release()

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery_flush_seconds)
            try:
                await self.flush()
                await self.candidates()  # refreshes the top-N gauges
            except Exception:
                log.exception("sharing the discovered prompts through the registry failed")

    async def flush(self) -> None:
        """Write this replica's findings to the registry; forget the ones registered meanwhile."""
        async with self._flush_lock:
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        with self._lock:
            found = self.miner.summaries(FLUSH_MIN_REQUESTS)
        rows = [summary_of(s) for s in found]
        registered = self.registry.save_discovered(self.replica, rows, self.settings.discovery_min_requests)
        gone = registered & {s.id for s in found}
        if gone:
            with self._lock:
                self.miner.forget(gone)

    # -- candidates -------------------------------------------------------------------------------------------------

    async def candidates(self, tenant: str | None = None) -> list[CandidateOut]:
        """Every replica's candidates (one tenant's, when given), highest projected saving first."""
        await self.flush()
        found = await asyncio.to_thread(self.registry.discovered)
        ranked = await asyncio.to_thread(self._rank, found)
        self.metrics.show_candidates(ranked)
        return [c for c in ranked if tenant is None or c.tenant == tenant]

    def _rank(self, found: list[DiscoveredPrompt]) -> list[CandidateOut]:
        out = [c for c in (self._candidate(f) for f in found) if c is not None]
        out.sort(key=lambda c: (-c.projected_saved_tokens, c.id))
        return out

    def _figures_of(self, candidate_id: str, template: PromptTemplate) -> _Figures:
        figures = self._figures.get(candidate_id)
        if figures is None:
            bare = [{"role": "user", "content": "\n".join(f"{s}: " for s in template.slots)
                     if len(template.slots) > 1 else ""}]
            figures = _Figures(self.counter.static_tokens(template), self.counter.count_chat(bare))
            if len(self._figures) > 10 * self.settings.discovery_max_clusters:
                self._figures.clear()
            self._figures[candidate_id] = figures
        return figures

    def _candidate(self, found: DiscoveredPrompt) -> CandidateOut | None:
        """The candidate, or None when it has too few requests, too little static text, or no valid template."""
        if found.requests < self.settings.discovery_min_requests or not found.slots:
            return None
        try:
            template = _parsed(found.kind, found.template)
        except (TemplateError, AssertionError):
            log.warning("discovered template %s does not parse; skipped", found.id)
            return None
        figures = self._figures_of(found.id, template)
        value_chars = max(0.0, found.chars_total / found.requests - found.static_chars)
        sample = [v for example in found.examples for v in example.values()]
        sample_chars = sum(len(v) for v in sample)
        per_char = sum(self.counter.count_text(v) for v in sample) / sample_chars if sample_chars else 0.25
        mean_tokens = figures.static_tokens + value_chars * per_char
        share = figures.static_tokens / mean_tokens if mean_tokens else 0.0
        if share < self.settings.discovery_min_static_share:
            return None
        saved = max(0, figures.static_tokens - figures.bare_overhead)
        total = found.requests * saved
        return CandidateOut(
            id=found.id, tenant=found.tenant, kind="chat" if found.kind == "chat" else "completion",
            template=found.template, slots=found.slots, requests=found.requests,
            mean_prompt_tokens=round(mean_tokens, 1), static_tokens=figures.static_tokens,
            static_share=round(share, 3), projected_saved_tokens_per_1k_requests=1000 * saved,
            projected_saved_tokens=total,
            projected_saved_usd=round(total / 1000 * self.settings.price_input_per_1k, 6),
            examples=found.examples, first_seen=found.first_seen, last_seen=found.last_seen)

    # -- registering -------------------------------------------------------------------------------------------------

    async def register(self, candidate_id: str, body: RegisterCandidate, prompts: PromptService) -> PromptRecord:
        """Register a candidate as a prompt (its slots renamed as asked); it leaves the list."""
        found = await asyncio.to_thread(self.registry.discovered, candidate_id)
        candidate = await asyncio.to_thread(self._candidate, found[0]) if found else None
        if candidate is None:
            raise NotFound(f"no discovered prompt candidate '{candidate_id}'", param="id",
                           code="candidate_not_found")
        check_prompt_name(body.name)
        template = renamed(candidate.kind, candidate.template, body.slots or {})
        request = RegisterPrompt(
            name=body.name, tenant=candidate.tenant, record=body.record,
            messages=[TemplateMessage.model_validate(m) for m in template] if isinstance(template, list) else None,
            prompt=template if isinstance(template, str) else None)
        if not await asyncio.to_thread(self.registry.claim_discovered, candidate_id, body.name):
            raise NotFound(f"the candidate '{candidate_id}' was registered meanwhile", param="id",
                           code="candidate_not_found")
        try:
            record = await prompts.register(request)
        except BaseException:
            await asyncio.to_thread(self.registry.release_discovered, candidate_id)
            raise
        with self._lock:
            self.miner.forget({candidate_id})
        return record


def renamed(kind: str, template: list[dict[str, str]] | str, names: dict[str, str]) -> list[dict[str, str]] | str:
    """The template source with slots renamed (`{old: new}`); 422 for an unknown slot or an invalid new name."""
    if not names:
        return template
    try:
        parsed = _parsed(kind, template)
    except TemplateError as exc:  # a stored template that no longer parses: not the caller's fault, but say so
        raise Unprocessable(str(exc), param="slots", code="invalid_template") from exc
    unknown = sorted(set(names) - set(parsed.slots))
    if unknown:
        raise Unprocessable(f"the candidate has no slot(s) {', '.join(unknown)} (its slots: "
                            f"{', '.join(parsed.slots)})", param="slots", code="unknown_slot")
    for new in names.values():
        if not SLOT_NAME.fullmatch(new):
            raise Unprocessable(f"invalid slot name {new!r}: use letters, digits and '_'", param="slots",
                                code="invalid_template")
    messages = [MessageTemplate(m.role, tuple(Slot(names.get(p.name, p.name)) if isinstance(p, Slot) else p
                                              for p in m.parts)) for m in parsed.messages]
    final = PromptTemplate(parsed.kind, tuple(messages), tuple(names.get(s, s) for s in parsed.slots))
    if len(set(final.slots)) != len(final.slots):
        raise Unprocessable("slot names must stay unique after renaming", param="slots", code="invalid_template")
    return final.source()


def summary_of(summary: Summary) -> DiscoveredPrompt:
    """A miner summary as the registry stores it (tests and benchmarks write rows this way too)."""
    return DiscoveredPrompt(summary.id, summary.tenant, summary.kind, summary.template, summary.slots,
                            summary.requests, summary.chars_total, summary.static_chars, summary.examples,
                            _utc(summary.first_seen), _utc(summary.last_seen))
