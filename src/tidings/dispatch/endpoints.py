"""A short-lived cache of endpoints, so a busy dispatcher does not read one per attempt."""

from __future__ import annotations

from tidings.clock import Clock
from tidings.errors import NotFound
from tidings.models import Endpoint
from tidings.stores.base import Store


class EndpointCache:
    """Endpoints by id, re-read from the store after `ttl_s`."""

    def __init__(self, store: Store, clock: Clock, ttl_s: float = 2.0) -> None:
        self._store = store
        self._clock = clock
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Endpoint | None]] = {}

    async def get(self, endpoint_id: str) -> Endpoint | None:
        """The endpoint, or None when it was removed."""
        now = self._clock.now()
        cached = self._entries.get(endpoint_id)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        try:
            endpoint: Endpoint | None = await self._store.get_endpoint(endpoint_id)
        except NotFound:
            endpoint = None
        self._entries[endpoint_id] = (now, endpoint)
        return endpoint

    def forget(self, endpoint_id: str) -> None:
        """Drop a cached endpoint after it changed."""
        self._entries.pop(endpoint_id, None)
