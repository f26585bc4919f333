"""What integration tests drive: scriptable HTTP receivers and a service behind its API."""

from __future__ import annotations

import asyncio
import secrets
import socket
import sqlite3
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import psycopg
import pytest
import uvicorn
from aiohttp import web
from psycopg import sql

from tidings.clock import FakeClock
from tidings.service import Service

TOPIC: Final = "recharge.succeeded"

# Fast and deterministic: a short poll so tests wait little, no jitter so a ladder step of
# "1s" is exactly one second, a short grace so teardown does not wait on hung receivers.
BASE_SETTINGS: Final[Mapping[str, Any]] = {
    "allow_private_networks": True,
    "auth_required": False,
    "poll_interval_s": 0.05,
    "lease_s": 20.0,
    "default_timeout_s": 5.0,
    "connect_timeout_s": 1.0,
    "jitter": 0.0,
    "shutdown_grace_s": 0.5,
}

# receivers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a status, body and headers, sent after `delay_s`."""

    status: int = 200
    body: bytes | str = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


RESET: Final = "reset"
"""A scripted answer that sends the headers and part of the body, then resets the connection."""

Behaviour = Reply | Literal["reset"]


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it; header names are lower-case."""

    path: str
    headers: dict[str, str]
    body: bytes
    arrived_at: float  # time.monotonic()

    @property
    def webhook_id(self) -> str:
        """The Standard Webhooks message id: the notification id."""
        return self.headers["webhook-id"]


class Receiver:
    """A real aiohttp server on 127.0.0.1 that answers each path as scripted."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.max_in_flight: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._scripts: dict[str, list[Behaviour]] = {}
        self._served: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Cancel a handler whose client went away, and do not wait long for hung ones.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and cut off whatever is still being answered."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str = "/hook") -> str:
        """The full URL of `path` on this receiver."""
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *behaviours: Behaviour) -> None:
        """Answer requests to `path` with `behaviours` in order; the last one then repeats.

        An unscripted path answers 200 with an empty body.
        """
        if not behaviours:
            raise ValueError("give at least one behaviour")
        self._scripts[path] = list(behaviours)
        self._served[path] = 0

    def requests(self, path: str | None = None) -> list[Received]:
        """Every request so far (to `path`, when given), in arrival order."""
        return [r for r in self.received if path is None or r.path == path]

    async def wait_for(
        self, count: int, path: str | None = None, *, timeout_s: float = 10.0
    ) -> list[Received]:
        """Wait until at least `count` requests (to `path`) have arrived."""
        deadline = time.monotonic() + timeout_s
        while len(self.requests(path)) < count:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"receiver got {len(self.requests(path))} requests to {path or 'any path'} "
                    f"in {timeout_s}s; expected {count}"
                )
            await asyncio.sleep(0.005)
        return self.requests(path)

    def _next(self, path: str) -> Behaviour:
        script = self._scripts.get(path) or [Reply()]
        index = min(self._served[path], len(script) - 1)
        self._served[path] += 1
        return script[index]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                path=request.path,
                headers={name.lower(): value for name, value in request.headers.items()},
                body=body,
                arrived_at=time.monotonic(),
            )
        )
        behaviour = self._next(request.path)
        self._in_flight[request.path] += 1
        self.max_in_flight[request.path] = max(
            self.max_in_flight[request.path], self._in_flight[request.path]
        )
        try:
            if behaviour == RESET:
                return await self._reset(request)
            assert isinstance(behaviour, Reply)
            if behaviour.delay_s:
                await asyncio.sleep(behaviour.delay_s)
            payload = behaviour.body.encode() if isinstance(behaviour.body, str) else behaviour.body
            return web.Response(
                status=behaviour.status, body=payload, headers=dict(behaviour.headers)
            )
        finally:
            self._in_flight[request.path] -= 1

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/plain", "Content-Length": "1000"}
        )
        await response.prepare(request)
        await response.write(b"partial")
        # Let the client read the head first, so the reset comes mid-response.
        await asyncio.sleep(0.2)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            # Linger 0: close() sends a TCP RST instead of an orderly FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return response


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# the service -------------------------------------------------------------------------------


def attempts_of(notification: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every attempt of a notification (as GET shows it), delivery by delivery."""
    found: list[dict[str, Any]] = []
    for delivery in notification["deliveries"]:
        found.extend(delivery.get("attempts") or [])
    return found


class Tidings:
    """A running service, and an HTTP client on its API."""

    def __init__(self, service: Service, client: httpx.AsyncClient) -> None:
        self.service = service
        self.client = client
        self._closed = False

    @property
    def clock(self) -> FakeClock:
        """The service's clock, when the test gave it a FakeClock."""
        if not isinstance(self.service.clock, FakeClock):
            raise TypeError("this test runs on the system clock; override the clock fixture")
        return self.service.clock

    async def close(self) -> None:
        """Stop the service and the client (once)."""
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()
        await self.service.stop()

    async def add_endpoint(
        self, url: str, *, topics: list[str] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Register an endpoint through the API; returns it with its secret."""
        body = {"url": url, "topics": topics or [TOPIC], **fields}
        response = await self.client.post("/v1/endpoints", json=body)
        assert response.status_code == 201, response.text
        endpoint: dict[str, Any] = response.json()
        return endpoint

    async def send(
        self, payload: Any = None, *, topic: str = TOPIC, **fields: Any
    ) -> dict[str, Any]:
        """Send a notification with a JSON payload through the API; expects 201."""
        response = await self.client.post(
            "/v1/notifications", json={"topic": topic, "payload": payload, **fields}
        )
        assert response.status_code == 201, response.text
        notification: dict[str, Any] = response.json()
        return notification

    async def get(self, notification_id: str) -> dict[str, Any]:
        """The notification with its deliveries and attempts, as GET shows it."""
        response = await self.client.get(f"/v1/notifications/{notification_id}")
        assert response.status_code == 200, response.text
        notification: dict[str, Any] = response.json()
        return notification

    async def wait_until(
        self,
        notification_id: str,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        *,
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """Poll GET until `done(notification)` holds; fail after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            notification = await self.get(notification_id)
            if done(notification):
                return notification
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{notification_id} did not reach {what} in {timeout_s}s: {notification}"
                )
            await asyncio.sleep(0.02)

    async def wait_for_status(
        self, notification_id: str, status: str, *, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Wait until the notification has `status`."""
        return await self.wait_until(
            notification_id,
            lambda n: n["status"] == status,
            f"status {status!r}",
            timeout_s=timeout_s,
        )

    async def wait_for_attempts(
        self, notification_id: str, count: int, *, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Wait until at least `count` attempts are recorded."""
        return await self.wait_until(
            notification_id,
            lambda n: len(attempts_of(n)) >= count,
            f"{count} attempts",
            timeout_s=timeout_s,
        )

    async def settle(self, seconds: float = 0.3) -> None:
        """Give the dispatcher a few poll intervals to do anything it (wrongly) would."""
        await asyncio.sleep(seconds)


ReceiverFactory = Callable[[], Awaitable[Receiver]]
"""Starts a receiver: the `receiver` fixture."""

TidingsFactory = Callable[..., Awaitable[Tidings]]
"""Starts a service with settings overridden by keyword: the `tidings_factory` fixture."""


# serving an ASGI app over real HTTP ----------------------------------------------------


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free port of 127.0.0.1, on this event loop."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every keep-alive answer waits ~40 ms on a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", log_level="warning", ws="none", http="h11")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# PostgreSQL administration for tests that need databases of their own -------------------

POSTGRES_ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_admin(statement: sql.Composed) -> None:
    """Run one statement (CREATE/DROP DATABASE) as the local superuser, outside a transaction."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(statement)


@contextmanager
def side_database(database_url: str, tmp_path: Path, name: str) -> Iterator[tuple[str, str]]:
    """A fresh database of a notifier's or receiver's own, on the backend of `database_url`.

    Yields its synchronous and asynchronous SQLAlchemy URLs; a PostgreSQL one is dropped
    afterwards.
    """
    if database_url.startswith("sqlite"):
        path = tmp_path / f"{name}.db"
        with sqlite3.connect(path) as conn:
            # Writers and readers at once (producers and a relay): readers must not block.
            conn.execute("PRAGMA journal_mode=WAL")
        yield f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
        return
    database = f"{name}_test_{secrets.token_hex(6)}"
    postgres_admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    try:
        yield url, url
    finally:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        postgres_admin(drop.format(sql.Identifier(database)))
