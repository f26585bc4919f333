"""The ASGI application: routes, error handling and the service's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from tidings import __version__
from tidings.api import endpoints, errors, keys, notifications
from tidings.api.errors import error_response
from tidings.api.submit import SubmitDoor, opens
from tidings.service import Service

# Room for the JSON envelope and base64's third on top of the payload limit.
_ENVELOPE_FACTOR = 1.4
_ENVELOPE_SLACK_BYTES = 16 * 1024


class TidingsApi(FastAPI):
    """FastAPI, but a send goes straight to its door and never enters the framework's stack."""

    door: SubmitDoor | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.door is not None and opens(scope):
            await self.door(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(
    service: Service,
    *,
    manage_lifecycle: bool = True,
    on_started: Callable[[Service], Awaitable[None]] | None = None,
) -> TidingsApi:
    """The API over `service`; with `manage_lifecycle` it starts and stops the service."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await service.start()
        if on_started is not None:
            await on_started(service)
        try:
            yield
        finally:
            if manage_lifecycle:
                await service.stop()

    app = TidingsApi(
        title="Tidings",
        version=__version__,
        summary="Best-effort notification: deliveries, retries on a ladder, reconciliation.",
        lifespan=lifespan,
    )
    app.state.service = service
    errors.install(app)
    app.include_router(endpoints.router)
    app.include_router(notifications.router)
    app.include_router(keys.router)
    limit = int(service.settings.max_payload_bytes * _ENVELOPE_FACTOR) + _ENVELOPE_SLACK_BYTES
    app.add_middleware(
        BodyLimit, limit_bytes=limit, payload_max_bytes=service.settings.max_payload_bytes
    )
    app.door = SubmitDoor(
        service, limit_bytes=limit, payload_max_bytes=service.settings.max_payload_bytes
    )

    @app.get("/healthz", tags=["operations"])
    async def health() -> dict[str, object]:
        """Liveness and delivery counts by status."""
        return {"status": "ok", "version": __version__, **await service.store.stats()}

    return app


class BodyLimit:
    """Refuse a request whose declared length is over the limit, before reading it.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would cost a task group on
    every request, a large share of the API's time under load.
    """

    def __init__(self, app: ASGIApp, *, limit_bytes: int, payload_max_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.payload_max_bytes = payload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Limitation: a chunked body without Content-Length is read whole before the
            # payload size is checked (and refused with 413 then).
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self.limit_bytes:
                    response = error_response(
                        413,
                        "payload_too_large",
                        f"request body is {value.decode()} bytes; the payload maximum is "
                        f"{self.payload_max_bytes} bytes (TIDINGS_MAX_PAYLOAD_BYTES)",
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
