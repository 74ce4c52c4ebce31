"""Self-information compression: the keep ratio is respected, the most informative tokens survive in
order, results are deterministic and cached."""

from __future__ import annotations

from typing import Any

import pytest

from tests.trainer_fixtures import INSTRUCTIONS, smollm_dir, tiny_lm, tiny_tokenizer, trainer_tiny_model
from trainer.compress import SelfInformationCompressor

__all__ = ["smollm_dir", "tiny_lm", "tiny_tokenizer", "trainer_tiny_model"]
TEXT = INSTRUCTIONS + " When a request is ambiguous, choose the most common reading and say nothing about it."


def _is_subsequence(small: list[int], big: list[int]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


@pytest.mark.parametrize("ratio", [0.6, 0.3, 0.1])
def test_keep_ratio_is_respected(ratio: float, tiny_lm: Any, tiny_tokenizer: Any) -> None:
    compressor = SelfInformationCompressor(tiny_lm, tiny_tokenizer)
    result = compressor.compress(TEXT, ratio)
    ids, _ = compressor.information(TEXT)
    assert result.total_tokens == len(ids)
    assert result.kept_tokens == max(1, round(ratio * len(ids)))
    retokenized = tiny_tokenizer(result.text, add_special_tokens=False)["input_ids"]
    assert len(retokenized) <= result.kept_tokens + 2
    assert len(retokenized) >= 0.8 * result.kept_tokens


def test_the_most_informative_tokens_are_kept_in_order(tiny_lm: Any, tiny_tokenizer: Any) -> None:
    compressor = SelfInformationCompressor(tiny_lm, tiny_tokenizer)
    ids, info = compressor.information(TEXT)
    keep = round(0.3 * len(ids))
    threshold = sorted(info, reverse=True)[keep - 1]
    expected = [t for t, s in zip(ids, info, strict=True) if s >= threshold][:keep]
    text = compressor(TEXT, 0.3)
    assert text == tiny_tokenizer.decode(expected, clean_up_tokenization_spaces=False)
    assert _is_subsequence(expected, ids)


def test_deterministic_and_cached(tiny_lm: Any, tiny_tokenizer: Any) -> None:
    a = SelfInformationCompressor(tiny_lm, tiny_tokenizer)
    b = SelfInformationCompressor(tiny_lm, tiny_tokenizer)
    assert a.compress(TEXT, 0.5) == b.compress(TEXT, 0.5)
    assert a.compress(TEXT, 0.5) is a.compress(TEXT, 0.5)
    assert a(TEXT, 1.0) == TEXT


def test_bad_ratio(tiny_lm: Any, tiny_tokenizer: Any) -> None:
    compressor = SelfInformationCompressor(tiny_lm, tiny_tokenizer)
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            compressor(TEXT, ratio)


def test_long_text_is_scored_in_windows(tiny_lm: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.compress as module

    monkeypatch.setattr(module, "WINDOW", 16)
    ids, info = SelfInformationCompressor(tiny_lm, tiny_tokenizer).information(TEXT)
    assert len(info) == len(ids) > 32
    assert all(x >= 0 for x in info)
