"""The embedded broker: an in-process signal; dispatchers find due work in the store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from tidings.brokers.base import Broker


class EmbeddedBroker(Broker):
    """Wakes the dispatcher of this process; needs no server.

    Another process (say `tidings api` beside `tidings dispatcher`) is not woken: its work
    is found by the dispatcher's poll of the store within one poll interval.
    """

    def __init__(self) -> None:
        self._due = asyncio.Event()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._due.set()

    async def publish_due(self, delivery_ids: Sequence[str]) -> None:
        if delivery_ids:
            self._due.set()

    async def publish_retry(self, delivery_id: str, due_at: float) -> None:
        return None  # the store poll finds it when it is due

    async def wait_due(self, timeout_s: float) -> list[str] | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._due.wait(), timeout_s)
        self._due.clear()
        return None
