"""Request and response bodies of the registry REST API (`/v1/prompts`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TemplateMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(description="Text with {slot} placeholders; {{ and }} for literal braces.")


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[dict[str, Any]] | None = Field(
        None, description="Rows `{<slot>: value, ..., response}`; `query` names the slot of a one-slot template.")
    path: str | None = Field(None, description="Server-side JSONL file of the same rows.")
    schedule: dict[str, Any] | None = Field(None, description="Overrides of the progressive schedule.")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of rows held out for evaluation.")


class RegisterPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 letters, digits, '_', '.', '-'.", examples=["nl2bash"])
    messages: list[TemplateMessage] | None = Field(None, description="Chat template.")
    prompt: str | None = Field(None, description="Completion template.")
    examples: list[dict[str, str]] = Field(
        default_factory=list,
        description="Few-shot examples the template contains: `{<slot>|query: ..., response: ...}`, verbatim.",
    )
    adapter_path: str | None = Field(None, description="An existing PEFT LoRA folder to serve for this prompt.")
    train: TrainSpec | None = Field(None, description="Start a training job right away.")


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_path: str = Field(description="A PEFT LoRA folder readable by the gateway.")


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
