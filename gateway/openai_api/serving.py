"""Running a planned request: call the engine, fall back when an adapter fails early, account, answer."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi.sse import format_sse_event

from core.config import Settings
from gateway.engines.base import AdapterNotLoaded, Engine, EngineError, EngineEvent, TextDelta, ToolCallDelta, Usage
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.openai_api.planning import Plan
from gateway.openai_api.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    PromptInternUsage,
    UsageOut,
)
from gateway.openai_api.shaping import ChunkShaper, Outcome, whole_response

log = logging.getLogger(__name__)
DONE = format_sse_event(data_str="[DONE]")


class InferenceService:
    """Runs plans on the engine and keeps the per-prompt accounts; owns no state besides its collaborators."""

    def __init__(self, settings: Settings, engine: Engine, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics

    async def start(self, plan: Plan) -> tuple[Plan, AsyncIterator[EngineEvent], EngineEvent | None]:
        """Start generating and wait for the first event, so errors still become HTTP errors.

        An adapter that fails before answering sends this request down the fallback route.
        """
        stream = self.engine.generate(plan.request)
        try:
            first = await anext(stream, None)
        except (AdapterNotLoaded, EngineError) as exc:
            if plan.fallback is None:
                raise
            log.warning("adapter %s failed (%s); answering %s with the full prompt", plan.request.adapter,
                        exc.message, plan.prompt)
            plan = plan.as_fallback()
            stream = self.engine.generate(plan.request)
            first = await anext(stream, None)
        return plan, stream, first

    async def complete(self, plan: Plan, started: float) -> tuple[Plan, ChatCompletionResponse | CompletionResponse]:
        try:
            plan, stream, first = await self.start(plan)
            outcome = Outcome()
            ttft: float | None = None
            async for event in _chain(first, stream):
                if ttft is None and isinstance(event, TextDelta | ToolCallDelta):
                    ttft = time.perf_counter() - started
                outcome.add(event)
        except APIError as exc:
            self.record_error(plan, exc.status_code)
            raise
        usage = self.record(plan, outcome.usage, started, ttft)
        return plan, whole_response(plan, outcome, usage, int(time.time()))

    async def stream(self, plan: Plan, stream: AsyncIterator[EngineEvent], first: EngineEvent | None,
                     started: float, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE events in OpenAI's format, ending with `[DONE]`; an engine error mid-stream is one error event."""
        shaper = ChunkShaper(plan, int(time.time()))
        ttft: float | None = None
        usage: Usage | None = None
        finished = False
        try:
            async for event in _chain(first, stream):
                if ttft is None and isinstance(event, TextDelta | ToolCallDelta):
                    ttft = time.perf_counter() - started
                if isinstance(event, Usage):
                    usage = event
                for chunk in shaper.chunks(event):
                    yield format_sse_event(data_str=chunk)
            finished = True
        except APIError as exc:
            finished = True
            self.record_error(plan, exc.status_code)
            yield format_sse_event(data_str=exc.json())
            yield DONE
            return
        finally:
            if not finished and usage is None:
                self.record_error(plan, 499)  # the client went away mid-stream
        assert usage is not None
        usage_out = self.record(plan, usage, started, ttft)
        if include_usage:
            yield format_sse_event(data_str=shaper.usage_chunk(usage_out))
        yield DONE

    def record(self, plan: Plan, usage: Usage, started: float, ttft: float | None) -> UsageOut:
        """Count one answered request in the metrics; return its OpenAI usage with the gateway's figures."""
        sent = usage.prompt_tokens
        # Fallback and passthrough send what the app sent, so the engine's count is the exact original.
        original = plan.original_tokens if plan.route == "adapter" and plan.original_tokens is not None else sent
        saved = max(0, original - sent)
        label = plan.prompt_label
        m = self.metrics
        m.requests.labels(prompt=label, route=plan.route).inc()
        m.original_prompt_tokens.labels(prompt=label).inc(original)
        m.sent_prompt_tokens.labels(prompt=label).inc(sent)
        m.saved_prompt_tokens.labels(prompt=label).inc(saved)
        m.saved_cost.labels(prompt=label).inc(saved / 1000 * self.settings.price_input_per_1k)
        m.completion_tokens.labels(prompt=label).inc(usage.completion_tokens)
        m.request_duration.labels(route=plan.route).observe(time.perf_counter() - started)
        if ttft is not None:
            m.time_to_first_token.labels(route=plan.route).observe(ttft)
        return UsageOut(prompt_tokens=sent, completion_tokens=usage.completion_tokens,
                        total_tokens=sent + usage.completion_tokens,
                        promptintern=PromptInternUsage(original_prompt_tokens=original, saved_prompt_tokens=saved))

    def record_error(self, plan: Plan, status: int) -> None:
        self.metrics.request_errors.labels(route=plan.route, code=str(status)).inc()


async def _chain(first: EngineEvent | None, tail: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
    if first is not None:
        yield first
    async for event in tail:
        yield event
