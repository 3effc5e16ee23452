"""A log source (FileTail, JournalTail) running on the test's own event loop, for the source tests."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Self

from relayguard.source import Chunk


class Running:
    """Async context that runs `self.source.run(queue)` and hands each chunk it emits to `collect`."""

    source: Any
    queue: asyncio.Queue[Chunk]

    async def __aenter__(self) -> Self:
        self.task = asyncio.create_task(self.source.run(self.queue))
        self.collector = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in (self.task, self.collector):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _collect(self) -> None:
        while True:
            self.collect(await self.queue.get())

    def collect(self, chunk: Chunk) -> None:
        raise NotImplementedError
