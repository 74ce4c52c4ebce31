"""Relaying a planned request to the upstream provider: its answer goes back as it came, and is accounted.

The body goes as the client sent it. A streamed request also asks for the usage chunk (`stream_options.
include_usage`), which the gateway needs to count what the upstream billed; that chunk is kept from a client
that did not ask for it. Once a stream has begun, a failure is one error event in OpenAI's shape, then `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.sse import format_sse_event

from gateway.engines.base import Usage
from gateway.errors import CLIENT_CLOSED, APIError, InternalError
from gateway.metrics import GatewayMetrics
from gateway.openai_api.planning import Plan
from gateway.openai_api.responses import UsageOut
from gateway.upstream import UpstreamClient, UpstreamFailed, UpstreamStream

log = logging.getLogger(__name__)
DONE = format_sse_event(data_str="[DONE]")

Record = Callable[[Plan, Usage, float, float | None], UsageOut]
RecordError = Callable[[Plan, int], None]
Offer = Callable[[Plan, str, "str | None", bool, "str | None"], None]
"""Hand a whole answer to the recorder: plan, text, finish reason, tool calls made, the model that answered."""


def billed(usage: object) -> Usage | None:
    """The upstream's `usage` object as the gateway's Usage; None when it has none."""
    if not isinstance(usage, dict):
        return None
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def _has_output(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
    return False


@dataclass(frozen=True)
class SingleAnswer:
    """The one choice of an upstream's whole answer: its text, finish reason, whether it called tools, the model."""

    text: str
    finish: str | None
    tool_calls: bool
    model: str | None


def single_answer(endpoint: str, answer: dict[str, Any]) -> SingleAnswer | None:
    """An upstream's whole answer (chat or completion JSON) when it has exactly one choice with text; else None."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    found = choice.get("message")
    message: dict[str, Any] = found if isinstance(found, dict) else {}
    text = message.get("content") if endpoint == "chat" else choice.get("text")
    if not isinstance(text, str):
        return None
    finish, model = choice.get("finish_reason"), answer.get("model")
    return SingleAnswer(text, finish if isinstance(finish, str) else None, bool(message.get("tool_calls")),
                        model if isinstance(model, str) else None)


class UpstreamRelay:
    """Sends relayed plans to the upstream and counts them with the inference service's accounting."""

    def __init__(self, client: UpstreamClient, metrics: GatewayMetrics, record: Record,
                 record_error: RecordError, offer: Offer | None = None) -> None:
        self.client = client
        self.metrics = metrics
        self.record = record
        self.record_error = record_error
        self.offer = offer

    def _count_call(self, plan: Plan, status: int) -> None:
        self.metrics.upstream_requests.labels(route=plan.route, code=str(status)).inc()

    def _body(self, plan: Plan) -> dict[str, Any]:
        assert plan.upstream_body is not None, "the route sets the body of a relayed plan"
        return dict(plan.upstream_body)

    async def complete(self, plan: Plan, started: float) -> dict[str, Any]:
        """The upstream's whole answer, as it sent it; usage counted from its `usage`."""
        try:
            answer = await self.client.complete(plan.endpoint, self._body(plan))
        except APIError as exc:
            self._count_call(plan, exc.status_code)
            raise
        self._count_call(plan, 200)
        self.record(plan, billed(answer.get("usage")) or Usage(0, 0), started, None)
        self._offer_whole(plan, answer)
        return answer

    def _offer_whole(self, plan: Plan, answer: dict[str, Any]) -> None:
        single = single_answer(plan.endpoint, answer)
        if self.offer is not None and single is not None:
            self.offer(plan, single.text, single.finish, single.tool_calls, single.model)

    async def open_stream(self, plan: Plan, started: float, include_usage: bool) -> RelayedStream:
        """Open the upstream's stream (an error status is still an HTTP error here)."""
        body = self._body(plan)
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        try:
            stream = await self.client.open_stream(plan.endpoint, body)
        except APIError as exc:
            self._count_call(plan, exc.status_code)
            raise
        return RelayedStream(self, plan, stream, started, include_usage)

    async def sse(self, plan: Plan, stream: UpstreamStream, started: float,
                  include_usage: bool) -> AsyncGenerator[bytes]:
        """The upstream's chunks, one SSE event each, then `[DONE]`; the usage chunk only if the client asked."""
        ttft: float | None = None
        usage: Usage | None = None
        failure: APIError | None = None
        answer = _StreamedText()  # kept for recording
        try:
            async for data in stream.data():
                try:
                    chunk = json.loads(data)
                except ValueError:
                    failure = UpstreamFailed("the upstream sent a stream chunk that is not JSON", code="upstream_error")
                    break
                if not isinstance(chunk, dict):
                    failure = UpstreamFailed("the upstream sent a stream chunk that is not an object",
                                             code="upstream_error")
                    break
                error = chunk.get("error")
                if error:
                    message = error.get("message") if isinstance(error, dict) else str(error)
                    failure = UpstreamFailed(f"the upstream failed mid-stream: {message}", code="upstream_error")
                    break
                if ttft is None and _has_output(chunk):
                    ttft = time.perf_counter() - started
                answer.add(chunk)
                if chunk.get("usage"):
                    usage = billed(chunk["usage"])
                    if not include_usage:
                        if not chunk.get("choices"):
                            continue
                        data = json.dumps({key: value for key, value in chunk.items() if key != "usage"})
                yield format_sse_event(data_str=data)
            if failure is None and not stream.done:
                failure = UpstreamFailed("the upstream's stream ended before the answer did", code="upstream_error")
        except APIError as exc:
            failure = exc
        except Exception as exc:
            log.exception("relaying the upstream's stream failed")
            failure = InternalError(f"relaying failed: {type(exc).__name__}", code="upstream_error")
        finally:
            await stream.aclose()
        if failure is not None:
            self._count_call(plan, failure.status_code)
            self.record_error(plan, failure.status_code)
            yield format_sse_event(data_str=failure.json())
            yield DONE
            return
        self._count_call(plan, 200)
        self.record(plan, usage or Usage(0, 0), started, ttft)
        if self.offer is not None and answer.single:
            self.offer(plan, "".join(answer.parts), answer.finish, answer.tool_calls, answer.model)
        yield DONE


class _StreamedText:
    """Choice 0's text, finish reason and tool calls gathered from an upstream's stream chunks."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish: str | None = None
        self.tool_calls = False
        self.single = True  # no choice but index 0 seen
        self.model: str | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.single = False
                continue
            found = choice.get("delta")
            delta: dict[str, Any] = found if isinstance(found, dict) else {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if isinstance(text, str):
                self.parts.append(text)
            if delta.get("tool_calls"):
                self.tool_calls = True
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]


class RelayedStream:
    """The SSE body of one relayed answer; `aclose()` closes the upstream's stream and counts an unfinished
    answer as a 499 (the client left)."""

    def __init__(self, relay: UpstreamRelay, plan: Plan, stream: UpstreamStream, started: float,
                 include_usage: bool) -> None:
        self._relay = relay
        self._plan = plan
        self._stream = stream
        self._body = relay.sse(plan, stream, started, include_usage)
        self._finished = False

    def __aiter__(self) -> RelayedStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            event = await anext(self._body)
        except StopAsyncIteration:
            self._finished = True
            raise
        if event == DONE:
            self._finished = True
        return event

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._relay.record_error(self._plan, CLIENT_CLOSED)
        await self._body.aclose()
        await self._stream.aclose()
