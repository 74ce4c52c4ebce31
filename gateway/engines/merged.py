"""Requests for a prompt served merged go to its merged engine; everything else (and those, whenever that engine
does not answer) to the main engine, where the prompt's LoRA adapter stays loaded.

A merged engine is a vLLM server whose one model is the base model with the prompt's adapter merged into its
weights, served under the adapter's own id (`<prompt>@v<N>`): a request keeps the id the router gave it, and only
the server it goes to changes, so switching a prompt between LoRA and merged, or a merged engine coming, going or
being replaced by a new version's, never shows to a client as an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from pathlib import Path

from core.config import Settings
from gateway.engines.base import Engine, EngineError, EngineEvent, EngineRequest, EngineUnavailable
from gateway.engines.vllm import VLLMEngine

log = logging.getLogger(__name__)


class MergedRoutes:
    """The main engine plus the merged engines this replica routes to (model id -> engine); an `Engine` itself."""

    def __init__(self, main: Engine, settings: Settings) -> None:
        self.main = main
        self.settings = settings
        self._merged: dict[str, VLLMEngine] = {}
        self._open: Counter[VLLMEngine] = Counter()  # requests reading from each merged engine
        self._retired: set[VLLMEngine] = set()  # no longer routed to: closed once its last request ends
        self.name = main.name

    # -- the merged routes ---------------------------------------------------------------------

    def routed(self) -> dict[str, str]:
        """Model id -> base URL of each merged engine routed to."""
        return {model_id: engine.base_url for model_id, engine in self._merged.items()}

    async def route(self, model_id: str, url: str) -> None:
        """Send requests for `model_id` to the merged engine at `url` (which serves that id) from now on."""
        current = self._merged.get(model_id)
        if current is not None and current.base_url == url.rstrip("/"):
            return
        engine = VLLMEngine(self.settings.model_copy(update={"vllm_url": url, "served_model_name": model_id}))
        await engine.start()
        self._merged[model_id] = engine
        if current is not None:
            await self._retire(current)
        log.info("%s is now answered by its merged engine at %s", model_id, url)

    async def unroute(self, model_id: str) -> None:
        """Back to the LoRA adapter for `model_id` (requests already sent to the merged engine finish there)."""
        engine = self._merged.pop(model_id, None)
        if engine is not None:
            log.info("%s is answered by its LoRA adapter again", model_id)
            await self._retire(engine)

    async def _retire(self, engine: VLLMEngine) -> None:
        """Close a merged engine's client now, or when the last request reading from it ends: closing it under a
        request would cut that answer off midway."""
        if self._open[engine]:
            self._retired.add(engine)
        else:
            await engine.close()

    # -- Engine --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.main.start()

    async def close(self) -> None:
        for model_id in list(self._merged):
            await self.unroute(model_id)
        for engine in list(self._retired):
            self._retired.discard(engine)
            await engine.close()
        await self.main.close()

    async def check_ready(self) -> None:
        await self.main.check_ready()

    @property
    def max_model_len(self) -> int:
        return self.main.max_model_len

    async def load_adapter(self, name: str, path: Path) -> None:
        await self.main.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.main.unload_adapter(name)

    def loaded_adapters(self) -> set[str]:
        return self.main.loaded_adapters()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        merged = self._merged.get(request.adapter) if request.adapter is not None else None
        if merged is None:
            stream = self.main.generate(request)
            try:
                async for event in stream:
                    yield event
            finally:
                await _close(stream)
            return
        self._open[merged] += 1
        answer = self._generate_merged(merged, request)
        try:
            async for event in answer:
                yield event
        finally:
            try:
                await answer.aclose()  # a client gone midway: its engine request ends now, not at garbage collection
            finally:
                self._open[merged] -= 1
                if not self._open[merged]:
                    del self._open[merged]
                    if merged in self._retired:
                        self._retired.discard(merged)
                        await merged.close()

    async def _generate_merged(self, merged: VLLMEngine, request: EngineRequest) -> AsyncGenerator[EngineEvent]:
        stream: AsyncIterator[EngineEvent] = merged.generate(replace(request, adapter=None))
        first: EngineEvent | None = None
        try:
            first = await anext(stream, None)
        except (EngineUnavailable, EngineError) as exc:
            # Down, restarting, replaced: the adapter still answers (an answer that had begun is not retried).
            log.warning("merged engine for %s failed before answering (%s); answering with the adapter",
                        request.adapter, exc.message)
            await _close(stream)
            stream = self.main.generate(request)
            first = await anext(stream, None)
        try:
            if first is not None:
                yield first
            async for event in stream:
                yield event
        finally:
            await _close(stream)


async def _close(stream: AsyncIterator[EngineEvent]) -> None:
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()
