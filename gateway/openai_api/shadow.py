"""The shadow guard: checks a share of each guarded prompt's adapter answers against the teacher, after the client
has its answer, and rolls the prompt back by itself when its adapter stops agreeing.

The teacher is what the adapter replaces: the full prompt on the upstream provider for an upstream model, else on
the local base model. Both answers compared are greedy: an answer served at temperature 0 is used as it is;
otherwise the adapter is asked again greedily. Each pair's agreement (`core.agreement`, the guard's `metric`) joins
a window per adapter version on this replica; once the window holds `window` pairs and their mean is below
`min_agreement`, the version is rejected by a compare-and-set in the registry ("reject vN if it is still the
active version"), so replicas judging it at once roll back once. The previous ready version, or the fallback
route when none is left, takes over here at once and on every replica through the change log.

The serving path only offers an answer (a put on a bounded queue); `SHADOW_CONCURRENCY` workers do the checks. A
full queue skips the check (counted in `promptintern_shadow_dropped_total`); a failed check only logs. Teacher
answers are offered to the traffic recorder like fallback answers (same `record` setting): shadowing a
traffic-trained prompt keeps fresh teacher rows coming for its next version.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from core.agreement import agreement
from gateway.engines.base import Engine, EngineOverloaded, EngineRequest
from gateway.engines.inflight import AdapterUse
from gateway.metrics import GatewayMetrics
from gateway.openai_api.planning import Plan
from gateway.openai_api.relay import single_answer
from gateway.openai_api.shaping import Outcome
from gateway.prompts.recording import TrafficRecorder
from gateway.prompts.routing import RoutablePrompt
from gateway.registry.store import PromptRegistry
from gateway.tasks import stop_task
from gateway.upstream import UpstreamClient

log = logging.getLogger(__name__)
QUEUE_SIZE = 100  # checks waiting for a worker; beyond that new ones are skipped


@dataclass(frozen=True)
class ShadowCheck:
    plan: Plan  # the adapter route's plan, as served
    served: str  # the answer the client got


@dataclass(frozen=True)
class Verdict:
    """One shadowed request: both greedy answers, their agreement, and what the window now says."""

    prompt: str
    adapter: str
    answer: str
    teacher: str
    agreement: float
    window_mean: float
    window_size: int
    rolled_back: bool


def adapter_version(model_id: str) -> int | None:
    """The version number of an adapter id `<prompt>@v<N>`."""
    _, _, tail = model_id.rpartition("@v")
    return int(tail) if tail.isdigit() else None


def greedy(request: EngineRequest) -> EngineRequest:
    """The same request, decoded greedily, one answer, with a request id of its own."""
    return replace(request, params=replace(request.params, temperature=0.0, n=1, seed=None),
                   request_id=f"shadow-{uuid.uuid4().hex}")


class ShadowGuard:
    def __init__(self, engine: Engine, in_flight: AdapterUse, registry: PromptRegistry, metrics: GatewayMetrics,
                 routable: Callable[[str], RoutablePrompt | None], changed: Callable[[], Awaitable[Any]], *,
                 upstream: UpstreamClient | None = None, recorder: TrafficRecorder | None = None,
                 concurrency: int = 1, queue_size: int = QUEUE_SIZE,
                 draw: Callable[[], float] = random.random) -> None:
        """`changed`: applies a registry change on this replica now (the follower's catch-up)."""
        self.engine = engine
        self.in_flight = in_flight
        self.registry = registry
        self.metrics = metrics
        self._routable = routable
        self._changed = changed
        self.upstream = upstream
        self.recorder = recorder
        self.concurrency = concurrency
        self._draw = draw
        self._queue: asyncio.Queue[ShadowCheck] = asyncio.Queue(queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._running = 0  # checks being done now
        self._windows: dict[str, deque[float]] = {}  # per adapter id: the latest agreements
        self.verdicts: deque[Verdict] = deque(maxlen=100)  # the latest, for logs and tests

    # -- the serving path ----------------------------------------------------------------------

    def offer(self, plan: Plan, text: str, finish: str | None, tool_calls: bool = False) -> None:
        """Shadow this whole adapter answer if its prompt guards this share of them. Never blocks, never raises."""
        if plan.route != "adapter" or plan.fallback is None or plan.request.adapter is None:
            return  # an adapter id called directly has no full prompt to compare with
        if finish not in ("stop", "length") or tool_calls or (plan.request.params.n or 1) != 1:
            return
        entry = self._routable(plan.prompt)
        guard = entry.guard if entry is not None else None
        if guard is None or guard.shadow_rate <= 0:
            return
        if guard.shadow_rate < 1 and self._draw() >= guard.shadow_rate:
            return
        try:
            self._queue.put_nowait(ShadowCheck(plan, text))
        except asyncio.QueueFull:
            self.metrics.shadow_dropped.labels(prompt=self.metrics.prompt_label(plan.prompt)).inc()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"shadow-{i}") for i in range(self.concurrency)]

    async def close(self) -> None:
        for task in self._workers:
            await stop_task(task)
        self._workers = []

    async def idle(self) -> None:
        """Wait until every offered check has been done (tests, benchmarks)."""
        await self._queue.join()

    @property
    def pending(self) -> int:
        """Checks offered and not yet done (queued or running)."""
        return self._queue.qsize() + self._running


    async def _work(self) -> None:
        while True:
            check = await self._queue.get()
            self._running += 1
            try:
                await self.check(check)
            except EngineOverloaded:
                self.metrics.shadow_dropped.labels(prompt=self.metrics.prompt_label(check.plan.prompt)).inc()
            except Exception:
                log.exception("shadow check of %s failed", check.plan.prompt)
            finally:
                self._running -= 1
                self._queue.task_done()

    # -- one check -------------------------------------------------------------------------------

    async def check(self, check: ShadowCheck) -> Verdict | None:
        """Ask the teacher (and, for a sampled answer, the adapter again greedily), score, judge the window."""
        plan = check.plan
        entry = self._routable(plan.prompt)
        guard = entry.guard if entry is not None else None
        adapter = plan.request.adapter
        if guard is None or adapter is None or entry is None or entry.adapter != adapter:
            return None  # the guard was turned off, or the prompt moved to another version meanwhile
        teacher = await self._teacher(plan)
        if teacher is None:
            return None
        answer = check.served if plan.request.params.temperature == 0 else await self._adapter_again(plan)
        score = agreement(answer, teacher, guard.metric)
        label = self.metrics.prompt_label(plan.prompt)
        self.metrics.shadow_requests.labels(prompt=label, agree=str(score >= guard.min_agreement).lower()).inc()
        window = self._windows.get(adapter)
        if window is None or window.maxlen != guard.window:
            window = self._windows[adapter] = deque(window or (), maxlen=guard.window)
        window.append(score)
        mean = sum(window) / len(window)
        self.metrics.shadow_agreement.labels(prompt=label).set(mean)
        rolled_back = False
        if len(window) >= guard.window and mean < guard.min_agreement:
            rolled_back = await self._roll_back(plan.prompt, adapter, mean, guard.window, guard.min_agreement,
                                                guard.metric)
        verdict = Verdict(plan.prompt, adapter, answer, teacher, score, mean, len(window), rolled_back)
        self.verdicts.append(verdict)
        return verdict

    async def _teacher(self, plan: Plan) -> str | None:
        """The teacher's greedy answer to the request as the client sent it (None: it gave no whole answer)."""
        if plan.upstream and self.upstream is not None and plan.upstream_body is not None:
            body = {k: v for k, v in plan.upstream_body.items() if k not in ("stream", "stream_options", "n", "seed")}
            body["temperature"] = 0
            single = single_answer(plan.endpoint, await self.upstream.complete(plan.endpoint, body))
            if single is None:
                return None
            text, finish = single.text, single.finish
        else:
            assert plan.fallback is not None
            text, finish = await self._generate(greedy(plan.fallback))
        if self.recorder is not None and plan.slots is not None:
            self.recorder.offer(prompt=plan.prompt, tenant=plan.tenant, slots=plan.slots, text=text, finish=finish,
                                model=plan.model)
        return text

    async def _adapter_again(self, plan: Plan) -> str:
        text, _ = await self._generate(greedy(plan.request))
        return text

    async def _generate(self, request: EngineRequest) -> tuple[str, str | None]:
        """The engine's whole answer (its first choice) and finish reason."""
        outcome = Outcome()
        stream = self.engine.generate(request)
        if request.adapter is not None:
            stream = self.in_flight.track(request.adapter, stream)
        async for event in stream:
            outcome.add(event)
        return "".join(outcome.texts.get(0, [])), outcome.finish.get(0)

    async def _roll_back(self, prompt: str, adapter: str, mean: float, window: int, minimum: float,
                         metric: str) -> bool:
        version = adapter_version(adapter)
        if version is None:
            return False
        reason = (f"rolled back by the shadow guard: mean agreement {mean:.3f} ({metric}) with the teacher over the "
                  f"last {window} shadowed requests, below min_agreement {minimum}")
        rejected = await asyncio.to_thread(self.registry.reject_active, prompt, version, reason)
        self._windows.pop(adapter, None)
        if not rejected:
            return False  # no longer the active version (another replica rolled it back, or a newer one came)
        log.warning("%s: %s", adapter, reason)
        self.metrics.rollbacks.labels(prompt=self.metrics.prompt_label(prompt)).inc()
        await self._changed()
        return True
