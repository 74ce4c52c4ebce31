"""The router: detect a registered prompt, choose the route, call the engine, shape OpenAI's answer.

Routes: `adapter` (bare query to the prompt's ready adapter), `fallback` (matched, but no adapter
is ready or it failed before answering: the full prompt goes to the base model) and
`passthrough` (no registered prompt: the request goes to the base model unchanged).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from core.config import Settings
from gateway.engines.base import (
    AdapterNotLoaded,
    Engine,
    EngineError,
    EngineEvent,
    EngineRequest,
    Finished,
    SamplingParams,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from gateway.errors import APIError, BadRequest, NotFound, sse_error
from gateway.matcher import Match
from gateway.metrics import NO_PROMPT, GatewayMetrics
from gateway.openai_api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from gateway.prompts.service import PromptService, RoutablePrompt
from core.templates import bare_query_messages
from gateway.tokens import TokenCounter

log = logging.getLogger(__name__)

Route = Literal["adapter", "fallback", "passthrough"]
Endpoint = Literal["chat", "completion"]
CHAT_EXTRAS = ("logprobs", "top_logprobs", "logit_bias", "response_format", "tools", "tool_choice",
               "parallel_tool_calls", "functions", "function_call")
COMPLETION_EXTRAS = ("logprobs", "logit_bias", "echo", "best_of", "suffix")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
B = TypeVar("B", ChatCompletionRequest, CompletionRequest)


@dataclass(frozen=True)
class Plan:
    """Everything decided before the engine is called."""

    endpoint: Endpoint
    model: str
    route: Route
    prompt: str  # matched prompt name, "" when none
    request: EngineRequest
    fallback: EngineRequest | None = None
    original_tokens: int | None = None  # None: count = what the engine reports
    expected_sent_tokens: int | None = None

    @property
    def prompt_label(self) -> str:
        return self.prompt or NO_PROMPT

    def headers(self) -> dict[str, str]:
        saved = 0
        if self.route == "adapter" and self.original_tokens is not None and self.expected_sent_tokens is not None:
            saved = max(0, self.original_tokens - self.expected_sent_tokens)
        return {"x-promptintern-prompt": self.prompt, "x-promptintern-route": self.route,
                "x-promptintern-saved-tokens": str(saved)}

    def as_fallback(self) -> Plan:
        assert self.fallback is not None
        return replace(self, route="fallback", request=self.fallback, fallback=None, expected_sent_tokens=None)


@dataclass
class Outcome:
    """A whole answer gathered from the engine's events, per choice index."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    logprobs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    tool_calls: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, event: EngineEvent) -> None:
        if isinstance(event, TextDelta):
            self.texts.setdefault(event.index, []).append(event.text)
            if event.logprobs is not None:
                self.logprobs.setdefault(event.index, []).append(event.logprobs)
        elif isinstance(event, ToolCallDelta):
            self.tool_calls.setdefault(event.index, []).extend(event.tool_calls)
        elif isinstance(event, Finished):
            self.finish[event.index] = event.reason
        elif isinstance(event, Usage):
            self.usage = event


def merge_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas joined into whole calls: id, type and name from the deltas that carry them,
    arguments concatenated in order, one call per `index`."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        call = calls.setdefault(int(delta.get("index") or 0),
                                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def merge_logprobs(endpoint: Endpoint, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-chunk logprobs joined into one object: chat's `content` list, or completions' parallel lists."""
    if endpoint == "chat":
        return {"content": [token for part in parts for token in part.get("content") or []], "refusal": None}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [value for part in parts for value in part.get(key) or []] for key in keys}


def message_text(message: ChatMessage) -> str | None:
    """Text of a message; parts of type `text` are joined with newlines; None if any part is not text."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            return None
        texts.append(part["text"])
    return "\n".join(texts)


def sampling_params(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    stop = body.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > 4:
        raise BadRequest("at most 4 stop sequences", param="stop", code="invalid_value")
    if any(not s for s in stops):
        raise BadRequest("stop sequences must not be empty", param="stop", code="invalid_value")
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, stop=stops, seed=body.seed,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, n=body.n)


def extras(body: SamplingFields, names: tuple[str, ...]) -> dict[str, Any]:
    found = {name: getattr(body, name) for name in names if getattr(body, name, None) is not None}
    found.update(body.model_extra or {})
    return found


class InferenceService:
    """Plans and runs chat and completion requests; owns no state besides its collaborators."""

    def __init__(self, settings: Settings, engine: Engine, prompts: PromptService, counter: TokenCounter,
                 metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.prompts = prompts
        self.counter = counter
        self.metrics = metrics

    # -- planning ------------------------------------------------------------------------------

    def planned(self, plan: Callable[[B], Plan], body: B) -> Plan:
        """Plan a request, counting refusals that happen before a route is chosen (route `none`)."""
        try:
            return plan(body)
        except APIError as exc:
            self.metrics.request_errors.labels(route=NO_PROMPT, code=str(exc.status_code)).inc()
            raise

    def _target(self, model: str) -> RoutablePrompt | None:
        """None for the base model (detect); the prompt for an adapter id; 404 otherwise."""
        if model in self.settings.base_model_names:
            return None
        entry = self.prompts.by_adapter_model(model)
        if entry is None:
            raise NotFound(f"the model '{model}' does not exist", param="model", code="model_not_found")
        return entry

    def _detect(self, fn: Any, arg: Any) -> Match | None:
        started = time.perf_counter()
        try:
            return fn(arg)  # type: ignore[no-any-return]
        finally:
            self.metrics.detection_duration.observe(time.perf_counter() - started)

    def plan_chat(self, body: ChatCompletionRequest) -> Plan:
        target = self._target(body.model)
        params = sampling_params(body, body.max_completion_tokens or body.max_tokens)
        texts = [message_text(m) for m in body.messages]
        all_text = all(t is not None for t in texts)
        if all_text:
            messages = [{**m.model_dump(exclude_none=True), "content": t} for m, t in zip(body.messages, texts,
                                                                                        strict=True)]
        else:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
        request = EngineRequest(kind="chat", messages=messages, params=params, extra=extras(body, CHAT_EXTRAS),
                                request_id=f"chatcmpl-{uuid.uuid4().hex}")
        if target is not None:
            return Plan("chat", body.model, "adapter", target.name, replace(request, adapter=target.adapter))
        special = bool(body.tools or body.functions) or body.n > 1 or not all_text
        match = None if special else self._detect(
            self.prompts.matcher.match_chat, [(m.role, t) for m, t in zip(body.messages, texts, strict=True)])
        return self._plan_match("chat", body.model, match, request)

    def plan_completion(self, body: CompletionRequest) -> Plan:
        target = self._target(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            else:
                raise BadRequest("only a single prompt string is supported per request", param="prompt",
                                 code="unsupported_prompt")
        assert isinstance(prompt, str)
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        request = EngineRequest(kind="completion", prompt=prompt, params=sampling_params(body, max_tokens),
                                extra=extras(body, COMPLETION_EXTRAS), request_id=f"cmpl-{uuid.uuid4().hex}")
        if target is not None:
            return Plan("completion", body.model, "adapter", target.name, replace(request, adapter=target.adapter))
        match = None if body.n > 1 else self._detect(self.prompts.matcher.match_completion, prompt)
        return self._plan_match("completion", body.model, match, request)

    def _plan_match(self, endpoint: Endpoint, model: str, match: Match | None, request: EngineRequest) -> Plan:
        if match is None:
            return Plan(endpoint, model, "passthrough", "", request)
        entry = self.prompts.routable(match.name)
        if entry is None:  # deleted between detection and now
            return Plan(endpoint, model, "passthrough", "", request)
        original = self.counter.original_tokens(entry.static_tokens, match.values)
        if entry.adapter is None:
            return Plan(endpoint, model, "fallback", entry.name, request, original_tokens=original)
        if not entry.bare:  # trained with the prompt kept: the adapter gets the request as sent
            return Plan(endpoint, model, "adapter", entry.name, replace(request, adapter=entry.adapter),
                        fallback=request)
        bare = bare_query_messages(entry.template, match.values)
        adapter_request = replace(request, kind="chat", messages=bare, prompt=None, adapter=entry.adapter)
        return Plan(endpoint, model, "adapter", entry.name, adapter_request, fallback=request,
                    original_tokens=original, expected_sent_tokens=self.counter.count_chat(bare))

    # -- running -------------------------------------------------------------------------------

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

    async def complete(self, plan: Plan, started: float) -> tuple[Plan, dict[str, Any]]:
        try:
            plan, stream, first = await self.start(plan)
            outcome = Outcome()
            ttft: float | None = None
            events = [first] if first is not None else []
            async for event in _chain(events, stream):
                if ttft is None and isinstance(event, TextDelta | ToolCallDelta):
                    ttft = time.perf_counter() - started
                outcome.add(event)
        except APIError as exc:
            self.record_error(plan, exc.status_code)
            raise
        usage = self.record(plan, outcome.usage, started, ttft)
        return plan, self._response(plan, outcome, usage)

    async def stream(self, plan: Plan, stream: AsyncIterator[EngineEvent], first: EngineEvent | None,
                     started: float, include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks in OpenAI's format, ending with `[DONE]`."""
        created = int(time.time())
        rid = plan.request.request_id
        ttft: float | None = None
        usage: Usage | None = None
        opened: set[int] = set()
        finished = False
        role = {"role": "assistant", "content": ""}
        try:
            async for event in _chain([first] if first is not None else [], stream):
                if (isinstance(event, TextDelta | ToolCallDelta | Finished) and plan.endpoint == "chat"
                        and event.index not in opened):
                    opened.add(event.index)  # a chat stream opens each choice with the role
                    yield _sse(self._chunk(plan, rid, created, event.index, role))
                if ttft is None and isinstance(event, TextDelta | ToolCallDelta):
                    ttft = time.perf_counter() - started
                if isinstance(event, TextDelta):
                    yield _sse(self._chunk(plan, rid, created, event.index, event.text, logprobs=event.logprobs))
                elif isinstance(event, ToolCallDelta):
                    yield _sse(self._chunk(plan, rid, created, event.index, {"tool_calls": event.tool_calls}))
                elif isinstance(event, Finished):
                    yield _sse(self._chunk(plan, rid, created, event.index, None, event.reason))
                elif isinstance(event, Usage):
                    usage = event
            finished = True
        except APIError as exc:
            finished = True
            self.record_error(plan, exc.status_code)
            yield sse_error(exc)
            yield "data: [DONE]\n\n"
            return
        finally:
            if not finished and usage is None:
                self.record_error(plan, 499)  # the client went away mid-stream
        assert usage is not None
        usage_out = self.record(plan, usage, started, ttft)
        if include_usage:
            chunk = self._chunk(plan, rid, created, 0, None)
            chunk["choices"] = []
            chunk["usage"] = usage_out
            yield _sse(chunk)
        yield "data: [DONE]\n\n"

    # -- accounting and shaping ----------------------------------------------------------------

    def record(self, plan: Plan, usage: Usage, started: float, ttft: float | None) -> dict[str, Any]:
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
        return {"prompt_tokens": sent, "completion_tokens": usage.completion_tokens,
                "total_tokens": sent + usage.completion_tokens,
                "promptintern": {"original_prompt_tokens": original, "saved_prompt_tokens": saved}}

    def record_error(self, plan: Plan, status: int) -> None:
        self.metrics.request_errors.labels(route=plan.route, code=str(status)).inc()

    def _chunk(self, plan: Plan, rid: str, created: int, index: int, delta: Mapping[str, Any] | str | None,
               finish: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if plan.endpoint == "chat":
            content: Mapping[str, Any] = {} if delta is None else ({"content": delta} if isinstance(delta, str)
                                                                    else delta)
            choice: dict[str, Any] = {"index": index, "delta": dict(content), "logprobs": logprobs,
                                      "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": plan.model,
                    "choices": [choice]}
        text = delta if isinstance(delta, str) else ""
        return {"id": rid, "object": "text_completion", "created": created, "model": plan.model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    def _response(self, plan: Plan, outcome: Outcome, usage: dict[str, Any]) -> dict[str, Any]:
        rid, created = plan.request.request_id, int(time.time())
        indices = sorted(set(outcome.texts) | set(outcome.finish) | set(outcome.tool_calls)) or [0]

        def logprobs(i: int) -> dict[str, Any] | None:
            parts = outcome.logprobs.get(i)
            return merge_logprobs(plan.endpoint, parts) if parts else None

        if plan.endpoint == "chat":
            choices: list[dict[str, Any]] = []
            for i in indices:
                text = "".join(outcome.texts.get(i, []))
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if outcome.tool_calls.get(i):
                    message["tool_calls"] = merge_tool_calls(outcome.tool_calls[i])
                    message["content"] = text or None  # OpenAI: no content beside tool calls
                choices.append({"index": i, "message": message, "logprobs": logprobs(i),
                                "finish_reason": outcome.finish.get(i, "stop")})
            return {"id": rid, "object": "chat.completion", "created": created, "model": plan.model,
                    "choices": choices, "usage": usage}
        choices = [{"index": i, "text": "".join(outcome.texts.get(i, [])), "logprobs": logprobs(i),
                    "finish_reason": outcome.finish.get(i, "stop")} for i in indices]
        return {"id": rid, "object": "text_completion", "created": created, "model": plan.model,
                "choices": choices, "usage": usage}


def _sse(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


async def _chain(head: list[EngineEvent], tail: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
    for event in head:
        yield event
    async for event in tail:
        yield event
