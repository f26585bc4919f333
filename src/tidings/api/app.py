"""The ASGI application: routes, error handling and the service's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from tidings import __version__
from tidings.api import endpoints, errors, keys, notifications
from tidings.api.bodies import BodyTooLarge, declared_length, read_body, replay
from tidings.api.errors import error_response
from tidings.api.submit import SubmitDoor, opens
from tidings.errors import InvalidInput
from tidings.service import Service

_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
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
    """Refuse a request body over the limit: at once when its declared length is, else
    as soon as the bytes read pass it (a chunked body is read, up to the limit, here).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would cost a task group on
    every request, a large share of the API's time under load.
    """

    def __init__(self, app: ASGIApp, *, limit_bytes: int, payload_max_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.payload_max_bytes = payload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = declared_length(scope["headers"])
            try:
                if declared is not None and declared > self.limit_bytes:
                    raise BodyTooLarge(declared)
                if declared is None and scope["method"] in _WITH_BODY:
                    receive = replay(await read_body(receive, self.limit_bytes), receive)
            except BodyTooLarge as exc:
                message = exc.describe(self.limit_bytes, self.payload_max_bytes)
                await error_response(413, "payload_too_large", message)(scope, receive, send)
                return
            except InvalidInput:
                return  # the client went away mid-body: there is no one to answer
        await self.app(scope, receive, send)
