"""Response shaping: engine events joined into OpenAI's whole answers and stream chunks (typed models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.engines.base import EngineEvent, Finished, TextDelta, ToolCallDelta, Usage
from gateway.openai_api.planning import Endpoint, Plan
from gateway.openai_api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    UsageOut,
)


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


def whole_response(plan: Plan, outcome: Outcome, usage: UsageOut,
                   created: int) -> ChatCompletionResponse | CompletionResponse:
    rid = plan.request.request_id
    indices = sorted(set(outcome.texts) | set(outcome.finish) | set(outcome.tool_calls)) or [0]

    def logprobs(i: int) -> dict[str, Any] | None:
        parts = outcome.logprobs.get(i)
        return merge_logprobs(plan.endpoint, parts) if parts else None

    if plan.endpoint == "chat":
        choices: list[ChatChoice] = []
        for i in indices:
            text = "".join(outcome.texts.get(i, []))
            calls = merge_tool_calls(outcome.tool_calls[i]) if outcome.tool_calls.get(i) else None
            # OpenAI: no content beside tool calls
            message = ChatMessageOut(content=(text or None) if calls else text, tool_calls=calls)
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs(i),
                                      finish_reason=outcome.finish.get(i, "stop")))
        return ChatCompletionResponse(id=rid, created=created, model=plan.model, choices=choices, usage=usage)
    return CompletionResponse(
        id=rid, created=created, model=plan.model, usage=usage,
        choices=[CompletionChoice(index=i, text="".join(outcome.texts.get(i, [])), logprobs=logprobs(i),
                                  finish_reason=outcome.finish.get(i, "stop")) for i in indices])


class ChunkShaper:
    """Builds one request's stream chunks as JSON.

    Every chunk of a stream shares its fields but `choices`, so they are serialised once: a chunk is that JSON
    with its one choice's JSON spliced into `choices` (the same bytes as serialising the whole chunk model).
    """

    def __init__(self, plan: Plan, created: int) -> None:
        self.plan = plan
        self.rid = plan.request.request_id
        self.created = created
        self._opened: set[int] = set()
        empty = (ChatCompletionChunk(id=self.rid, created=created, model=plan.model, choices=[])
                 if plan.endpoint == "chat" else
                 CompletionResponse(id=self.rid, created=created, model=plan.model, choices=[])).model_dump_json()
        if not empty.endswith('"choices":[]}'):  # `choices` is the last field sent on a chunk (usage aside)
            raise AssertionError(f"unexpected chunk layout: {empty}")
        self._head, self._tail = empty[:-2], "]}"

    def chunks(self, event: EngineEvent) -> list[str]:
        """The chunks for one engine event (a chat choice opens with the role); none for Usage."""
        if isinstance(event, Usage):
            return []
        out: list[str] = []
        if self.plan.endpoint == "chat" and event.index not in self._opened:
            self._opened.add(event.index)
            out.append(self._chat(event.index, ChatDelta(role="assistant", content="")))
        if isinstance(event, TextDelta):
            out.append(self._chat(event.index, ChatDelta(content=event.text), logprobs=event.logprobs)
                       if self.plan.endpoint == "chat" else self._completion(event.index, event.text, event.logprobs))
        elif isinstance(event, ToolCallDelta):
            out.append(self._chat(event.index, ChatDelta(tool_calls=event.tool_calls)))
        elif isinstance(event, Finished):
            out.append(self._chat(event.index, ChatDelta(), finish=event.reason) if self.plan.endpoint == "chat"
                       else self._completion(event.index, "", None, finish=event.reason))
        return out

    def usage_chunk(self, usage: UsageOut) -> str:
        if self.plan.endpoint == "chat":
            chat = ChatCompletionChunk(id=self.rid, created=self.created, model=self.plan.model, choices=[],
                                       usage=usage)
            return chat.model_dump_json()
        completion = CompletionResponse(id=self.rid, created=self.created, model=self.plan.model, choices=[],
                                        usage=usage)
        return completion.model_dump_json()

    def _chat(self, index: int, delta: ChatDelta, *, logprobs: dict[str, Any] | None = None,
              finish: str | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return self._head + choice.model_dump_json() + self._tail

    def _completion(self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None = None) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return self._head + choice.model_dump_json() + self._tail
