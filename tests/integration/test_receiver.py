"""The receiver's toolkit against real deliveries: handle each notification once (also when two
copies race), verify in a line or two on Starlette/FastAPI and WSGI, and catch up after an
outage through the reconciliation feed."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tests.integration.harness import (
    TOPIC,
    ReceiverFactory,
    Reply,
    Tidings,
    attempts_of,
    serve,
    side_database,
)
from tidings.api.app import create_app
from tidings.client import Client
from tidings.receiver import AsyncDeduplicator, Deduplicator, Handled, Verified
from tidings.receiver.adapters import WebhookMiddleware, starlette_endpoint, verified_webhook
from tidings.signing import generate_secret, webhook_headers

own = sa.MetaData()
# What the receiver's handler changes: one row per recharge it applied.
applied = sa.Table(
    "applied",
    own,
    sa.Column("recharge_id", sa.String(40), primary_key=True),
    sa.Column("amount", sa.Integer, nullable=False),
)


# the receiver's own database ---------------------------------------------------------------


@dataclass(frozen=True)
class ReceiverDb:
    """The receiver's database, by a sync and an async URL, on the service's backend."""

    url: str
    async_url: str

    def engine(self) -> sa.Engine:
        """A fresh synchronous engine; the caller disposes it."""
        return sa.create_engine(self.url)

    def async_engine(self) -> AsyncEngine:
        """A fresh async engine; the caller disposes it."""
        return create_async_engine(self.async_url)

    def applied(self) -> list[tuple[str, int]]:
        """The recharges the handler applied, by id."""
        engine = self.engine()
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.select(applied).order_by(applied.c.recharge_id))
                return [(row.recharge_id, row.amount) for row in rows]
        finally:
            engine.dispose()


@pytest.fixture
def own_db(database_url: str, tmp_path: Path) -> Iterator[ReceiverDb]:
    """A fresh receiver database with its `applied` table and the processed-ids table."""
    with side_database(database_url, tmp_path, "receiver") as (url, async_url):
        made = ReceiverDb(url, async_url)
        engine = made.engine()
        own.create_all(engine)
        Deduplicator(engine).create_table()
        engine.dispose()
        yield made


def apply_sync(conn: Connection, recharge_id: str, amount: int = 100) -> None:
    """The handler's effect, written on the deduplicator's connection."""
    conn.execute(applied.insert().values(recharge_id=recharge_id, amount=amount))


async def apply_async(conn: AsyncConnection, recharge_id: str, amount: int = 100) -> None:
    """The handler's effect, written on the deduplicator's connection."""
    await conn.execute(applied.insert().values(recharge_id=recharge_id, amount=amount))


# serving -----------------------------------------------------------------------------------


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""


@asynccontextmanager
async def serve_wsgi(app: Any) -> AsyncIterator[str]:
    """Serve a WSGI app with wsgiref on a free port of 127.0.0.1, in a thread."""
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


# deduplication -----------------------------------------------------------------------------


def test_a_handler_runs_once_per_notification_id_and_its_write_commits_with_the_record(
    own_db: ReceiverDb,
) -> None:
    engine = own_db.engine()
    dedup = Deduplicator(engine)
    calls: list[str] = []

    def handler(conn: Connection) -> str:
        calls.append("msg_1")
        apply_sync(conn, "r-1")
        return "applied"

    first = dedup.handle("msg_1", handler)
    second = dedup.handle("msg_1", handler)

    assert (first, second) == (Handled(ran=True, result="applied"), Handled(ran=False))
    assert calls == ["msg_1"]
    assert own_db.applied() == [("r-1", 100)]
    assert (dedup.processed("msg_1"), dedup.processed("msg_2")) == (True, False)
    engine.dispose()


def test_a_handler_that_raises_leaves_no_trace_so_the_redelivery_runs_it_again(
    own_db: ReceiverDb,
) -> None:
    engine = own_db.engine()
    dedup = Deduplicator(engine)
    attempts: list[int] = []

    def flaky(conn: Connection) -> None:
        attempts.append(len(attempts) + 1)
        apply_sync(conn, "r-1")
        if len(attempts) == 1:
            raise RuntimeError("the ledger service timed out")

    with pytest.raises(RuntimeError, match="ledger service timed out"):
        dedup.handle("msg_1", flaky)
    assert (own_db.applied(), dedup.processed("msg_1")) == ([], False)

    assert dedup.handle("msg_1", flaky) == Handled(ran=True, result=None)
    assert attempts == [1, 2]
    assert own_db.applied() == [("r-1", 100)]
    engine.dispose()


@pytest.mark.parametrize("first_fails", [False, True])
def test_two_threads_delivering_one_id_at_once_apply_it_exactly_once(
    own_db: ReceiverDb, first_fails: bool
) -> None:
    engine = own_db.engine()
    dedup = Deduplicator(engine)
    inside = threading.Event()
    calls: list[str] = []
    outcomes: dict[str, Handled[None] | BaseException] = {}

    def slow_first(conn: Connection) -> None:
        calls.append("first")
        apply_sync(conn, "r-1", 1)
        inside.set()
        time.sleep(0.3)  # the second copy arrives while this one holds the claim
        if first_fails:
            raise RuntimeError("first copy failed")

    def second(conn: Connection) -> None:
        calls.append("second")
        apply_sync(conn, "r-1", 2)

    def deliver(name: str, handler: Any) -> None:
        try:
            outcomes[name] = dedup.handle("msg_1", handler)
        except RuntimeError as exc:
            outcomes[name] = exc

    first_thread = threading.Thread(target=deliver, args=("first", slow_first))
    first_thread.start()
    assert inside.wait(5)
    second_thread = threading.Thread(target=deliver, args=("second", second))
    second_thread.start()
    first_thread.join(10)
    second_thread.join(10)

    if first_fails:
        assert isinstance(outcomes["first"], RuntimeError)
        assert outcomes["second"] == Handled(ran=True, result=None)
        assert calls == ["first", "second"]
        assert own_db.applied() == [("r-1", 2)]
    else:
        assert outcomes == {"first": Handled(ran=True), "second": Handled(ran=False)}
        assert calls == ["first"]
        assert own_db.applied() == [("r-1", 1)]
    engine.dispose()


async def test_two_concurrent_async_deliveries_of_one_id_apply_it_exactly_once(
    own_db: ReceiverDb,
) -> None:
    engine = own_db.async_engine()
    dedup = AsyncDeduplicator(engine)
    inside = asyncio.Event()
    calls: list[int] = []

    async def handler(conn: AsyncConnection) -> int:
        calls.append(len(calls) + 1)
        await apply_async(conn, "r-1")
        inside.set()
        await asyncio.sleep(0.3)
        return len(calls)

    first = asyncio.create_task(dedup.handle("msg_1", handler))
    await inside.wait()
    second = asyncio.create_task(dedup.handle("msg_1", handler))
    outcomes = await asyncio.gather(first, second)

    assert list(outcomes) == [Handled(ran=True, result=1), Handled(ran=False)]
    assert calls == [1]
    assert own_db.applied() == [("r-1", 100)]
    assert await dedup.processed("msg_1")
    await engine.dispose()


# adapters against real deliveries ----------------------------------------------------------


def _recharge_of(message: Verified) -> tuple[str, int]:
    payload = message.json()
    return str(payload["recharge_id"]), int(payload["amount"])


async def test_a_starlette_endpoint_applies_a_delivery_once_though_tidings_retries_it(
    tidings: Tidings, own_db: ReceiverDb
) -> None:
    secret = generate_secret()
    engine = own_db.async_engine()
    calls: list[str] = []

    async def on_recharge(message: Verified, conn: AsyncConnection) -> None:
        calls.append(message.id)
        await apply_async(conn, *_recharge_of(message))

    endpoint = starlette_endpoint(on_recharge, secrets=[secret], dedup=AsyncDeduplicator(engine))
    app = FastAPI()
    app.add_route("/notify", endpoint, methods=["POST"])
    async with serve(app) as url:
        # The ack token does not match, so Tidings sees every attempt as failed: each retry
        # is a second copy of a notification the receiver has already applied.
        await tidings.add_endpoint(
            f"{url}/notify",
            secret=secret,
            success={"token": "OK"},
            retry_schedule=["100ms"],
            window="800ms",
        )
        sent = await tidings.send({"recharge_id": "r-1", "amount": 250})
        done = await tidings.wait_for_status(sent["id"], "exhausted")

        async with httpx.AsyncClient() as client:
            forged = await client.post(
                f"{url}/notify",
                content=b'{"recharge_id":"r-1","amount":1}',
                headers=webhook_headers([generate_secret()], sent["id"], int(time.time()), b"{}"),
            )

    attempts = attempts_of(done)
    assert len(attempts) >= 2
    assert [(a["status_code"], a["response"]) for a in attempts] == [(200, "success")] * len(
        attempts
    )
    assert calls == [sent["id"]]
    assert own_db.applied() == [("r-1", 250)]
    assert forged.status_code == 401
    assert forged.text.startswith("none of the 1 v1 signature(s) in webhook-signature matches")
    await engine.dispose()


async def test_a_starlette_endpoint_answers_the_success_token_tidings_can_be_told_to_expect(
    tidings: Tidings, own_db: ReceiverDb
) -> None:
    secret = generate_secret()
    engine = own_db.async_engine()

    async def on_recharge(message: Verified, conn: AsyncConnection) -> None:
        await apply_async(conn, *_recharge_of(message))

    app = FastAPI()
    app.add_route(
        "/notify",
        starlette_endpoint(on_recharge, secrets=secret, dedup=AsyncDeduplicator(engine)),
        methods=["POST"],
    )
    async with serve(app) as url:
        await tidings.add_endpoint(f"{url}/notify", secret=secret, success={"token": "success"})
        sent = await tidings.send({"recharge_id": "r-2", "amount": 10})
        done = await tidings.wait_for_status(sent["id"], "delivered")

    assert [a["status_code"] for a in attempts_of(done)] == [200]
    assert own_db.applied() == [("r-2", 10)]
    await engine.dispose()


# Module level, as in an application: FastAPI resolves the route's annotations here.
OLD_SECRET: Final = generate_secret()
NEW_SECRET: Final = generate_secret()
VerifiedDelivery = Annotated[
    Verified, Depends(verified_webhook([OLD_SECRET, NEW_SECRET], max_body_bytes=64))
]


async def test_a_fastapi_dependency_hands_the_route_a_verified_delivery_or_answers_401() -> None:
    old, new = OLD_SECRET, NEW_SECRET
    app = FastAPI()

    @app.post("/notify")
    async def notify(message: VerifiedDelivery) -> dict[str, Any]:
        return {"id": message.id, "payload": message.json()}

    body = b'{"recharge_id":"r-1"}'
    now = int(time.time())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as client:
        good = await client.post(
            "/notify", content=body, headers=webhook_headers([new], "msg_1", now, body)
        )
        stale = await client.post(
            "/notify", content=body, headers=webhook_headers([old], "msg_1", now - 301, body)
        )
        unsigned = await client.post("/notify", content=body)
        huge = await client.post(
            "/notify",
            content=b"x" * 65,
            headers=webhook_headers([new], "msg_1", now, b"x" * 65),
        )

    assert (good.status_code, good.json()) == (
        200,
        {"id": "msg_1", "payload": {"recharge_id": "r-1"}},
    )
    assert stale.status_code == 401
    # 301 s and the fraction of a second the request took.
    assert re.match(r"webhook-timestamp is 30[12]s old, more than", stale.json()["detail"])
    assert (unsigned.status_code, unsigned.json()["detail"]) == (
        401,
        "the webhook-id header is missing or empty; a Tidings delivery carries webhook-id, "
        "webhook-timestamp and webhook-signature",
    )
    assert (huge.status_code, huge.json()["detail"]) == (413, "body is 65 bytes; the limit is 64")


def _site(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The rest of the receiver's WSGI site."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the shop"]


async def test_a_wsgi_middleware_applies_a_delivery_once_and_leaves_other_paths_to_the_app(
    tidings: Tidings, own_db: ReceiverDb
) -> None:
    secret = generate_secret()
    engine = own_db.engine()
    calls: list[str] = []

    def on_recharge(message: Verified, conn: Connection) -> None:
        calls.append(message.id)
        apply_sync(conn, *_recharge_of(message))

    site = WebhookMiddleware(
        _site, "/notify", on_recharge, secrets=[secret], dedup=Deduplicator(engine)
    )
    async with serve_wsgi(site) as url:
        await tidings.add_endpoint(
            f"{url}/notify",
            secret=secret,
            success={"token": "OK"},
            retry_schedule=["100ms"],
            window="800ms",
        )
        sent = await tidings.send({"recharge_id": "r-3", "amount": 70})
        done = await tidings.wait_for_status(sent["id"], "exhausted")
        async with httpx.AsyncClient(base_url=url) as client:
            other = await client.get("/")
            wrong_method = await client.get("/notify")
            tampered = await client.post(
                "/notify",
                content=b'{"recharge_id":"r-3","amount":7000}',
                headers=webhook_headers(
                    [secret], sent["id"], int(time.time()), b'{"recharge_id":"r-3","amount":70}'
                ),
            )

    assert len(attempts_of(done)) >= 2
    assert {a["response"] for a in attempts_of(done)} == {"success"}
    assert calls == [sent["id"]]
    assert own_db.applied() == [("r-3", 70)]
    assert (other.status_code, other.text) == (200, "the shop")
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert tampered.status_code == 401
    assert tampered.text.startswith("none of the 1 v1 signature(s)")
    engine.dispose()


# reconciliation ----------------------------------------------------------------------------


async def test_a_receiver_down_for_a_whole_window_catches_up_through_the_feed_exactly_once(
    tidings: Tidings, own_db: ReceiverDb, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["100ms"], window="300ms")
    engine = own_db.engine()
    dedup = Deduplicator(engine)
    handled: list[str] = []

    def handle(notification_id: str, payload: dict[str, Any]) -> None:
        def apply(conn: Connection) -> None:
            handled.append(notification_id)
            apply_sync(conn, payload["recharge_id"], payload["amount"])

        dedup.handle(notification_id, apply)

    def catch_up(api_url: str, after: str | None) -> str | None:
        """What the receiver runs when it has heard nothing: every notification after its
        saved cursor, oldest first; returns the cursor to save."""
        with Client(api_url) as client:
            for cursor, item in client.feed(TOPIC, after=after, page_size=2):
                handle(item["id"], item["payload"])
                after = cursor
        return after

    async with serve(create_app(tidings.service, manage_lifecycle=False)) as api_url:
        # Up: two notifications arrive as webhooks; the receiver then notes where it is.
        before = [await tidings.send({"recharge_id": f"r-{n}", "amount": n}) for n in (1, 2)]
        for request in await rx.wait_for(2, "/hook"):
            handle(request.webhook_id, json.loads(request.body))
        saved = await asyncio.to_thread(catch_up, api_url, None)
        assert handled == [n["id"] for n in before]

        # Down for the whole window: every attempt of five notifications fails.
        rx.script("/hook", Reply(status=503))
        missed = [await tidings.send({"recharge_id": f"r-{n}", "amount": n}) for n in range(3, 8)]
        for notification in missed:
            await tidings.wait_for_status(notification["id"], "exhausted")

        # Back: the catch-up applies each missed one once, in creation order.
        saved = await asyncio.to_thread(catch_up, api_url, saved)
        assert handled == [n["id"] for n in before + missed]

        # Asking again, even from the very beginning, applies nothing twice.
        again = await asyncio.to_thread(catch_up, api_url, None)

    assert again == saved
    assert handled == [n["id"] for n in before + missed]
    assert own_db.applied() == [(f"r-{n}", n) for n in range(1, 8)]
    engine.dispose()
