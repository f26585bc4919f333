"""The ASGI application: routes, error handling and the service's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from tidings import __version__
from tidings.api import endpoints, errors, keys, notifications
from tidings.api.errors import error_response
from tidings.service import Service

# Room for the JSON envelope and base64's third on top of the payload limit.
_ENVELOPE_FACTOR = 1.4
_ENVELOPE_SLACK_BYTES = 16 * 1024


def create_app(
    service: Service,
    *,
    manage_lifecycle: bool = True,
    on_started: Callable[[Service], Awaitable[None]] | None = None,
) -> FastAPI:
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

    app = FastAPI(
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

    @app.middleware("http")
    async def refuse_huge_bodies(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Refuse before reading: a declared length over the limit is never buffered.
        # Limitation: a chunked body without Content-Length is read whole before the
        # payload size is checked (and refused with 413 then).
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return error_response(
                413,
                "payload_too_large",
                f"request body is {declared} bytes; the payload maximum is "
                f"{service.settings.max_payload_bytes} bytes (TIDINGS_MAX_PAYLOAD_BYTES)",
            )
        return await call_next(request)

    @app.get("/healthz", tags=["operations"])
    async def health() -> dict[str, object]:
        """Liveness and delivery counts by status."""
        return {"status": "ok", "version": __version__, **await service.store.stats()}

    return app
