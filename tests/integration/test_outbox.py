"""The transactional outbox: a notification exists exactly when the notifier's commit does, and
the relay takes it to Tidings once, in commit order per business key, whatever gets killed."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tests.integration.harness import (
    TOPIC,
    ReceiverFactory,
    Tidings,
    TidingsFactory,
    closed_port,
    serve,
    side_database,
)
from tidings.api.app import create_app
from tidings.client import Client
from tidings.errors import ConfigurationError, InvalidInput, TidingsError
from tidings.outbox import (
    OUTBOX,
    RelayReport,
    create_all,
    downgrade_outbox,
    outbox_table,
    record,
    record_async,
    relay_once,
    upgrade_outbox,
)
from tidings.receiver import verify

ROOT: Final = Path(__file__).resolve().parents[2]

business = sa.MetaData()
recharges = sa.Table(
    "recharges",
    business,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("amount", sa.Integer, nullable=False),
)
# One row per business key; the UPDATE's row lock orders same-key transactions, and the
# value it returns tells the test in which order they committed.
commits = sa.Table(
    "commits",
    business,
    sa.Column("key", sa.String(40), primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
)


# the notifier's own database ---------------------------------------------------------------


@dataclass(frozen=True)
class Notifier:
    """The notifier's database: a sync URL (for Session, Connection and the relay) and an
    async one, on the same backend as the service's store."""

    url: str
    async_url: str

    def engine(self) -> sa.Engine:
        """A fresh synchronous engine; the caller disposes it."""
        return sa.create_engine(self.url)


@pytest.fixture
def notifier(database_url: str, tmp_path: Path) -> Iterator[Notifier]:
    """A fresh notifier database holding the business tables and the outbox."""
    with side_database(database_url, tmp_path, "notifier") as (url, async_url):
        made = Notifier(url, async_url)
        engine = made.engine()
        business.create_all(engine)
        create_all(engine)
        engine.dispose()
        yield made


def outbox_rows(notifier: Notifier, table: sa.Table = OUTBOX) -> list[sa.Row[Any]]:
    """Every outbox row, oldest first."""
    engine = notifier.engine()
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(table).order_by(table.c.seq)))
    finally:
        engine.dispose()


# the service over real HTTP ----------------------------------------------------------------


@pytest.fixture
async def api_url(tidings: Tidings) -> AsyncIterator[str]:
    """The service's API on a real port: the relay talks HTTP, also from subprocesses."""
    async with serve(create_app(tidings.service, manage_lifecycle=False)) as url:
        yield url


def _relay(source: str, api_url: str, table: sa.Table = OUTBOX) -> RelayReport:
    with Client(api_url) as client:
        return relay_once(source, client, table=table)


async def relay(notifier: Notifier, api_url: str, table: sa.Table = OUTBOX) -> RelayReport:
    """One relay run, in a thread: the service answers on this test's event loop."""
    return await asyncio.to_thread(_relay, notifier.url, api_url, table)


async def notifications(tidings: Tidings, topic: str = TOPIC) -> list[dict[str, Any]]:
    """Every notification of `topic` in the service, oldest first."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"topic": topic, "limit": 500}
    while True:
        response = await tidings.client.get("/v1/notifications", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found.extend(page["items"])
        if page["next_cursor"] is None:
            return found
        params["cursor"] = page["next_cursor"]


async def run_python(code: str, *args: str) -> tuple[int, str]:
    """Run `code` in a fresh interpreter; its exit code (-9 when SIGKILLed) and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


# recording: commit or roll back, whichever connection the notifier uses ---------------------

KINDS: Final = ["session", "connection", "async_session", "async_connection"]


async def record_with(kind: str, notifier: Notifier, recharge: str, *, commit: bool) -> str:
    """Write a recharge and its notification in one transaction of `kind`; commit or not."""
    payload = {"recharge_id": recharge, "amount": 100}
    row = {"id": recharge, "amount": 100}
    if kind in ("session", "connection"):
        engine = notifier.engine()
        try:
            if kind == "session":
                with Session(engine) as session:
                    session.execute(recharges.insert().values(row))
                    outbox_id = record(session, TOPIC, payload, key=recharge)
                    session.commit() if commit else session.rollback()
            else:
                with engine.connect() as conn:
                    conn.execute(recharges.insert().values(row))
                    outbox_id = record(conn, TOPIC, payload, key=recharge)
                    conn.commit() if commit else conn.rollback()
        finally:
            engine.dispose()
        return outbox_id
    async_engine = create_async_engine(notifier.async_url)
    try:
        if kind == "async_session":
            async with AsyncSession(async_engine) as session:
                await session.execute(recharges.insert().values(row))
                outbox_id = await record_async(session, TOPIC, payload, key=recharge)
                await (session.commit() if commit else session.rollback())
        else:
            async with async_engine.connect() as conn:
                await conn.execute(recharges.insert().values(row))
                outbox_id = await record_async(conn, TOPIC, payload, key=recharge)
                await (conn.commit() if commit else conn.rollback())
    finally:
        await async_engine.dispose()
    return outbox_id


@pytest.mark.parametrize("kind", KINDS)
async def test_a_rolled_back_recording_never_becomes_a_notification_and_a_committed_one_does(
    kind: str,
    notifier: Notifier,
    tidings: Tidings,
    api_url: str,
    receiver: ReceiverFactory,
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/hook"))

    await record_with(kind, notifier, "r-rolled-back", commit=False)

    assert outbox_rows(notifier) == []
    assert await relay(notifier, api_url) == RelayReport(relayed=0, rejected=0)
    assert await notifications(tidings) == []

    kept = await record_with(kind, notifier, "r-kept", commit=True)
    assert await relay(notifier, api_url) == RelayReport(relayed=1, rejected=0)

    [notification] = await notifications(tidings)
    assert notification["idempotency_key"] == kept
    assert (notification["key"], notification["payload"]) == (
        "r-kept",
        {"recharge_id": "r-kept", "amount": 100},
    )
    await tidings.wait_for_status(notification["id"], "delivered")
    await tidings.settle()
    [request] = rx.requests("/hook")
    assert request.body == b'{"recharge_id":"r-kept","amount":100}'
    assert request.webhook_id == notification["id"]
    [row] = outbox_rows(notifier)
    assert (row.id, row.notification_id, row.error) == (kept, notification["id"], None)
    assert row.relayed_at is not None


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_plain_psycopg_connection_records_inside_its_transaction(
    notifier: Notifier, tidings: Tidings, api_url: str
) -> None:
    dsn = notifier.url.replace("postgresql+psycopg://", "postgresql://")

    with psycopg.connect(dsn) as conn:
        with conn.transaction(force_rollback=True):
            record(conn, TOPIC, {"n": 1}, key="sync-rolled-back")
        with conn.transaction():
            kept_sync = record(conn, TOPIC, {"n": 2}, key="sync-kept")
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        async with aconn.transaction(force_rollback=True):
            await record_async(aconn, TOPIC, {"n": 3}, key="async-rolled-back")
        async with aconn.transaction():
            kept_async = await record_async(aconn, TOPIC, {"n": 4}, key="async-kept")

    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(ConfigurationError, match="autocommit mode and not inside"):
            record(conn, TOPIC, {"n": 5}, key="would-commit-alone")
        with conn.transaction():
            kept_autocommit = record(conn, TOPIC, {"n": 6}, key="autocommit-in-transaction")

    assert [row.id for row in outbox_rows(notifier)] == [kept_sync, kept_async, kept_autocommit]
    assert await relay(notifier, api_url) == RelayReport(relayed=3, rejected=0)
    found = await notifications(tidings)
    assert [(n["key"], n["payload"]) for n in found] == [
        ("sync-kept", {"n": 2}),
        ("async-kept", {"n": 4}),
        ("autocommit-in-transaction", {"n": 6}),
    ]


async def test_raw_bytes_keep_their_content_type_and_reach_the_receiver_byte_for_byte(
    notifier: Notifier, tidings: Tidings, api_url: str, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    endpoint = await tidings.add_endpoint(rx.url("/hook"))
    raw = b"<notify><id>r-9</id><amount>100</amount></notify>\xff"
    engine = notifier.engine()
    with engine.begin() as conn:
        record(conn, TOPIC, raw=raw, content_type="application/xml", key="r-9")
    engine.dispose()

    assert await relay(notifier, api_url) == RelayReport(relayed=1)

    [request] = await rx.wait_for(1, "/hook")
    assert request.body == raw
    assert request.headers["content-type"] == "application/xml"
    assert verify(request.body, request.headers, endpoint["secret"]).id == request.webhook_id


def test_recording_refuses_a_topic_or_key_the_service_would_refuse(notifier: Notifier) -> None:
    engine = notifier.engine()
    with engine.begin() as conn:
        with pytest.raises(InvalidInput, match="topic: a topic is 1 to 200 characters"):
            record(conn, "recharge succeeded", {})
        with pytest.raises(InvalidInput, match="key: must be 1 to 200 characters"):
            record(conn, TOPIC, {}, key="k" * 201)
        with pytest.raises(InvalidInput, match="give either payload or raw"):
            record(conn, TOPIC, {"a": 1}, raw=b"x")
        with pytest.raises(InvalidInput, match="payload: not JSON-serialisable"):
            record(conn, TOPIC, {"when": object()})
    engine.dispose()

    assert outbox_rows(notifier) == []


# the relay ---------------------------------------------------------------------------------


async def test_a_row_the_service_refuses_is_marked_with_the_error_and_the_next_row_still_goes(
    notifier: Notifier, tidings_factory: TidingsFactory
) -> None:
    small = await tidings_factory(max_payload_bytes=64)
    async with serve(create_app(small.service, manage_lifecycle=False)) as url:
        engine = notifier.engine()
        with engine.begin() as conn:
            too_big = record(conn, TOPIC, {"blob": "x" * 100}, key="k")
            fine = record(conn, TOPIC, {"blob": "x"}, key="k")
        engine.dispose()

        assert await relay(notifier, url) == RelayReport(relayed=1, rejected=1)

        rows = {row.id: row for row in outbox_rows(notifier)}
        assert rows[too_big].notification_id is None
        assert "HTTP 413 payload_too_large" in rows[too_big].error
        assert rows[fine].error is None
        [notification] = await notifications(small)
        assert notification["idempotency_key"] == fine
        assert notification["id"] == rows[fine].notification_id
        # Marked rows are done: the next run has nothing to do.
        assert await relay(notifier, url) == RelayReport()


async def test_an_unreachable_service_leaves_every_row_waiting_for_the_next_run(
    notifier: Notifier, tidings: Tidings, api_url: str
) -> None:
    engine = notifier.engine()
    with engine.begin() as conn:
        waiting = record(conn, TOPIC, {"n": 1})
    engine.dispose()

    with pytest.raises(TidingsError, match="cannot reach Tidings"):
        await asyncio.to_thread(_relay, notifier.url, f"http://127.0.0.1:{closed_port()}")

    [row] = outbox_rows(notifier)
    assert (row.id, row.relayed_at) == (waiting, None)
    assert await relay(notifier, api_url) == RelayReport(relayed=1)
    assert [n["idempotency_key"] for n in await notifications(tidings)] == [waiting]


async def test_an_alembic_migration_creates_a_custom_outbox_that_records_and_relays(
    notifier: Notifier, tidings: Tidings, api_url: str
) -> None:
    engine = notifier.engine()
    with engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        upgrade_outbox(name="payments_outbox")
    inspector = sa.inspect(engine)
    assert [c["name"] for c in inspector.get_columns("payments_outbox")] == [
        "seq",
        "id",
        "topic",
        "key",
        "content_type",
        "body",
        "created_at",
        "relayed_at",
        "notification_id",
        "error",
    ]
    indexes = inspector.get_indexes("payments_outbox")
    assert [i["name"] for i in indexes if not i.get("duplicates_constraint")] == [
        "ix_payments_outbox_pending"
    ]
    unique = inspector.get_unique_constraints("payments_outbox")
    assert [(u["name"], u["column_names"]) for u in unique] == [("uq_payments_outbox_id", ["id"])]
    table = outbox_table(name="payments_outbox")
    with engine.begin() as conn:
        outbox_id = record(conn, TOPIC, {"n": 1}, key="p-1", table=table)

    assert await relay(notifier, api_url, table) == RelayReport(relayed=1)
    assert [n["idempotency_key"] for n in await notifications(tidings)] == [outbox_id]

    with engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        downgrade_outbox(name="payments_outbox")
    assert not sa.inspect(engine).has_table("payments_outbox")
    engine.dispose()


async def test_the_relay_command_keeps_relaying_new_commits_until_sigterm(
    notifier: Notifier, tidings: Tidings, api_url: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from tidings.cli import main; main()",
        "relay",
        "--source",
        notifier.url,
        "--tidings-url",
        api_url,
        "--interval-s",
        "0.05",
        "--log-level",
        "warning",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        engine = notifier.engine()
        for n in range(3):
            with engine.begin() as conn:
                outbox_id = record(conn, TOPIC, {"n": n}, key="r-1")
            deadline = asyncio.get_running_loop().time() + 10
            while outbox_id not in [x["idempotency_key"] for x in await notifications(tidings)]:
                assert asyncio.get_running_loop().time() < deadline, f"row {n} not relayed"
                await asyncio.sleep(0.02)
        engine.dispose()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=10)

    assert (process.returncode, output.decode()) == (0, "")
    assert [n["payload"] for n in await notifications(tidings)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(row.relayed_at is not None for row in outbox_rows(notifier))


# crashes -----------------------------------------------------------------------------------

PRODUCER: Final = """
import os, signal, sys
import sqlalchemy as sa
from sqlalchemy.orm import Session
from tidings.outbox import record

engine = sa.create_engine(sys.argv[1])
recharges = sa.Table("recharges", sa.MetaData(), autoload_with=engine)
with Session(engine) as session:
    session.execute(recharges.insert().values(id="r-1", amount=100))
    record(session, "recharge.succeeded", {"recharge_id": "r-1", "amount": 100}, key="r-1")
    session.commit()
# Killed the instant the commit returns: no cleanup, no chance to send anything itself.
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_producer_killed_right_after_its_commit_still_gets_its_notification_delivered(
    notifier: Notifier, tidings: Tidings, api_url: str, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    endpoint = await tidings.add_endpoint(rx.url("/hook"))

    code, output = await run_python(PRODUCER, notifier.url)
    assert code == -signal.SIGKILL, output

    code, output = await run_python(
        "from tidings.cli import main; main()",
        "relay",
        "--source",
        notifier.url,
        "--tidings-url",
        api_url,
        "--once",
        "--log-level",
        "warning",
    )
    assert (code, output) == (0, "relayed 1 rows, rejected 0\n")

    [request] = await rx.wait_for(1, "/hook")
    assert request.body == b'{"recharge_id":"r-1","amount":100}'
    message = verify(request.body, request.headers, endpoint["secret"])
    await tidings.wait_for_status(message.id, "delivered")
    [row] = outbox_rows(notifier)
    assert row.notification_id == message.id
    await tidings.settle()
    assert len(rx.requests("/hook")) == 1


RELAY_KILLED_AFTER_SECOND_SEND: Final = """
import os, signal, sys
from tidings.client import Client
from tidings.outbox import relay_once

sent = []

def after_send(row, notification_id):
    sent.append(notification_id)
    print(row.id, notification_id, flush=True)
    if len(sent) == 2:
        # Tidings has the notification; the row is not marked yet.
        os.kill(os.getpid(), signal.SIGKILL)

relay_once(sys.argv[1], Client(sys.argv[2]), after_send=after_send)
"""


async def test_a_relay_killed_between_send_and_mark_creates_no_second_notification_on_rerun(
    notifier: Notifier, tidings: Tidings, api_url: str, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/hook"))
    engine = notifier.engine()
    with engine.begin() as conn:
        ids = [record(conn, TOPIC, {"n": n}, key=f"r-{n}") for n in range(3)]
    engine.dispose()

    code, output = await run_python(RELAY_KILLED_AFTER_SECOND_SEND, notifier.url, api_url)

    assert code == -signal.SIGKILL, output
    sent = [line.split(" ") for line in output.splitlines()]
    assert [outbox_id for outbox_id, _ in sent] == ids[:2]
    assert [row.relayed_at for row in outbox_rows(notifier)] == [None, None, None]
    before = await notifications(tidings)
    assert [(n["id"], n["idempotency_key"]) for n in before] == [tuple(reversed(s)) for s in sent]

    assert await relay(notifier, api_url) == RelayReport(relayed=3)

    after = await notifications(tidings)
    assert [n["idempotency_key"] for n in after] == ids
    assert [n["id"] for n in after[:2]] == [n["id"] for n in before]
    assert [row.notification_id for row in outbox_rows(notifier)] == [n["id"] for n in after]
    for notification in after:
        await tidings.wait_for_status(notification["id"], "delivered")
    await tidings.settle()
    assert sorted(r.webhook_id for r in rx.requests("/hook")) == sorted(n["id"] for n in after)


# order under concurrency -------------------------------------------------------------------

PRODUCERS: Final = 4
TRANSACTIONS: Final = 50
ROWS_PER_TRANSACTION: Final = 5
KEYS: Final = [f"acct-{n}" for n in range(5)]
LEDGER_TOPIC: Final = "ledger.moved"


def produce(url: str, producer: int, start: threading.Barrier) -> list[tuple[str, int, list[str]]]:
    """Commit TRANSACTIONS transactions of ROWS_PER_TRANSACTION rows on one key each;
    returns (key, commit number for that key, row tags) per transaction."""
    engine = sa.create_engine(url)
    done: list[tuple[str, int, list[str]]] = []
    start.wait()
    try:
        for t in range(TRANSACTIONS):
            key = KEYS[(producer * 3 + t) % len(KEYS)]
            tags = [f"p{producer}-t{t}-r{r}" for r in range(ROWS_PER_TRANSACTION)]
            with Session(engine) as session, session.begin():
                for tag in tags:
                    record(session, LEDGER_TOPIC, {"tag": tag}, key=key)
                # Recorded first, counted second: without the outbox's own ordering, a
                # transaction that recorded later could still count (commit) first.
                n = session.execute(
                    commits.update()
                    .where(commits.c.key == key)
                    .values(n=commits.c.n + 1)
                    .returning(commits.c.n)
                ).scalar_one()
            done.append((key, n, tags))
    finally:
        engine.dispose()
    return done


async def test_a_thousand_rows_from_four_concurrent_producers_arrive_once_in_commit_order_per_key(
    notifier: Notifier, tidings: Tidings, api_url: str
) -> None:
    engine = notifier.engine()
    with engine.begin() as conn:
        conn.execute(commits.insert(), [{"key": key, "n": 0} for key in KEYS])
    engine.dispose()
    start = threading.Barrier(PRODUCERS + 1)
    stop = threading.Event()

    def relay_meanwhile() -> int:
        start.wait()
        relayed = 0
        engine = notifier.engine()
        with Client(api_url) as client:
            while not stop.wait(0.01):
                relayed += relay_once(engine, client, batch_size=37).relayed
        engine.dispose()
        return relayed

    relaying = asyncio.create_task(asyncio.to_thread(relay_meanwhile))
    produced = await asyncio.gather(
        *(asyncio.to_thread(produce, notifier.url, p, start) for p in range(PRODUCERS))
    )
    stop.set()
    relayed_meanwhile = await relaying
    relayed_after = (await relay(notifier, api_url)).relayed

    assert relayed_meanwhile + relayed_after == 1000
    found = await notifications(tidings, LEDGER_TOPIC)
    assert len(found) == 1000
    rows = outbox_rows(notifier)
    assert sorted(n["idempotency_key"] for n in found) == sorted(row.id for row in rows)
    assert all(row.notification_id is not None for row in rows)
    expected: dict[str, list[str]] = {key: [] for key in KEYS}
    for key, _, tags in sorted((t for p in produced for t in p), key=lambda t: (t[0], t[1])):
        expected[key].extend(tags)
    arrived: dict[str, list[str]] = {key: [] for key in KEYS}
    for notification in found:
        arrived[notification["key"]].append(notification["payload"]["tag"])
    assert arrived == expected
    assert sum(len(tags) for tags in expected.values()) == 1000
