"""Verify and deduplicate deliveries in a line or two: Starlette/FastAPI and plain WSGI.

Both answer 200 with the body `success` once the handler ran (or had run before), which
counts as the acknowledgement under the default 2xx rule and under a `success` token rule.
A bad signature answers 401 and a body over the limit 413, so Tidings retries; a handler
that raises propagates to the framework, whose 500 makes Tidings retry too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from tidings.errors import SignatureError
from tidings.receiver.dedup import AsyncDeduplicator, Deduplicator
from tidings.receiver.verify import DEFAULT_TOLERANCE_S, Verified, verify

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
ACK_BODY = "success"

AsyncHandler = Callable[[Verified, AsyncConnection], Awaitable[object]]
"""A Starlette-side handler: the verified delivery and the connection to write with."""
SyncHandler = Callable[[Verified, Connection], object]
"""A WSGI-side handler: the verified delivery and the connection to write with."""


def _log_refused(reason: str, detail: str) -> None:
    log.warning("delivery refused: %s", detail, extra={"action": reason})


# Starlette / FastAPI ------------------------------------------------------------------


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise HTTPException(413, f"body is {declared} bytes; the limit is {max_body_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise HTTPException(413, f"body is over the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def verified_webhook(
    secrets: str | Iterable[str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Callable[[Request], Awaitable[Verified]]:
    """A FastAPI dependency that returns the verified delivery, or answers 401 / 413.

    `Annotated[Verified, Depends(verified_webhook(secret))]` in a route's parameters.
    """
    keys = [secrets] if isinstance(secrets, str) else list(secrets)

    async def dependency(request: Request) -> Verified:
        body = await _read_body(request, max_body_bytes)
        try:
            return verify(body, request.headers, keys, tolerance_s)
        except SignatureError as exc:
            _log_refused("signature_refused", str(exc))
            raise HTTPException(401, str(exc)) from exc

    return dependency


def starlette_endpoint(
    handler: AsyncHandler,
    *,
    secrets: str | Iterable[str],
    dedup: AsyncDeduplicator,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ack_body: str = ACK_BODY,
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette/FastAPI endpoint that verifies each delivery and runs `handler` at most
    once per notification id: `app.add_route(path, starlette_endpoint(...), ["POST"])`."""
    check = verified_webhook(secrets, tolerance_s=tolerance_s, max_body_bytes=max_body_bytes)

    async def endpoint(request: Request) -> Response:
        try:
            message = await check(request)
        except HTTPException as exc:
            return PlainTextResponse(exc.detail, status_code=exc.status_code)

        async def run(conn: AsyncConnection) -> object:
            return await handler(message, conn)

        await dedup.handle(message.id, run)
        return PlainTextResponse(ack_body)

    return endpoint


# WSGI -----------------------------------------------------------------------------------


def _wsgi_headers(environ: WSGIEnvironment) -> dict[str, str]:
    return {
        name[5:].replace("_", "-").lower(): str(value)
        for name, value in environ.items()
        if name.startswith("HTTP_")
    }


def _plain(
    start_response: StartResponse, status: str, text: str, extra: tuple[tuple[str, str], ...] = ()
) -> list[bytes]:
    body = text.encode("utf-8")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *extra,
    ]
    start_response(status, headers)
    return [body]


def wsgi_endpoint(
    handler: SyncHandler,
    *,
    secrets: str | Iterable[str],
    dedup: Deduplicator,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ack_body: str = ACK_BODY,
) -> WSGIApplication:
    """A WSGI application that verifies each POST and runs `handler` at most once per
    notification id; mount it, or wrap an app with `WebhookMiddleware`."""
    keys = [secrets] if isinstance(secrets, str) else list(secrets)

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return _plain(
                start_response, "405 Method Not Allowed", "POST only", (("Allow", "POST"),)
            )
        declared = str(environ.get("CONTENT_LENGTH") or "")
        if not declared.isdigit():
            # Without a length a WSGI server may block on reading past the body.
            return _plain(start_response, "411 Length Required", "Content-Length is required")
        if int(declared) > max_body_bytes:
            limit = f"body is {declared} bytes; the limit is {max_body_bytes}"
            return _plain(start_response, "413 Payload Too Large", limit)
        body = environ["wsgi.input"].read(int(declared))
        try:
            message = verify(body, _wsgi_headers(environ), keys, tolerance_s)
        except SignatureError as exc:
            _log_refused("signature_refused", str(exc))
            return _plain(start_response, "401 Unauthorized", str(exc))
        dedup.handle(message.id, lambda conn: handler(message, conn))
        return _plain(start_response, "200 OK", ack_body)

    return application


class WebhookMiddleware:
    """WSGI middleware serving verified, deduplicated deliveries at `path`; every other
    request goes to the wrapped app. Flask: `app.wsgi_app = WebhookMiddleware(app.wsgi_app,
    "/notify", handler, secrets=..., dedup=...)`."""

    def __init__(
        self,
        app: WSGIApplication,
        path: str,
        handler: SyncHandler,
        *,
        secrets: str | Iterable[str],
        dedup: Deduplicator,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ack_body: str = ACK_BODY,
    ) -> None:
        self.app = app
        self.path = path
        self.endpoint = wsgi_endpoint(
            handler,
            secrets=secrets,
            dedup=dedup,
            tolerance_s=tolerance_s,
            max_body_bytes=max_body_bytes,
            ack_body=ack_body,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") == self.path:
            return self.endpoint(environ, start_response)
        return self.app(environ, start_response)
