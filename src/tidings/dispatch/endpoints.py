"""A short-lived cache of endpoints, so a busy dispatcher does not read one per attempt."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from tidings.clock import Clock
from tidings.errors import NotFound
from tidings.models import Endpoint
from tidings.stores.base import Store


class EndpointCache:
    """Endpoints by id, re-read from the store after `ttl_s`, with the configured jitter."""

    def __init__(
        self, store: Store, clock: Clock, ttl_s: float = 2.0, jitter: float | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl_s = ttl_s
        self._jitter = jitter
        self._entries: dict[str, tuple[float, Endpoint | None]] = {}
        self._loading: dict[str, asyncio.Future[Endpoint | None]] = {}

    async def get(self, endpoint_id: str) -> Endpoint | None:
        """The endpoint, or None when it was removed."""
        now = self._clock.now()
        cached = self._entries.get(endpoint_id)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        loading = self._loading.get(endpoint_id)
        if loading is not None:
            return await asyncio.shield(loading)  # one read serves every waiting attempt
        loading = self._loading[endpoint_id] = asyncio.ensure_future(self._load(endpoint_id))
        try:
            return await asyncio.shield(loading)
        finally:
            self._loading.pop(endpoint_id, None)

    async def _load(self, endpoint_id: str) -> Endpoint | None:
        now = self._clock.now()
        try:
            endpoint: Endpoint | None = await self._store.get_endpoint(endpoint_id)
        except NotFound:
            endpoint = None
        if endpoint is not None and self._jitter is not None:
            # The store keeps the ladder and window, not the jitter (TIDINGS_JITTER).
            endpoint = replace(endpoint, schedule=replace(endpoint.schedule, jitter=self._jitter))
        self._entries[endpoint_id] = (now, endpoint)
        return endpoint

    def loading(self) -> list[asyncio.Future[Endpoint | None]]:
        """The reads in progress (a shutdown waits for them)."""
        return list(self._loading.values())

    def forget(self, endpoint_id: str) -> None:
        """Drop a cached endpoint after it changed."""
        self._entries.pop(endpoint_id, None)
