"""Requests in flight per adapter, so a version switch can drain the old version before unloading it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator

from gateway.engines.base import EngineEvent


class AdapterUse:
    """Counts the open generations of each adapter; `drain` waits until an adapter has none.

    Everything runs on the event loop, so plain counters need no lock.
    """

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._idle: dict[str, asyncio.Event] = {}

    def count(self, adapter: str) -> int:
        return self._open[adapter]

    async def track(self, adapter: str | None, stream: AsyncIterator[EngineEvent]) -> AsyncGenerator[EngineEvent]:
        """`stream`, counted from its first read until it ends or is closed (closing this closes `stream`)."""
        if adapter is None:
            async for event in stream:
                yield event
            return
        self._open[adapter] += 1
        self._idle.setdefault(adapter, asyncio.Event()).clear()
        try:
            async for event in stream:
                yield event
        finally:
            try:
                if isinstance(stream, AsyncGenerator):
                    await stream.aclose()  # the engine frees the request's slot now, not at garbage collection
            finally:
                self._open[adapter] -= 1
                if self._open[adapter] <= 0:
                    del self._open[adapter]
                    self._idle.pop(adapter, asyncio.Event()).set()

    async def drain(self, adapter: str, timeout: float) -> bool:
        """Wait until `adapter` has no request in flight, at most `timeout` s; True if it drained."""
        if not self._open[adapter]:
            return True
        idle = self._idle.setdefault(adapter, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle.wait(), timeout)
        return not self._open[adapter]
