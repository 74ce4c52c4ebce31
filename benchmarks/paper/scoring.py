"""A row's answer quality: the trainer's exact match and corpus BLEU, and BLEU's 95% interval from sacrebleu's
own bootstrap resampling (how much the choice of test rows moves the score)."""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU

BOOTSTRAP_SAMPLES = 1000  # sacrebleu's default for its paired bootstrap test


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-row reference lists as sacrebleu's reference streams (None where a row has fewer references),
    the layout `trainer.evaluate.score` scores with, so both give the same corpus BLEU."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def bootstrap_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                   samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """95% interval of corpus BLEU over test rows resampled with replacement, as sacrebleu reports it
    (`corpus_score(n_bootstrap=...)`: the resamples' mean ± half the width of their 2.5-97.5% range,
    seeded by SACREBLEU_SEED, default 12345, so a rerun gives the same interval)."""
    if len(predictions) < 2:
        raise ValueError("a bootstrap interval needs at least two test rows")
    score = BLEU().corpus_score(list(predictions), reference_streams(references),  # type: ignore[arg-type]
                                n_bootstrap=samples)
    # sacrebleu keeps the interval on the Score (what its `format()` prints as "μ = mean ± ci").
    mean, half_width = float(score._mean), float(score._ci)
    return mean - half_width, mean + half_width
