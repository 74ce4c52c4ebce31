"""An engine that answers at once, for `bench gateway` only: the gateway's own cost, with no model time to hide it.

It honours `gateway.engines.base.Engine`: adapters are loaded (their folder is read and checked as the embedded
engine checks it) and named in `loaded_adapters`, an unknown adapter is `AdapterNotLoaded`, and each answer is a
fixed short text streamed one token per delta, cut at `max_tokens` (finish `length`), then one `Usage` whose
counts are the base model's tokenizer's: the prompt as its chat template renders it (what vLLM counts), and the
answer's tokens. Counts are cached per distinct prompt, so after the first round a request costs microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from core.adapter_store import read_adapter_config
from gateway.engines.base import (
    AdapterNotLoaded,
    ContextLengthExceeded,
    EngineEvent,
    EngineRequest,
    EngineUnavailable,
    Finished,
    TextDelta,
    Usage,
)

ANSWER = "find src -name '*.py'"
MAX_CACHED_PROMPTS = 4096


class InstantEngine:
    """The `Engine` interface with no model behind it: a fixed answer, exact token counts."""

    name = "instant"

    def __init__(self, tokenizer: Any, *, answer: str = ANSWER, max_model_len: int = 8192,
                 max_lora_rank: int = 64) -> None:
        self._tokenizer = tokenizer
        self._max_len = max_model_len
        self._max_rank = max_lora_rank
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        # One delta per token, as an engine streams them (the pieces join into the answer exactly).
        self._pieces = [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
        self._pieces = [self._pieces[0]] + [b[len(a):] for a, b in zip(self._pieces, self._pieces[1:], strict=False)]
        self._adapters: dict[str, Path] = {}
        self._prompt_tokens: dict[tuple[object, ...], int] = {}
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False

    async def check_ready(self) -> None:
        if not self._started:
            raise EngineUnavailable("the instant engine is not started", code="engine_unavailable")

    @property
    def max_model_len(self) -> int:
        return self._max_len

    async def load_adapter(self, name: str, path: Path) -> None:
        await asyncio.to_thread(read_adapter_config, path, self._max_rank)  # refuses what the embedded engine refuses
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def loaded_adapters(self) -> set[str]:
        return set(self._adapters)

    def count_prompt(self, request: EngineRequest) -> int:
        """The request's prompt tokens as the base model's tokenizer counts them (cached per distinct prompt)."""
        if request.kind == "chat":
            messages = request.messages or []
            key: tuple[object, ...] = ("chat", *((m.get("role"), str(m.get("content"))) for m in messages))
        else:
            key = ("completion", request.prompt or "")
        count = self._prompt_tokens.get(key)
        if count is None:
            if request.kind == "chat":
                text = self._tokenizer.apply_chat_template(request.messages, tokenize=False,
                                                           add_generation_prompt=True)
                count = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                count = len(self._tokenizer(request.prompt or "")["input_ids"])
            if len(self._prompt_tokens) >= MAX_CACHED_PROMPTS:
                self._prompt_tokens.clear()
            self._prompt_tokens[key] = count
        return count

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterNotLoaded(f"the adapter '{request.adapter}' is not loaded", code="adapter_not_loaded")
        prompt_tokens = self.count_prompt(request)
        if prompt_tokens >= self._max_len:
            raise ContextLengthExceeded(f"the prompt has {prompt_tokens} tokens; the context holds {self._max_len}")
        limit = request.params.max_tokens
        pieces = self._pieces if limit is None else self._pieces[:limit]
        finish = "length" if len(pieces) < len(self._pieces) else "stop"
        for index in range(request.params.n):
            for piece in pieces:
                yield TextDelta(index, piece)
            yield Finished(index, finish)
        yield Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces) * request.params.n)
