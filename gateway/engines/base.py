"""The engine interface: what the router needs from an inference backend (embedded or vLLM)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from core.errors import InvalidAdapter
from gateway.errors import APIError, BadRequest, ServiceUnavailable


class EngineError(APIError):
    """The engine failed while answering; a 500 unless a subclass says otherwise."""

    status_code = 500
    error_type = "server_error"


class EngineUnavailable(ServiceUnavailable):
    """The engine cannot be reached (vLLM down, model not loaded)."""


class EngineOverloaded(APIError):
    """The engine holds as many requests as it may (queued plus running): a 429 the client retries later."""

    status_code = 429
    error_type = "rate_limit_error"
    retry_after: float  # seconds: always set, so the answer always carries a Retry-After header

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="engine_overloaded", retry_after=retry_after)


class ContextLengthExceeded(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages", code="context_length_exceeded")


class UnsupportedParameter(BadRequest):
    def __init__(self, param: str, engine: str, *, what: str | None = None) -> None:
        message = (f"{what} are not supported by the {engine} engine ({param})" if what
                   else f"'{param}' is not supported by the {engine} engine")
        super().__init__(message, param=param, code="unsupported_parameter")


class AdapterNotLoaded(EngineError):
    """The named adapter is not (or no longer) in the engine; the router may fall back."""

    status_code = 404
    error_type = "invalid_request_error"


class AdapterLoadError(InvalidAdapter):
    """An adapter the engine refused (wrong architecture, modules, rank, files)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1


@dataclass
class EngineRequest:
    """One generation: chat messages or a completion prompt, on the base model or one adapter."""

    kind: Literal["chat", "completion"]
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    adapter: str | None = None
    # OpenAI fields the gateway does not interpret (tools, logprobs, response_format, ...):
    # forwarded to engines that support them, refused by those that do not.
    extra: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str
    # The engine's log probabilities for this text, in OpenAI's shape for the endpoint (None: not asked for).
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True)
class ToolCallDelta:
    """Streamed tool-call pieces of one choice, in OpenAI's `delta.tool_calls` shape (chat only)."""

    index: int
    tool_calls: list[dict[str, Any]]


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


EngineEvent = TextDelta | ToolCallDelta | Finished | Usage


class Engine(Protocol):
    """An inference backend; every method is safe to call from concurrent requests."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check_ready(self) -> None:
        """Raise EngineUnavailable when the engine cannot serve."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream text deltas and finish reasons, then exactly one Usage event."""
        ...

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load (or reload) a PEFT LoRA folder under `name`; raise AdapterLoadError if it does not fit."""

    async def unload_adapter(self, name: str) -> None: ...

    def loaded_adapters(self) -> set[str]: ...

    @property
    def max_model_len(self) -> int: ...
