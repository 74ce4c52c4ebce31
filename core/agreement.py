"""Agreement of two answers to one request, in [0, 1]: how the promotion gate and the shadow guard compare an
adapter's answer with the teacher's (the full prompt, on the upstream or the base model).

`exact` (the default): 1 when the two are equal after stripping and collapsing whitespace, else 0; right for
short, closed answers (a command, a label, a number). For long free-text answers, where two good answers rarely
match word for word, `chrf` (sentence chrF) or `bleu` (sentence BLEU, smoothed), divided by 100. A window's score
is the mean of its pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

AgreementMetric = Literal["exact", "chrf", "bleu"]
METRICS: tuple[AgreementMetric, ...] = ("exact", "chrf", "bleu")


def normalised(text: str) -> str:
    """The answer with surrounding whitespace stripped and inner runs of whitespace collapsed to one space."""
    return " ".join(text.split())


def agreement(answer: str, teacher: str, metric: AgreementMetric = "exact") -> float:
    """How far `answer` agrees with the teacher's answer to the same request, from 0 to 1."""
    a, t = normalised(answer), normalised(teacher)
    if metric == "exact":
        return 1.0 if a == t else 0.0
    if a == t:
        return 1.0  # two empty answers agree; sacrebleu scores an empty pair 0
    import sacrebleu

    if metric == "chrf":
        return float(sacrebleu.sentence_chrf(a, [t]).score) / 100.0
    if metric == "bleu":
        return float(sacrebleu.sentence_bleu(a, [t]).score) / 100.0
    raise ValueError(f"unknown agreement metric {metric!r}; one of {', '.join(METRICS)}")


def mean_agreement(answers: Sequence[str], teachers: Sequence[str], metric: AgreementMetric = "exact") -> float:
    """The mean agreement of paired answers (0 for none)."""
    if len(answers) != len(teachers):
        raise ValueError(f"{len(answers)} answers for {len(teachers)} teacher answers")
    if not answers:
        return 0.0
    return sum(agreement(a, t, metric) for a, t in zip(answers, teachers, strict=True)) / len(answers)
