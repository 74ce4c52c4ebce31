"""The rows of the paper's table and what one row measured: shared by measuring, the table and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Inputs = Literal["full", "bare", "compressed"]

ROW_IDS: tuple[str, ...] = (
    "base_full", "base_bare", "compressed_keep0.5", "compressed_keep0.2", "base_full_prefix_cache",
    "full_prompt_ft", "direct_ft", "promptintern", "promptintern_gateway", "promptintern_merged",
)


@dataclass(frozen=True)
class Condition:
    """One row of the table: what the engine receives, on which weights, with or without prefix caching."""

    id: str
    number: str
    label: str
    inputs: Inputs
    adapter: str | None = None  # the trainer schedule whose adapter serves the row
    keep_ratio: float | None = None
    prefix_caching: bool = False
    gateway: bool = False
    merged: bool = False  # the adapter merged into the base weights, on its own vLLM without LoRA


CONDITIONS: tuple[Condition, ...] = (
    Condition("base_full", "1", "Base model, full prompt (instructions + few-shot examples)", "full"),
    Condition("base_bare", "2", "Base model, bare query", "bare"),
    Condition("compressed_keep0.5", "3a", "Compressed prompt, keep_ratio 0.5 (LLMLingua-style)", "compressed",
              keep_ratio=0.5),
    Condition("compressed_keep0.2", "3b", "Compressed prompt, keep_ratio 0.2 (LLMLingua-style)", "compressed",
              keep_ratio=0.2),
    Condition("base_full_prefix_cache", "4", "Base model, full prompt, vLLM automatic prefix caching", "full",
              prefix_caching=True),
    Condition("full_prompt_ft", "5", "Full-prompt fine-tuning (prompt kept at inference)", "full",
              adapter="full_prompt"),
    Condition("direct_ft", "6", "Direct fine-tuning, bare query", "bare", adapter="direct"),
    Condition("promptintern", "7", "PromptIntern (progressive), bare query", "bare", adapter="promptintern"),
    Condition("promptintern_gateway", "8", "PromptIntern through the gateway (app sends the full prompt)", "full",
              adapter="promptintern", gateway=True),
    Condition("promptintern_merged", "9", "PromptIntern merged into the weights (merged serving), bare query",
              "bare", adapter="promptintern", merged=True),
)


@dataclass(frozen=True)
class Prices:
    """USD per 1,000 input and output tokens (PRICE_INPUT_PER_1K, PRICE_OUTPUT_PER_1K)."""

    input_per_1k: float
    output_per_1k: float

    def per_1k_requests(self, input_tokens: float, output_tokens: float) -> float:
        """Cost of 1,000 requests of this mean size: tokens x price per 1,000 tokens, times 1,000 / 1,000."""
        return input_tokens * self.input_per_1k + output_tokens * self.output_per_1k


@dataclass
class Measurement:
    """What one row measured; figures stay None where the row does not apply on this engine."""

    condition: Condition
    n: int = 0
    input_tokens: float | None = None
    original_input_tokens: float | None = None
    output_tokens: float | None = None
    bleu: float | None = None
    bleu_ci95: tuple[float, float] | None = None
    exact_match: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    throughput_rps_c8: float | None = None
    throughput_requests: int = 0
    training_time_s: float | None = None
    seconds: float | None = None
    note: str = ""
    samples: list[dict[str, str]] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return bool(self.latencies_s)
