"""Counting the prompt tokens an app sent, with the base model's tokenizer.

A template's static part is tokenised once (at registration, or at the prompt's first match after a
start-up); a request then costs only the tokenisation of its slot values. The count can differ from
a full re-tokenisation by a token or two where a slot value merges with its neighbours (BPE), which
is fine for cost accounting.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.templates import PromptTemplate


class TokenCounter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend, called directly on the request path: the same ids as `tokenizer(text)`
        # (which calls it too) without transformers' per-call wrapping, several times the cost of the encoding.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TokenCounter:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir))

    def count_text(self, text: str) -> int:
        backend = self._backend
        # transformers' call turns truncation and padding off and sets `encode_special_tokens` from
        # `split_special_tokens` before encoding; when the backend is already so, calling it directly is the same.
        if (backend is not None and backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))):
            return len(backend.encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.count_text(text)

    def static_tokens(self, template: PromptTemplate) -> int:
        """Tokens of the full prompt with every slot left empty (chat template included)."""
        empty = {slot: "" for slot in template.slots}
        rendered = template.render(empty)
        if isinstance(rendered, str):
            return len(self.tokenizer(rendered)["input_ids"])
        return self.count_chat(rendered)

    def original_tokens(self, static_tokens: int, values: Mapping[str, str]) -> int:
        return static_tokens + sum(self.count_text(v) for v in values.values())
