"""Template compression by token self-information, as LLMLingua does it, with the base model itself.

A token's self-information is -log p(token | the text before it) under the base model: tokens the
model can predict carry little and are pruned first. `keep_ratio` is the fraction of tokens kept
(in their original order). The llmlingua package is not used: it downloads a tiktoken file when
built, which fails offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

WINDOW = 1024


@dataclass(frozen=True)
class Compressed:
    text: str
    kept_tokens: int
    total_tokens: int


class SelfInformationCompressor:
    """Prunes the least informative tokens of a text; results are cached per (text, keep_ratio)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        context = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.context_id: int = int(context if context is not None else 0)
        self._information: dict[str, tuple[list[int], list[float]]] = {}
        self._compressed: dict[tuple[str, float], Compressed] = {}

    def information(self, text: str) -> tuple[list[int], list[float]]:
        """Token ids of `text` and each one's self-information in nats."""
        if text not in self._information:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            info: list[float] = []
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                # Windows of WINDOW tokens, each conditioned on the context token and the window so far.
                for start in range(0, len(ids), WINDOW):
                    chunk = ids[start : start + WINDOW]
                    prev = [self.context_id] if start == 0 else [ids[start - 1]]
                    inputs = torch.tensor([prev + chunk])
                    logits = self.model(input_ids=inputs).logits[0, :-1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    picked = logp.gather(1, torch.tensor(chunk)[:, None])[:, 0]
                    info.extend((-picked).tolist())
            self.model.train(was_training)
            self._information[text] = (list(ids), info)
        return self._information[text]

    def compress(self, text: str, keep_ratio: float) -> Compressed:
        """`text` with round(keep_ratio * tokens) of its most informative tokens (at least one) kept."""
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
        key = (text, keep_ratio)
        if key in self._compressed:
            return self._compressed[key]
        ids, info = self.information(text)
        if keep_ratio >= 1.0 or not ids:
            result = Compressed(text, len(ids), len(ids))
        else:
            keep = max(1, round(keep_ratio * len(ids)))
            ranked = sorted(range(len(ids)), key=lambda i: (-info[i], i))[:keep]
            kept = [ids[i] for i in sorted(ranked)]
            decoded = self.tokenizer.decode(kept, clean_up_tokenization_spaces=False)
            result = Compressed(decoded, keep, len(ids))
        self._compressed[key] = result
        return result

    def __call__(self, text: str, keep_ratio: float) -> str:
        return self.compress(text, keep_ratio).text
