"""Recording a share of each prompt's `fallback` answers as training rows, off the serving path.

The serving path only offers an answer (a dict put on a bounded queue, no I/O); one background task writes
them to the registry in a thread. A full queue drops the row and a failed write only logs: recording never
delays or fails a response.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from gateway.prompts.routing import RoutablePrompt
from gateway.registry.store import PromptRegistry
from gateway.tasks import stop_task

log = logging.getLogger(__name__)
QUEUE_SIZE = 1000  # answers waiting to be written; beyond that, new ones are dropped (and logged)


@dataclass(frozen=True)
class RecordedAnswer:
    prompt: str
    tenant: str | None
    slots: dict[str, str]
    response: str
    model: str
    max_rows: int


class TrafficRecorder:
    def __init__(self, registry: PromptRegistry, routable: Callable[[str], RoutablePrompt | None],
                 queue_size: int = QUEUE_SIZE, draw: Callable[[], float] = random.random) -> None:
        self.registry = registry
        self._routable = routable
        self._draw = draw
        self._queue: asyncio.Queue[RecordedAnswer] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def offer(self, *, prompt: str, tenant: str | None, slots: dict[str, str] | None, text: str,
              finish: str | None, model: str, n: int | None = 1, tool_calls: bool = False) -> None:
        """Record this answer if its prompt records this share of its fallback answers and the answer is whole
        (finish `stop`), single (`n` = 1), plain text (no tool calls) and not empty (no training row). Never
        blocks, never raises."""
        if slots is None or not prompt or finish != "stop" or (n or 1) != 1 or tool_calls or not text.strip():
            return
        entry = self._routable(prompt)
        if entry is None or entry.record_rate <= 0 or entry.record_max_rows < 1:
            return
        if entry.record_rate < 1 and self._draw() >= entry.record_rate:
            return
        try:
            self._queue.put_nowait(RecordedAnswer(prompt, tenant, dict(slots), text, model, entry.record_max_rows))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("recording queue full: an answer of %s was not recorded (%d dropped)", prompt, self.dropped)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._write(), name="traffic-recorder")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _write(self) -> None:
        while True:
            answer = await self._queue.get()
            try:
                await asyncio.to_thread(self.registry.add_traffic, answer.prompt, answer.tenant, answer.slots,
                                        answer.response, answer.model, answer.max_rows)
            except Exception:
                log.exception("recording an answer of %s failed", answer.prompt)
            finally:
                self._queue.task_done()
