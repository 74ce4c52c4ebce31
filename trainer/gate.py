"""The promotion gate of a version trained from recorded traffic.

Recorded rows are the teacher's answers (the full prompt, on the upstream or the base model), so a held-out
recorded row asks: does the adapter, from the bare query, answer as the teacher did? The gate scores the new
adapter's greedy answers on the job's held-out rows against the recorded answers (`core.agreement`, the guard's
metric), and the version that serves the prompt now (the incumbent) on the same rows. The new version passes when
it agrees at least as well as the incumbent, or reaches the guard's `min_agreement`; with no incumbent, when it
reaches `min_agreement` (with no guard, it passes: there is nothing to compare with). A version that fails is
published as `rejected`, with these figures as its reason, and never served.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.agreement import AgreementMetric, agreement
from trainer import cache as store
from trainer.data import RESPONSE, Row, slot_values
from trainer.dataset import prompt_text
from trainer.evaluate import run_condition
from trainer.prompting import PromptLayout

INCUMBENT = "incumbent"


@dataclass(frozen=True)
class GateOptions:
    metric: AgreementMetric = "exact"
    min_agreement: float | None = None  # the guard's, when the prompt has one
    incumbent_dir: Path | None = None  # the active version's adapter folder, when there is one
    incumbent_version: int | None = None


def decide(new: float, incumbent: float | None, minimum: float | None) -> tuple[bool, str]:
    """Whether a new version with agreement `new` passes, and why (the figures)."""
    figures = f"agreement {new:.3f} with the teacher on held-out recorded rows"
    if incumbent is not None and new >= incumbent:
        return True, f"{figures}, at least the active version's {incumbent:.3f}"
    if minimum is not None and new >= minimum:
        return True, f"{figures}, at least the guard's min_agreement {minimum}"
    if incumbent is None and minimum is None:
        return True, f"{figures}; no active version and no guard to compare with"
    against = [f"the active version's {incumbent:.3f}"] if incumbent is not None else []
    against += [f"the guard's min_agreement {minimum}"] if minimum is not None else []
    return False, f"rejected by the promotion gate: {figures}, below {' and '.join(against)}"


def run_gate(options: GateOptions, peft_model: Any, tokenizer: Any, layout: PromptLayout, template: Any,
             test: Sequence[Row], new_predictions: Sequence[str] | None, max_new_tokens: int) -> dict[str, Any]:
    """Score the new adapter (its evaluation's predictions when given) and the incumbent on the held-out rows."""
    values = [slot_values(template, r) for r in test]
    teacher = [r[RESPONSE] for r in test]
    refs = [[t] for t in teacher]
    bare = [prompt_text(tokenizer, layout.bare(v)) for v in values]
    if new_predictions is None:
        new_predictions = run_condition(peft_model, tokenizer, bare, refs, max_new_tokens=max_new_tokens)["predictions"]
    new = _mean(new_predictions, teacher, options.metric)
    incumbent: float | None = None
    if options.incumbent_dir is not None:
        manifest = _manifest(options.incumbent_dir)
        inputs = bare if manifest.get("inference") != "full_prompt" else [
            prompt_text(tokenizer, layout.full_prompt(v)) for v in values]
        peft_model.load_adapter(str(options.incumbent_dir), adapter_name=INCUMBENT)
        try:
            peft_model.set_adapter(INCUMBENT)
            old = run_condition(peft_model, tokenizer, inputs, refs, max_new_tokens=max_new_tokens)["predictions"]
        finally:
            peft_model.set_adapter("default")
            peft_model.delete_adapter(INCUMBENT)
        incumbent = _mean(old, teacher, options.metric)
    passed, reason = decide(new, incumbent, options.min_agreement)
    return {"metric": options.metric, "rows": len(test), "agreement": round(new, 4),
            "incumbent": None if incumbent is None else {"version": options.incumbent_version,
                                                          "agreement": round(incumbent, 4)},
            "min_agreement": options.min_agreement, "passed": passed, "reason": reason}


def _mean(answers: Sequence[str], teacher: Sequence[str], metric: AgreementMetric) -> float:
    return sum(agreement(a, t, metric) for a, t in zip(answers, teacher, strict=True)) / max(1, len(teacher))


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / store.MANIFEST
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
