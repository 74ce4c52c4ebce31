"""OpenAI response bodies and stream chunks: the wire format is built from these models, not only documented."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

LOGPROBS_DOC = "The engine's log probabilities when the request asked for them (vLLM engine), else null."


def _is_none(value: object) -> bool:
    return value is None


class PromptInternUsage(BaseModel):
    original_prompt_tokens: int = Field(description="Prompt tokens the app sent (the full prompt).")
    saved_prompt_tokens: int = Field(description="Prompt tokens the gateway removed before the model.")


class UsageOut(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens the model processed.")
    completion_tokens: int
    total_tokens: int
    promptintern: PromptInternUsage | None = Field(
        None, description="`original_prompt_tokens` the app sent and `saved_prompt_tokens` the gateway removed.")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer's text; null when the answer is only tool calls.")
    tool_calls: list[dict[str, Any]] | None = Field(
        None, exclude_if=_is_none,
        description="Tool calls in OpenAI's shape, when the request had `tools` (vLLM engine); absent otherwise.")


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = Field(None, description=LOGPROBS_DOC)
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = Field(None, description=LOGPROBS_DOC)
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """A whole completion, and also each streamed completion chunk (as OpenAI does: `finish_reason` null)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None = Field(None, exclude_if=_is_none, description="Absent on stream chunks but the last.")


class ChatDelta(BaseModel):
    """Only the fields a chunk carries are sent."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)
    tool_calls: list[dict[str, Any]] | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = Field(None, exclude_if=_is_none, description="Only on the last chunk, when asked for.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "promptintern"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
