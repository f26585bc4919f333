"""The broker interface: carries the news that deliveries are due to dispatchers."""

from __future__ import annotations

import abc
from collections.abc import Sequence


class Broker(abc.ABC):
    """Tells dispatchers which deliveries are due; the store stays the source of truth.

    A broker may lose a message (a restart, a crash): dispatchers also poll the store,
    so a lost message delays a delivery by at most the poll interval, never loses it.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect."""

    @abc.abstractmethod
    async def publish_due(self, delivery_ids: Sequence[str]) -> None:
        """Announce deliveries that are due now."""

    @abc.abstractmethod
    async def publish_retry(self, delivery_id: str, due_at: float) -> None:
        """Announce a delivery that will be due at `due_at` (epoch seconds).

        May raise BrokerUnavailable: the retry is already in the store, so the caller
        logs it and moves on; the store poll finds the delivery when it is due.
        """

    @abc.abstractmethod
    async def wait_due(self, timeout_s: float) -> list[str] | None:
        """Wait up to `timeout_s` for due deliveries.

        Returns the announced ids, or None when the dispatcher should look in the store
        for whatever is due (on a timeout, or when the broker carries no ids).
        """
