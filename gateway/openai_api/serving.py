"""Running a planned request: call the engine (or relay it upstream), fall back when an adapter fails early,
account, answer.

A client that goes away cancels its generation, so the engine never works for nobody: a non-streamed
request and the wait for a stream's first event race the generation against the client's disconnect,
and a streamed answer closes the engine's stream whenever its response ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi.sse import format_sse_event

from core.config import Settings
from gateway.engines.base import (
    AdapterNotLoaded,
    ContextLengthExceeded,
    Engine,
    EngineError,
    EngineEvent,
    TextDelta,
    ToolCallDelta,
    UnsupportedParameter,
    Usage,
)
from gateway.engines.inflight import AdapterUse
from gateway.errors import CLIENT_CLOSED, APIError, InternalError
from gateway.metrics import GatewayMetrics
from gateway.openai_api.planning import Plan
from gateway.openai_api.relay import RelayedStream, UpstreamRelay
from gateway.openai_api.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    PromptInternUsage,
    UsageOut,
)
from gateway.openai_api.shadow import ShadowGuard
from gateway.openai_api.shaping import ChunkShaper, Outcome, whole_response
from gateway.prompts.recording import TrafficRecorder
from gateway.tokens import UpstreamCalibration
from gateway.upstream import UpstreamClient

log = logging.getLogger(__name__)
DONE = format_sse_event(data_str="[DONE]")
T = TypeVar("T")


class ClientClosedRequest(APIError):
    """The client closed its connection before its answer was ready; no one reads this error."""

    status_code = CLIENT_CLOSED
    error_type = "client_closed_request"


async def unless_gone(work: Awaitable[T], gone: Callable[[], Awaitable[None]]) -> T:
    """Await `work` unless `gone()` (the client's disconnect) comes first; then cancel it and raise
    ClientClosedRequest.

    The work runs in the caller's task and only the watch is a task of its own (one task per request, not two and
    an `asyncio.wait`): a disconnect cancels the caller's task, which cancels the engine stream the work is reading
    (freeing the request's engine slot), and that cancellation becomes ClientClosedRequest here.
    """
    current = asyncio.current_task()
    assert current is not None
    state = {"running": True, "left": False}

    def on_gone(watch: asyncio.Future[None]) -> None:
        if state["running"] and not watch.cancelled() and watch.exception() is None:
            state["left"] = True
            current.cancel()

    watcher = asyncio.ensure_future(gone())
    watcher.add_done_callback(on_gone)
    try:
        result = await work
    except asyncio.CancelledError:
        if not state["left"]:
            raise
        current.uncancel()  # this cancellation was ours, not the caller's
        raise ClientClosedRequest("the client closed the connection before the answer was ready",
                                  code="client_closed_request") from None
    finally:
        state["running"] = False
        watcher.cancel()
    if state["left"]:  # the work swallowed our cancellation and answered anyway
        current.uncancel()
    return result


class _ToUpstream(Exception):
    """This plan is the upstream's to answer: a relayed route, or the fallback of an upstream model's adapter that
    failed before answering (raised from `start`, so both paths meet in one place)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.prompt)
        self.plan = plan


# An adapter refusing these for an upstream model sends the request to the upstream, which may honour them.
UPSTREAM_CAN_TRY = (AdapterNotLoaded, EngineError, UnsupportedParameter, ContextLengthExceeded)


class InferenceService:
    """Runs plans on the engine (relayed plans on the upstream) and keeps the per-prompt accounts; owns no state
    besides its collaborators."""

    def __init__(self, settings: Settings, engine: Engine, metrics: GatewayMetrics, in_flight: AdapterUse,
                 upstream: UpstreamClient | None = None, recorder: TrafficRecorder | None = None,
                 shadow: ShadowGuard | None = None, calibration: UpstreamCalibration | None = None) -> None:
        self.settings = settings
        self.calibration = calibration or UpstreamCalibration()  # shared with the planner
        self.engine = engine
        self.metrics = metrics
        self.in_flight = in_flight  # a version switch waits for the old adapter's requests to end
        self.recorder = recorder  # keeps a share of fallback answers as training rows
        self.shadow = shadow  # checks a share of guarded adapter answers against the teacher
        self.relay = None if upstream is None else UpstreamRelay(upstream, metrics, self.record, self.record_error,
                                                                 self.offer)

    def offer(self, plan: Plan, text: str, finish: str | None, tool_calls: bool = False,
              model: str | None = None) -> None:
        """Hand a whole answer to what learns from it (each decides; never raises): the recorder takes fallback
        answers, the shadow guard adapter answers."""
        if plan.route == "adapter" and self.shadow is not None:
            try:
                self.shadow.offer(plan, text, finish, tool_calls)
            except Exception:
                log.exception("offering an answer of %s for a shadow check failed", plan.prompt)
            return
        if self.recorder is None or plan.route != "fallback":
            return
        try:
            self.recorder.offer(prompt=plan.prompt, tenant=plan.tenant, slots=plan.slots, text=text, finish=finish,
                                model=model or plan.model, n=plan.request.params.n, tool_calls=tool_calls)
        except Exception:
            log.exception("offering an answer of %s for recording failed", plan.prompt)

    def _generate(self, plan: Plan) -> AsyncIterator[EngineEvent]:
        return self.in_flight.track(plan.request.adapter, self.engine.generate(plan.request))

    async def open_stream(self, plan: Plan, started: float, include_usage: bool,
                          gone: Callable[[], Awaitable[None]]) -> tuple[Plan, StreamedAnswer | RelayedStream]:
        """Start a streamed answer and wait for its first event (errors are still HTTP errors) or the client to go."""
        try:
            if plan.relayed:
                raise _ToUpstream(plan)
            plan, events, first = await unless_gone(self._counted(plan, self.start(plan)), gone)
        except _ToUpstream as to:
            assert self.relay is not None
            relayed = await unless_gone(self._counted(to.plan, self.relay.open_stream(to.plan, started, include_usage)),
                                        gone)
            return to.plan, relayed
        return plan, StreamedAnswer(self, plan, events, first, started, include_usage)

    async def _counted(self, plan: Plan, work: Awaitable[T]) -> T:
        """`work`, with its failure counted in the metrics: its HTTP status, or 499 when it was cancelled."""
        try:
            return await work
        except APIError as exc:
            self.record_error(plan, exc.status_code)
            raise
        except asyncio.CancelledError:
            self.record_error(plan, CLIENT_CLOSED)
            raise

    async def start(self, plan: Plan) -> tuple[Plan, AsyncIterator[EngineEvent], EngineEvent | None]:
        """Start generating and wait for the first event, so errors still become HTTP errors.

        An adapter that fails before answering sends this request down the fallback route.
        """
        stream = self._generate(plan)
        try:
            first = await anext(stream, None)
        except UPSTREAM_CAN_TRY as exc:
            if plan.fallback is None or not (plan.upstream or isinstance(exc, AdapterNotLoaded | EngineError)):
                raise
            log.warning("adapter %s failed (%s); answering %s with the full prompt", plan.request.adapter,
                        exc.message, plan.prompt)
            plan = plan.as_fallback()
            if plan.relayed:
                raise _ToUpstream(plan) from exc
            stream = self._generate(plan)
            first = await anext(stream, None)
        return plan, stream, first

    async def complete(self, plan: Plan, started: float, gone: Callable[[], Awaitable[None]]
                       ) -> tuple[Plan, ChatCompletionResponse | CompletionResponse | dict[str, Any]]:
        """The whole answer (a relayed one as the upstream's JSON), unless the client leaves first: then generation
        stops and ClientClosedRequest is raised."""
        return await unless_gone(self._complete(plan, started), gone)

    async def _complete(self, plan: Plan, started: float
                        ) -> tuple[Plan, ChatCompletionResponse | CompletionResponse | dict[str, Any]]:
        try:
            if plan.relayed:
                raise _ToUpstream(plan)
            plan, stream, first = await self.start(plan)
            outcome = Outcome()
            ttft: float | None = None
            try:
                async for event in _chain(first, stream):
                    if ttft is None and isinstance(event, TextDelta | ToolCallDelta):
                        ttft = time.perf_counter() - started
                    outcome.add(event)
            finally:
                await close_events(stream)
        except _ToUpstream as to:
            assert self.relay is not None
            return to.plan, await self._counted(to.plan, self.relay.complete(to.plan, started))
        except APIError as exc:
            self.record_error(plan, exc.status_code)
            raise
        except asyncio.CancelledError:
            self.record_error(plan, CLIENT_CLOSED)
            raise
        usage = self.record(plan, outcome.usage, started, ttft)
        if set(outcome.texts) | set(outcome.finish) <= {0}:
            self.offer(plan, "".join(outcome.texts.get(0, [])), outcome.finish.get(0), bool(outcome.tool_calls))
        return plan, whole_response(plan, outcome, usage, int(time.time()))

    async def sse(self, plan: Plan, stream: AsyncIterator[EngineEvent], first: EngineEvent | None,
                  started: float, include_usage: bool) -> AsyncGenerator[bytes]:
        """SSE events in OpenAI's format, ending with `[DONE]`.

        Once the stream has begun its status cannot change, so any failure (the engine's, or vLLM dying
        mid-answer) is one error event in OpenAI's shape, then `[DONE]`: the client never sees a cut stream.
        """
        shaper = ChunkShaper(plan, int(time.time()))
        ttft: float | None = None
        usage: Usage | None = None
        failure: APIError | None = None
        answer = Outcome()  # kept for recording
        try:
            async for event in _chain(first, stream):
                if ttft is None and isinstance(event, TextDelta | ToolCallDelta):
                    ttft = time.perf_counter() - started
                if isinstance(event, Usage):
                    usage = event
                answer.add(event)
                for chunk in shaper.chunks(event):
                    yield format_sse_event(data_str=chunk)
            if usage is None:
                failure = EngineError("the engine's stream ended before the answer did", code="engine_error")
        except APIError as exc:
            failure = exc
        except Exception as exc:
            log.exception("streamed generation failed")
            failure = InternalError(f"generation failed: {type(exc).__name__}", code="engine_error")
        finally:
            if failure is None and usage is None:
                self.record_error(plan, CLIENT_CLOSED)  # the client went away mid-stream
        if failure is not None:
            self.record_error(plan, failure.status_code)
            yield format_sse_event(data_str=failure.json())
            yield DONE
            return
        assert usage is not None
        usage_out = self.record(plan, usage, started, ttft)
        if set(answer.texts) | set(answer.finish) <= {0}:
            self.offer(plan, "".join(answer.texts.get(0, [])), answer.finish.get(0), bool(answer.tool_calls))
        if include_usage:
            yield format_sse_event(data_str=shaper.usage_chunk(usage_out))
        yield DONE

    def record(self, plan: Plan, usage: Usage, started: float, ttft: float | None) -> UsageOut:
        """Count one answered request in the metrics; return its OpenAI usage with the gateway's figures."""
        sent = usage.prompt_tokens
        # Fallback and passthrough send what the app sent, so the engine's (or the upstream's) count is the exact
        # original, and what the upstream billed.
        original = plan.original_tokens if plan.route == "adapter" and plan.original_tokens is not None else sent
        if plan.upstream and plan.route == "fallback" and plan.original_tokens is not None:
            self.calibration.observe(plan.prompt, plan.original_tokens, sent)  # the upstream's count vs ours
        saved = max(0, original - sent)
        series = self.metrics.answered(plan.prompt_label, plan.tenant, plan.route)
        series.requests.inc()
        series.original_prompt_tokens.inc(original)
        series.sent_prompt_tokens.inc(sent)
        series.saved_prompt_tokens.inc(saved)
        series.saved_cost.inc(saved / 1000 * self.settings.price_input_per_1k)
        series.completion_tokens.inc(usage.completion_tokens)
        elapsed = time.perf_counter() - started
        series.request_duration.observe(elapsed)
        if ttft is not None:
            series.time_to_first_token.observe(ttft)
            # Time per output token, as vLLM defines it: the time after the first token over the tokens after it
            # (one choice only: several choices' tokens are generated side by side).
            if usage.completion_tokens > 1 and plan.request.params.n == 1:
                series.time_per_output_token.observe(max(0.0, elapsed - ttft) / (usage.completion_tokens - 1))
                series.decode_tokens.inc(usage.completion_tokens - 1)
        return UsageOut(prompt_tokens=sent, completion_tokens=usage.completion_tokens,
                        total_tokens=sent + usage.completion_tokens,
                        promptintern=PromptInternUsage(original_prompt_tokens=original, saved_prompt_tokens=saved))

    def record_error(self, plan: Plan, status: int) -> None:
        self.metrics.request_errors.labels(route=plan.route, code=str(status)).inc()


class StreamedAnswer:
    """The SSE body of one streamed answer. `aclose()` ends it whether or not it began: it closes the engine's
    stream at once (freeing the request's slot) and counts an unfinished answer as a 499."""

    def __init__(self, service: InferenceService, plan: Plan, events: AsyncIterator[EngineEvent],
                 first: EngineEvent | None, started: float, include_usage: bool) -> None:
        self._service = service
        self._plan = plan
        self._events = events
        self._body = service.sse(plan, events, first, started, include_usage)
        self._began = False

    def __aiter__(self) -> StreamedAnswer:
        return self

    async def __anext__(self) -> bytes:
        self._began = True
        return await anext(self._body)

    async def aclose(self) -> None:
        if not self._began:  # the client left before the first byte: the body never ran to count it
            self._began = True
            self._service.record_error(self._plan, CLIENT_CLOSED)
        await self._body.aclose()
        await close_events(self._events)


async def close_events(events: AsyncIterator[EngineEvent]) -> None:
    """Close an engine stream now, so its cleanup (freeing the request's slot) runs here, not at garbage collection."""
    if isinstance(events, AsyncGenerator):
        await events.aclose()


async def _chain(first: EngineEvent | None, tail: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
    if first is not None:
        yield first
    async for event in tail:
        yield event
