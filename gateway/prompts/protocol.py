"""Request and response bodies of the registry REST API (`/v1/prompts`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.agreement import AgreementMetric


def exactly_one_of(*fields: tuple[str, str]) -> dict[str, Any]:
    """A JSON Schema `oneOf` saying that exactly one of these nullable fields is given (`(name, JSON type)` each).

    Pydantic does not check it (the service does, answering 422 in OpenAI's shape); it is here so the
    OpenAPI document states the rule and clients and fuzzers generate bodies that follow it.
    """
    return {"oneOf": [
        {"required": [name], "properties": {name: {"type": kind},
                                            **{other: {"type": "null"} for other, _ in fields if other != name}}}
        for name, kind in fields
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


DEFAULT_MAX_ROWS = 10_000  # a prompt's recorded answers kept when `record.max_rows` is not given
MAX_ROWS_LIMIT = 1_000_000  # the most `record.max_rows` may ask for


class RecordSetting(BaseModel):
    """Recording of a prompt's `fallback` answers as training rows (a ring buffer: the oldest dropped)."""

    model_config = ConfigDict(extra="forbid")

    rate: float = Field(ge=0.0, le=1.0, description="Share of the prompt's fallback requests recorded (0..1).")
    max_rows: int | None = Field(
        None, ge=1, le=MAX_ROWS_LIMIT,
        description=f"Recorded rows kept, the oldest dropped beyond (default {DEFAULT_MAX_ROWS}).")


class RecordOut(BaseModel):
    rate: float
    max_rows: int


DEFAULT_GUARD_WINDOW = 50  # shadowed requests whose mean agreement is judged, when `guard.window` is not given
MAX_GUARD_WINDOW = 10_000


class GuardSetting(BaseModel):
    """The shadow guard: for a share of the prompt's `adapter` requests, the teacher (the full prompt, on the
    upstream or the base model) is asked too, after the client has its answer; when the mean agreement of the
    last `window` pairs falls below `min_agreement`, the prompt rolls back by itself."""

    model_config = ConfigDict(extra="forbid")

    shadow_rate: float = Field(ge=0.0, le=1.0, description="Share of the prompt's adapter requests shadowed (0..1).")
    min_agreement: float = Field(ge=0.0, le=1.0, description="Roll back when the window's mean agreement is below.")
    window: int = Field(DEFAULT_GUARD_WINDOW, ge=1, le=MAX_GUARD_WINDOW,
                        description=f"Shadowed requests judged together (default {DEFAULT_GUARD_WINDOW}).")
    metric: AgreementMetric = Field("exact", description="`exact` (whitespace-normalised exact match, default), "
                                                         "or `chrf` / `bleu` (sentence score / 100) for long answers.")


class ServingSetting(BaseModel):
    """How a prompt's active version is served: `lora` (its adapter on the shared engine, the default) or `merged`
    (its adapter merged into the base weights, on an engine of its own: no LoRA cost per request)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["lora", "merged"] = Field("lora", description="`merged` needs PROMPTINTERN_ENGINE=vllm.")
    url: str | None = Field(
        None, max_length=2048,
        description="`merged` only: the base URL of a merged engine run elsewhere (a cluster), which must serve the "
                    "model id `<prompt>@v<N>`; null: a replica starts one itself (MERGED_PORTS, MAX_MERGED_ENGINES).")


class ServingOut(BaseModel):
    requested: Literal["lora", "merged"]
    current: Literal["lora", "merged"] = Field(
        description="What answers now: `lora` until the merged engine answers for the active version.")
    url: str | None = Field(description="The merged engine's URL when run elsewhere; null: started by a replica.")
    error: str | None = Field(description="Why the prompt is not served merged yet, when it was asked to be.")


class PatchPrompt(BaseModel):
    """A JSON merge patch of a prompt's settings: a field present replaces the setting, `null` turns it off."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"record": {"rate": 0.1}}, {"guard": {"shadow_rate": 0.05, "min_agreement": 0.8, "window": 50}}]})

    record: RecordSetting | None = Field(None, description="Record this share of fallback answers; null: stop.")
    guard: GuardSetting | None = Field(None, description="Shadow-check this share of adapter answers and roll back "
                                                         "when they stop agreeing with the teacher; null: off.")
    serving: ServingSetting | None = Field(None, description="Serve the active version merged or by LoRA; null: LoRA.")


class TrafficList(BaseModel):
    total: int = Field(description="Recorded rows the prompt has (all of them, not only those listed).")
    data: list[dict[str, Any]] = Field(description="`{<slot>: value, ..., response, model, created}`, newest first.")


class TrainSpec(BaseModel):
    """A training request: exactly one of `data` (rows inline), `path` (a server-side JSONL file) or
    `source: "traffic"` (the prompt's recorded answers)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        **exactly_one_of(("data", "array"), ("path", "string"), ("source", "string")),
        "examples": [TRAIN_EXAMPLE]})

    data: list[dict[str, Any]] | None = Field(
        None, description="Rows `{<slot>: value, ..., response}`; `query` names the slot of a one-slot template "
                          "(or give `path`).")
    path: str | None = Field(None, description="A JSONL file of the same rows in the gateway's import folder "
                                               "(PROMPTINTERN_IMPORT_DIR), relative to it or absolute "
                                               "(or give `data`).")
    source: Literal["traffic"] | None = Field(
        None, description="`traffic`: train on the prompt's recorded answers (self-distillation; no labels), "
                          "taken as they are when the job is submitted.")
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
    record: RecordSetting | None = Field(None, description="Record a share of the prompt's fallback answers as "
                                                           "training rows (default: off).")


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [ADD_ADAPTER_EXAMPLE]})

    adapter_path: str = Field(description="A PEFT LoRA folder in the gateway's import folder "
                                          "(PROMPTINTERN_IMPORT_DIR), relative to it or absolute.")


class VersionOut(BaseModel):
    version: int
    status: Literal["training", "loading", "ready", "failed", "rejected"]
    source: str
    created: datetime
    manifest: dict[str, Any] | None = None
    error: str | None = Field(None, description="Why the version failed (status `failed`).")
    reason: str | None = Field(None, description="Why it was rejected (status `rejected`: the promotion gate's "
                                                 "figures, or the guard's rollback).")


class JobOut(BaseModel):
    id: int
    status: str
    rows: int | None = Field(None, description="Training rows the job uses.")
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
    record: RecordOut | None = Field(None, description="Recording of fallback answers; null: off.")
    guard: GuardSetting | None = Field(None, description="The shadow guard; null: off.")
    serving: ServingOut = Field(description="LoRA or merged: asked for, and answering now.")
    created: datetime


class PromptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PromptOut]
