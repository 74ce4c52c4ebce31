"""Each replica follows the registry's change log, so a change made through any replica is served by all.

Every registry write that changes what replicas serve (a prompt registered or deleted, a version added,
loaded, failed, rolled back) raises the registry's revision and logs the prompt it touched, in the same
transaction (`PromptRegistry._changed`). A follower reads the log above the revision it last applied every
`REGISTRY_POLL_SECONDS` (one indexed read of one row when nothing changed) and has the prompt service bring
those prompts' routing and engine adapters up to date. Polling works the same on SQLite and PostgreSQL;
with the default half second, a change is followed within about a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.registry.store import PromptRegistry
from gateway.tasks import stop_task

log = logging.getLogger(__name__)

ApplyChanges = Callable[[frozenset[str] | None], Awaitable[None]]
"""Bring these prompts (None: every prompt) in line with the registry."""


class RegistryFollower:
    def __init__(self, registry: PromptRegistry, apply: ApplyChanges, poll_seconds: float) -> None:
        self.registry = registry
        self._apply = apply
        self.poll_seconds = poll_seconds
        self.revision = 0  # the registry revision whose changes this replica has applied
        self._task: asyncio.Task[None] | None = None
        self._catching_up = asyncio.Lock()  # the loop and a local writer may both ask; one applies at a time

    async def mark_synced(self) -> None:
        """Take the registry's revision as applied: call it *before* a full sync, so that a change made during
        the sync is applied again after it (applying a change twice does no harm)."""
        self.revision = await asyncio.to_thread(self.registry.revision)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="registry-follower")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def catch_up(self) -> bool:
        """Apply what changed since the last call; True if anything had. A writer of this replica that wants its
        change served here at once (not at the next poll) calls it too."""
        async with self._catching_up:
            changes = await asyncio.to_thread(self.registry.changes_since, self.revision)
            if changes.revision == self.revision:
                return False
            if changes.prompts is None:
                log.warning("registry change log no longer reaches revision %d: reloading every prompt",
                            self.revision)
            await self._apply(changes.prompts)
            self.revision = changes.revision
            return True

    async def _loop(self) -> None:
        while True:
            try:
                await self.catch_up()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database away for a moment: try again at the next tick
                log.exception("reading the registry's change log failed")
            await asyncio.sleep(self.poll_seconds)
