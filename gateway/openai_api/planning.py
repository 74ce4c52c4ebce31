"""Planning: detect a registered prompt and decide the route before the engine is called.

Routes: `adapter` (bare query to the prompt's ready adapter), `fallback` (matched, but no adapter
is ready or it failed before answering: the full prompt goes to the base model) and
`passthrough` (no registered prompt: the request goes to the base model unchanged). A request for
an upstream model (UPSTREAM_URL) is detected the same way; its `fallback` and `passthrough` go to
the upstream with the body as the client sent it, its `adapter` route is answered locally.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from core.config import Settings
from core.templates import bare_query_messages
from gateway.engines.base import EngineRequest, SamplingParams
from gateway.errors import APIError, BadRequest, NotFound
from gateway.matcher import Match
from gateway.metrics import NO_PROMPT, GatewayMetrics
from gateway.openai_api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    engine_extras,
)
from gateway.prompts.service import PromptService, RoutablePrompt
from gateway.tokens import TokenCounter, UpstreamCalibration

Route = Literal["adapter", "fallback", "passthrough"]
Endpoint = Literal["chat", "completion"]
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
    tenant: str | None = None  # the tenant of the caller's API key
    upstream: bool = False  # an upstream model: fallback and passthrough are relayed to the upstream
    upstream_body: dict[str, Any] | None = None  # the request body as the client sent it (set by the route)
    slots: dict[str, str] | None = None  # the matched prompt's slot values (what recording keeps)

    @property
    def relayed(self) -> bool:
        """Answered by the upstream, not by the local engine."""
        return self.upstream and self.route != "adapter"

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


class Planner:
    """Turns a parsed request into a Plan; reads the registry's routing table, changes nothing."""

    def __init__(self, settings: Settings, prompts: PromptService, counter: TokenCounter,
                 metrics: GatewayMetrics, calibration: UpstreamCalibration | None = None) -> None:
        self.settings = settings
        self.prompts = prompts
        self.counter = counter
        self.metrics = metrics
        self.calibration = calibration or UpstreamCalibration()

    def planned(self, plan: Callable[[B, str | None], Plan], body: B, tenant: str | None) -> Plan:
        """Plan a request (of the caller's tenant), counting refusals that happen before a route is chosen
        (route `none`)."""
        try:
            return replace(plan(body, tenant), tenant=tenant)
        except APIError as exc:
            self.metrics.request_errors.labels(route=NO_PROMPT, code=str(exc.status_code)).inc()
            raise

    def _target(self, model: str, tenant: str | None) -> RoutablePrompt | None:
        """None for the base model or an upstream model (detect); the prompt for an adapter id; 404 otherwise
        (another tenant's adapter included: its existence is not told)."""
        if model in self.settings.base_model_names:
            return None
        entry = self.prompts.by_adapter_model(model, tenant)
        if entry is None:
            if self.settings.is_upstream_model(model):
                return None
            raise NotFound(f"the model '{model}' does not exist", param="model", code="model_not_found")
        return entry

    def _upstream(self, model: str, target: RoutablePrompt | None) -> bool:
        return target is None and self.settings.is_upstream_model(model)

    def _detect(self, fn: Callable[[Any], Match | None], arg: Any) -> Match | None:
        started = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.metrics.detection_duration.observe(time.perf_counter() - started)

    def plan_chat(self, body: ChatCompletionRequest, tenant: str | None = None) -> Plan:
        target = self._target(body.model, tenant)
        params = sampling_params(body, body.max_completion_tokens or body.max_tokens)
        texts = [message_text(m) for m in body.messages]
        all_text = all(t is not None for t in texts)
        if all_text:
            messages = [{**m.model_dump(exclude_none=True), "content": t}
                        for m, t in zip(body.messages, texts, strict=True)]
        else:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
        request = EngineRequest(kind="chat", messages=messages, params=params, extra=engine_extras(body),
                                request_id=f"chatcmpl-{uuid.uuid4().hex}")
        if target is not None:
            return Plan("chat", body.model, "adapter", target.name, replace(request, adapter=target.adapter))
        special = bool(body.tools or body.functions) or body.n > 1 or not all_text
        match = None if special else self._detect(
            lambda pairs: self.prompts.match_chat(pairs, tenant),
            [(m.role, t) for m, t in zip(body.messages, texts, strict=True)])
        return self._calibrated(replace(self._plan_match("chat", body.model, match, request),
                                        upstream=self._upstream(body.model, None)))

    def plan_completion(self, body: CompletionRequest, tenant: str | None = None) -> Plan:
        target = self._target(body.model, tenant)
        prompt = body.prompt
        upstream = self._upstream(body.model, target)
        if upstream and not (isinstance(prompt, str) and prompt):  # lists, token ids: for the upstream to judge
            request = EngineRequest(kind="completion", params=sampling_params(body, body.max_tokens),
                                    request_id=f"cmpl-{uuid.uuid4().hex}")
            return Plan("completion", body.model, "passthrough", "", request, upstream=True)
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            else:
                raise BadRequest("only a single prompt string is supported per request", param="prompt",
                                 code="unsupported_prompt")
        assert isinstance(prompt, str)
        if not prompt:
            raise BadRequest("the prompt must not be empty", param="prompt", code="invalid_value")
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        request = EngineRequest(kind="completion", prompt=prompt, params=sampling_params(body, max_tokens),
                                extra=engine_extras(body), request_id=f"cmpl-{uuid.uuid4().hex}")
        if target is not None:
            return Plan("completion", body.model, "adapter", target.name, replace(request, adapter=target.adapter))
        match = None if body.n > 1 else self._detect(lambda text: self.prompts.match_completion(text, tenant), prompt)
        return self._calibrated(replace(self._plan_match("completion", body.model, match, request), upstream=upstream))

    def _calibrated(self, plan: Plan) -> Plan:
        """An upstream model's adapter answer counts as original what the upstream would have billed for the
        full prompt (the gateway's count scaled by the prompt's learnt ratio, `UpstreamCalibration`)."""
        if not plan.upstream or plan.route != "adapter" or plan.original_tokens is None:
            return plan
        return replace(plan, original_tokens=self.calibration.scale(plan.prompt, plan.original_tokens))

    def _plan_match(self, endpoint: Endpoint, model: str, match: Match | None, request: EngineRequest) -> Plan:
        if match is None:
            return Plan(endpoint, model, "passthrough", "", request)
        entry = self.prompts.routable(match.name)
        if entry is None:  # deleted between detection and now
            return Plan(endpoint, model, "passthrough", "", request)
        original = self.counter.original_tokens(self.prompts.static_tokens(entry), match.values)
        if entry.adapter is None:
            return Plan(endpoint, model, "fallback", entry.name, request, original_tokens=original,
                        slots=match.values)
        if not entry.bare:  # trained with the prompt kept: the adapter gets the request as sent
            return Plan(endpoint, model, "adapter", entry.name, replace(request, adapter=entry.adapter),
                        fallback=request, slots=match.values)
        bare = bare_query_messages(entry.template, match.values)
        adapter_request = replace(request, kind="chat", messages=bare, prompt=None, adapter=entry.adapter)
        return Plan(endpoint, model, "adapter", entry.name, adapter_request, fallback=request,
                    original_tokens=original, expected_sent_tokens=self.counter.count_chat(bare), slots=match.values)
