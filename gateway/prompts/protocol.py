"""Request and response bodies of the registry REST API (`/v1/prompts`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def exactly_one_of(first: tuple[str, str], second: tuple[str, str]) -> dict[str, Any]:
    """A JSON Schema `oneOf` saying that exactly one of two nullable fields is given (`(name, JSON type)` each).

    Pydantic does not check it (the service does, answering 422 in OpenAI's shape); it is here so the
    OpenAPI document states the rule and clients and fuzzers generate bodies that follow it.
    """
    (a, a_type), (b, b_type) = first, second
    return {"oneOf": [
        {"required": [a], "properties": {a: {"type": a_type}, b: {"type": "null"}}},
        {"required": [b], "properties": {b: {"type": b_type}, a: {"type": "null"}}},
    ]}


REGISTER_EXAMPLE: dict[str, Any] = {
    "name": "nl2bash",
    "messages": [
        {"role": "system", "content": "Translate the request into one bash command. Answer with the command only."},
        {"role": "user", "content": "{query}"},
    ],
}
TRAIN_EXAMPLE: dict[str, Any] = {
    "data": [
        {"query": "list files in /tmp", "response": "ls /tmp"},
        {"query": "count lines in notes.txt", "response": "wc -l notes.txt"},
        {"query": "show disk usage of the current folder", "response": "du -sh ."},
    ],
    "schedule": {"preset": "demo"},
    "eval_fraction": 0.0,
}
ADD_ADAPTER_EXAMPLE: dict[str, Any] = {"adapter_path": "nl2bash-lora"}


class TemplateMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(description="Text with {slot} placeholders; {{ and }} for literal braces.")


class TrainSpec(BaseModel):
    """A training request: exactly one of `data` (rows inline) or `path` (a server-side JSONL file)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        **exactly_one_of(("data", "array"), ("path", "string")), "examples": [TRAIN_EXAMPLE]})

    data: list[dict[str, Any]] | None = Field(
        None, description="Rows `{<slot>: value, ..., response}`; `query` names the slot of a one-slot template "
                          "(or give `path`).")
    path: str | None = Field(None, description="A JSONL file of the same rows in the gateway's import folder "
                                               "(PROMPTINTERN_IMPORT_DIR), relative to it or absolute "
                                               "(or give `data`).")
    schedule: dict[str, Any] | None = Field(
        None, description="`preset` (default `promptintern`; `demo` trains in about 3 minutes on 2 cores, demo "
                          "quality) and overrides of its fields; steps, batch size, learning rate and rows are "
                          "bounded.")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of rows held out for evaluation.")


class RegisterPrompt(BaseModel):
    """A recurring prompt: exactly one of `messages` (a chat template) or `prompt` (a completion template)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        **exactly_one_of(("messages", "array"), ("prompt", "string")), "examples": [REGISTER_EXAMPLE]})

    name: str = Field(description="1-64 letters, digits, '_', '.', '-'.", examples=["nl2bash"])
    tenant: str | None = Field(
        None, description="A tenant of `PROMPTINTERN_API_KEYS` (`tenant:key`): only its requests match this prompt "
                          "and only it sees the prompt's adapters; null (default): a global prompt, matched for "
                          "every caller after the caller's own tenant's prompts.")
    messages: list[TemplateMessage] | None = Field(None, description="Chat template (or give `prompt`).")
    prompt: str | None = Field(None, description="Completion template (or give `messages`).")
    examples: list[dict[str, str]] = Field(
        default_factory=list,
        description="Few-shot examples the template contains: `{<slot>|query: ..., response: ...}`, verbatim.",
    )
    adapter_path: str | None = Field(None, description="A PEFT LoRA folder in the gateway's import folder "
                                                       "(PROMPTINTERN_IMPORT_DIR) to serve for this prompt.")
    train: TrainSpec | None = Field(None, description="Start a training job right away.")


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [ADD_ADAPTER_EXAMPLE]})

    adapter_path: str = Field(description="A PEFT LoRA folder in the gateway's import folder "
                                          "(PROMPTINTERN_IMPORT_DIR), relative to it or absolute.")


class VersionOut(BaseModel):
    version: int
    status: Literal["training", "loading", "ready", "failed"]
    source: str
    created: datetime
    manifest: dict[str, Any] | None = None
    error: str | None = None


class JobOut(BaseModel):
    id: int
    status: str
    progress: dict[str, Any] | None = None
    error: str | None = None
    attempts: int
    version: int | None = None
    created: datetime
    started: datetime | None = None
    finished: datetime | None = None


class PromptOut(BaseModel):
    name: str
    tenant: str | None = Field(description="The tenant whose requests alone match the prompt; null: every caller.")
    kind: Literal["chat", "completion"]
    template: list[dict[str, str]] | str
    slots: list[str]
    examples: list[dict[str, str]]
    status: str = Field(description="The active version's status, or `registered` when it has none.")
    active_version: int | None
    versions: list[VersionOut]
    job: JobOut | None = None
    created: datetime


class PromptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PromptOut]
