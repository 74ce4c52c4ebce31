"""Held-out evaluation: exact match and corpus BLEU, input tokens and latency per condition.

Conditions compare what the gateway would do: the base model with the full prompt (fallback),
the base model with the bare query, and the new adapter with the bare query (with the full
prompt for the full-prompt baseline). Decoding is greedy, one request at a time, so latency is
what a single request costs on this machine, with no prefix caching.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sacrebleu
import torch

ModelSide = Literal["base", "adapter"]
InputSide = Literal["full_prompt", "bare"]
SAMPLES_IN_MANIFEST = 5


@dataclass
class EvalOptions:
    """How the held-out split is evaluated."""

    enabled: bool = field(default=True, metadata={"help": "Evaluate on the held-out split after training."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest generated answer, in tokens (greedy)."})
    full_prompt_limit: int | None = field(
        default=100,
        metadata={
            "help": "Evaluate full-prompt conditions (slow: the whole prompt per request) on at most this "
            "many held-out rows, the first in split order; none for all."
        },
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.full_prompt_limit is not None and self.full_prompt_limit < 1:
            raise ValueError("full_prompt_limit must be >= 1 or None")


def condition_name(model: ModelSide, inputs: InputSide) -> str:
    return f"{model}+{inputs}"


def normalise_answer(text: str) -> str:
    """Exact match ignores whitespace differences only."""
    return " ".join(text.split())


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match (against any reference) in percent and sacrebleu corpus BLEU."""
    if not predictions:
        return {"exact_match": 0.0, "bleu": 0.0}
    hits = sum(
        any(normalise_answer(p) == normalise_answer(r) for r in refs)
        for p, refs in zip(predictions, references, strict=True)
    )
    width = max(len(r) for r in references)
    streams: list[list[str | None]] = [
        [refs[i] if i < len(refs) else None for refs in references] for i in range(width)
    ]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams)  # type: ignore[arg-type]
    return {"exact_match": 100.0 * hits / len(predictions), "bleu": float(bleu.score)}


@dataclass
class Generation:
    text: str
    input_tokens: int
    output_tokens: int
    seconds: float


def generate(model: Any, tokenizer: Any, prompt_text: str, max_new_tokens: int) -> Generation:
    """One greedy completion of an already rendered prompt, timed."""
    ids = tokenizer(prompt_text, add_special_tokens=False, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        )
    seconds = time.perf_counter() - started
    new = out[0, ids["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return Generation(text, int(ids["input_ids"].shape[1]), int(new.shape[0]), seconds)


def run_condition(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    max_new_tokens: int,
    on_item: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate for every prompt and return figures plus predictions."""
    was_training = model.training
    model.eval()
    gens = []
    for i, prompt in enumerate(prompts):
        gens.append(generate(model, tokenizer, prompt, max_new_tokens))
        if on_item:
            on_item(i + 1)
    model.train(was_training)
    predictions = [g.text for g in gens]
    figures = score(predictions, references)
    latencies = [g.seconds for g in gens]
    return {
        "n": len(gens),
        **figures,
        "input_tokens": statistics.fmean(g.input_tokens for g in gens) if gens else 0.0,
        "output_tokens": statistics.fmean(g.output_tokens for g in gens) if gens else 0.0,
        "latency_s": statistics.fmean(latencies) if gens else 0.0,
        "latency_p50_s": statistics.median(latencies) if gens else 0.0,
        "predictions": predictions,
    }


def subset_figures(result: dict[str, Any], references: Sequence[Sequence[str]], n: int) -> dict[str, float]:
    """Scores of a condition on its first n items (to compare with a full-prompt subset)."""
    return {"n": n, **score(result["predictions"][:n], references[:n])}


def format_table(evaluation: dict[str, Any]) -> str:
    """The evaluation as a fixed-width table, one condition per line."""
    rows = [("condition", "n", "exact match %", "BLEU", "input tokens", "latency s")]
    for name, c in evaluation.get("conditions", {}).items():
        rows.append(
            (
                name + (" (cached)" if c.get("cached") else ""),
                str(c["n"]),
                f"{c['exact_match']:.1f}",
                f"{c['bleu']:.1f}",
                f"{c['input_tokens']:.0f}",
                f"{c['latency_s']:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    subset = evaluation.get("full_prompt_subset")
    if subset:
        lines.append(f"(full-prompt conditions on the first {subset} held-out rows; on that subset:")
        for name, c in evaluation.get("conditions", {}).items():
            if "on_full_prompt_subset" in c:
                s = c["on_full_prompt_subset"]
                lines.append(f"   {name}: exact match {s['exact_match']:.1f} %, BLEU {s['bleu']:.1f}")
        lines[-1] += ")"
    return "\n".join(lines)


def manifest_view(result: dict[str, Any], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A condition's figures for the manifest, with a few predictions as samples."""
    view = {k: v for k, v in result.items() if k != "predictions"}
    view["samples"] = [
        {"reference": references[i][0], "prediction": result["predictions"][i]}
        for i in range(min(SAMPLES_IN_MANIFEST, len(result["predictions"])))
    ]
    return view
