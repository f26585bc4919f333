"""A small client of the Tidings API for notifiers, receivers (reconciliation) and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from tidings.errors import NotFound, TidingsError


def _segment(value: str) -> str:
    """One path segment: an id can never climb to another route ('../keys')."""
    if not value:
        raise TidingsError("an id is required; it cannot be empty")
    return quote(value, safe="")


class ApiError(TidingsError):
    """The Tidings API refused the request."""

    code = "api_error"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.error_code = code


class Client:
    """Talks to one Tidings service over HTTP."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TidingsError(
                f"cannot reach Tidings at {self._http.base_url}: {exc}; is `tidings serve` "
                "running, and is TIDINGS_URL right?"
            ) from exc
        if response.status_code == 204:
            return None
        try:
            data = response.json()
        except ValueError:
            data = {"error": "bad_response", "message": response.text[:200]}
        if response.status_code >= 400:
            if response.status_code == 404:
                raise NotFound(data.get("message", "not found"))
            raise ApiError(
                response.status_code, data.get("error", "error"), data.get("message", "")
            )
        return data

    # notifier side ---------------------------------------------------------------------

    def send(
        self,
        topic: str,
        payload: Any = None,
        *,
        key: str | None = None,
        idempotency_key: str | None = None,
        raw: bytes | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        """Send a notification: JSON `payload`, or `raw` bytes with a content type."""
        body: dict[str, Any] = {"topic": topic}
        if raw is not None:
            import base64

            body["payload_base64"] = base64.b64encode(raw).decode("ascii")
            body["content_type"] = content_type or "application/octet-stream"
        else:
            body["payload"] = payload
        if key is not None:
            body["key"] = key
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        result: dict[str, Any] = self._call("POST", "/v1/notifications", json=body)
        return result

    # receiver side: reconciliation -----------------------------------------------------

    def get(self, notification_id: str) -> dict[str, Any]:
        """The authoritative record of one notification, with attempts."""
        result: dict[str, Any] = self._call("GET", f"/v1/notifications/{_segment(notification_id)}")
        return result

    def find(self, *, key: str, topic: str | None = None) -> list[dict[str, Any]]:
        """Every notification with this business key, oldest first."""
        return list(self._pages({"key": key, "topic": topic}))

    def page(self, **filters: Any) -> dict[str, Any]:
        """One page of notifications (topic, key, status, created_after, cursor, limit)."""
        params = {k: v for k, v in filters.items() if v is not None}
        result: dict[str, Any] = self._call("GET", "/v1/notifications", params=params)
        return result

    def feed(
        self, topic: str, after: str | None = None, *, page_size: int = 100
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every notification of `topic` after cursor `after`, oldest first, with the
        cursor to resume from after each one."""
        cursor = after
        while True:
            page = self.page(topic=topic, cursor=cursor, limit=page_size)
            items = page["items"]
            for item in items:
                yield item["cursor"], item
            if page["next_cursor"] is None:
                return
            cursor = page["next_cursor"]

    def _pages(self, filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            page = self.page(cursor=cursor, limit=500, **filters)
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def redeliver(self, notification_id: str) -> dict[str, Any]:
        """Ask for an immediate attempt of every undelivered delivery."""
        result: dict[str, Any] = self._call(
            "POST", f"/v1/notifications/{_segment(notification_id)}/redeliver"
        )
        return result

    # operator side ---------------------------------------------------------------------

    def add_endpoint(self, url: str, topics: list[str], **options: Any) -> dict[str, Any]:
        """Register an endpoint (secret, retry_schedule, window, success, timeout)."""
        body = {"url": url, "topics": topics, **{k: v for k, v in options.items() if v is not None}}
        result: dict[str, Any] = self._call("POST", "/v1/endpoints", json=body)
        return result

    def endpoints(self) -> list[dict[str, Any]]:
        """Every endpoint."""
        result: list[dict[str, Any]] = self._call("GET", "/v1/endpoints")["items"]
        return result

    def remove_endpoint(self, endpoint_id: str) -> None:
        """Remove an endpoint."""
        self._call("DELETE", f"/v1/endpoints/{_segment(endpoint_id)}")
