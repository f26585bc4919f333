"""The few Tidings API calls the operator's side of the demo makes, over asynchronous HTTP.

The recharge and account systems use the library's own `tidings.client.Client`, which is
synchronous: they call it from worker threads, because in this one-process demo Tidings
answers on the same event loop and a blocking call there would wait for an answer that can
never come.
"""

from __future__ import annotations

from typing import Any

import httpx

from tidings.client import ApiError
from tidings.errors import NotFound, TidingsError


class TidingsApi:
    """An asynchronous caller of one Tidings service."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def add_endpoint(self, url: str, topics: list[str], **options: Any) -> dict[str, Any]:
        """Register an endpoint; the answer carries its signing secret."""
        body = {"url": url, "topics": topics, **options}
        result: dict[str, Any] = await self._call("POST", "/v1/endpoints", json=body)
        return result

    async def list_topic(self, topic: str) -> list[dict[str, Any]]:
        """Every notification of `topic`, oldest first (without attempts)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {"topic": topic, "limit": "500", **({"cursor": cursor} if cursor else {})}
            page = await self._call("GET", "/v1/notifications", params=params)
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return items

    async def get(self, notification_id: str) -> dict[str, Any]:
        """One notification with its deliveries and every attempt."""
        result: dict[str, Any] = await self._call("GET", f"/v1/notifications/{notification_id}")
        return result

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TidingsError(f"cannot reach Tidings at {self.base_url}: {exc!r}") from exc
        data = response.json()
        if response.status_code == 404:
            raise NotFound(data.get("message", "not found"))
        if response.status_code >= 400:
            raise ApiError(
                response.status_code, data.get("error", "error"), data.get("message", "")
            )
        return data
