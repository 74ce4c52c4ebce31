"""Counting the prompt tokens an app sent, with the base model's tokenizer.

A template's static part is tokenised once (at registration, or at the prompt's first match after a
start-up); a request then costs only the tokenisation of its slot values. The count can differ from
a full re-tokenisation by a token or two where a slot value merges with its neighbours (BPE), which
is fine for cost accounting.

The bare query an adapter is sent (one user message) is counted exactly, as the chat template renders it, without
rendering the template per request: the text around the message's content is rendered once and reused, when the
template is seen to put a user message's content in verbatim (checked with two probe contents) and reads no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.templates import PromptTemplate

# Probe contents for the chat template: leading and trailing blanks and newlines, so a template that trims or
# otherwise rewrites a message's content shows it and keeps being rendered per request.
PROBES = (" \n\u241fprobe-a\u241f\n ", "\t\u241eprobe-b\n\u241e  ")
# A template reading the clock (e.g. Llama 3's "Today Date") renders differently from day to day.
CLOCK = re.compile(r"strftime|now\(|datetime", re.IGNORECASE)


class TokenCounter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend, called directly on the request path: the same ids as `tokenizer(text)`
        # (which calls it too) without transformers' per-call wrapping, several times the cost of the encoding.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._user_frame: tuple[str, str] | bool | None = False  # False: not looked at yet; None: not verbatim

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
        """Tokens of `messages` as the chat template renders them, with the generation prompt."""
        if len(messages) == 1 and messages[0].keys() == {"role", "content"} and messages[0]["role"] == "user" \
                and isinstance(content := messages[0]["content"], str):
            frame = self.user_frame()
            if frame is not None:
                return self.count_text(frame[0] + content + frame[1])
        return self.count_text(self._render(messages))

    def _render(self, messages: list[dict[str, Any]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def user_frame(self) -> tuple[str, str] | None:
        """The rendered text before and after a lone user message's content, if the chat template puts the content
        in verbatim and reads no clock (found once); None otherwise."""
        if self._user_frame is False:
            self._user_frame = self._find_user_frame()
        return self._user_frame if isinstance(self._user_frame, tuple) else None

    def _find_user_frame(self) -> tuple[str, str] | None:
        source = getattr(self.tokenizer, "chat_template", None)
        if not isinstance(source, str) or CLOCK.search(source):
            return None
        frames = set()
        for probe in PROBES:
            try:
                text = self._render([{"role": "user", "content": probe}])
            except Exception:  # a template that refuses a plain user message: rendered per request, as before
                return None
            if text.count(probe) != 1:
                return None
            before, after = text.split(probe)
            frames.add((before, after))
        return frames.pop() if len(frames) == 1 else None

    def static_tokens(self, template: PromptTemplate) -> int:
        """Tokens of the full prompt with every slot left empty (chat template included)."""
        empty = {slot: "" for slot in template.slots}
        rendered = template.render(empty)
        if isinstance(rendered, str):
            return len(self.tokenizer(rendered)["input_ids"])
        return self.count_chat(rendered)

    def original_tokens(self, static_tokens: int, values: Mapping[str, str]) -> int:
        return static_tokens + sum(self.count_text(v) for v in values.values())


class UpstreamCalibration:
    """Per prompt, how the upstream's tokenizer counts the prompt against the gateway's, learnt from the `usage`
    the upstream billed for that prompt's relayed (fallback) requests, whose original tokens the gateway also
    counted. An adapter answer of an upstream model then counts as original what the upstream would have billed
    (the gateway's count times the prompt's ratio), not the gateway's own count. Kept per replica, in memory;
    bounded (the oldest prompt forgotten beyond `max_prompts`); before any observation the ratio is 1."""

    def __init__(self, max_prompts: int = 10_000) -> None:
        self.max_prompts = max_prompts
        self._sums: dict[str, tuple[int, int]] = {}  # prompt -> (billed, counted), over its relayed requests

    def observe(self, prompt: str, counted: int, billed: int) -> None:
        if not prompt or counted <= 0 or billed <= 0:
            return
        total_billed, total_counted = self._sums.pop(prompt, (0, 0))
        self._sums[prompt] = (total_billed + billed, total_counted + counted)  # re-inserted: the newest
        if len(self._sums) > self.max_prompts:
            del self._sums[next(iter(self._sums))]

    def ratio(self, prompt: str) -> float:
        billed, counted = self._sums.get(prompt, (0, 0))
        return billed / counted if counted else 1.0

    def scale(self, prompt: str, counted: int) -> int:
        """The upstream's count of a prompt the gateway counted `counted` tokens for."""
        return round(counted * self.ratio(prompt))
