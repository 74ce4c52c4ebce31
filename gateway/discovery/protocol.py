"""Bodies of the discovery routes (`/v1/prompts/candidates`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.prompts.protocol import RecordSetting


class CandidateOut(BaseModel):
    id: str = Field(description="Hash of the template (and its tenant): stable while the template stays the same.")
    tenant: str | None = Field(description="The tenant whose requests produced it (null: callers of no tenant).")
    kind: Literal["chat", "completion"]
    template: list[dict[str, str]] | str = Field(
        description="Chat messages or a completion prompt, `{slot}` for what varies, literal braces as `{{ }}`.")
    slots: list[str]
    requests: int = Field(description="Passthrough requests of this template seen (all replicas, sampled).")
    mean_prompt_tokens: float = Field(description="Prompt tokens of an average request (the gateway's tokenizer).")
    static_tokens: int = Field(description="Prompt tokens of the template without its slot values.")
    static_share: float = Field(description="static_tokens / mean_prompt_tokens.")
    projected_saved_tokens_per_1k_requests: int = Field(
        description="Prompt tokens an adapter would save per 1,000 requests (static tokens minus the bare query's "
                    "own wrapper).")
    projected_saved_tokens: int = Field(description="The same for the requests seen so far (the ranking).")
    projected_saved_usd: float = Field(description="projected_saved_tokens at PRICE_INPUT_PER_1K.")
    examples: list[dict[str, str]] = Field(description="A few slot values seen (at most three).")
    first_seen: datetime
    last_seen: datetime


class CandidateList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CandidateOut]


class RegisterCandidate(BaseModel):
    """Register a discovered candidate as a prompt."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"name": "support-triage", "slots": {"query": "ticket"}, "record": {"rate": 0.2}}]})

    name: str = Field(description="The prompt's name: 1-64 letters, digits, '_', '.', '-'.")
    slots: dict[str, str] | None = Field(None, description="Slot renames `{old: new}`.")
    record: RecordSetting | None = Field(
        None, description="Record a share of its fallback answers as training rows (learning from traffic).")
