"""The relay: moves committed outbox rows to Tidings, oldest first, and marks them relayed.

Each row is sent with its outbox id as the idempotency key, so a relay that dies after
Tidings accepted a row but before marking it sends the row again on its next run and Tidings
answers with the notification it already has: never a second one. Rows are sent one at a
time in `seq` order and a batch stops at the first failure, so a row is never created in
Tidings before an earlier row of the same business key.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from tidings.client import ApiError, Client
from tidings.errors import NotFound, TidingsError
from tidings.outbox.table import DEFAULT_TABLE_NAME, OUTBOX, outbox_table

log = logging.getLogger(__name__)

# Answers that condemn the row itself (bad topic, too large): sending it again cannot help.
_REJECTING_STATUSES = frozenset({400, 413, 422})
_ERROR_CHARS = 1000


@dataclass(frozen=True)
class OutboxRow:
    """One committed notification waiting in the outbox."""

    seq: int
    id: str
    topic: str
    key: str | None
    content_type: str
    body: bytes


@dataclass(frozen=True)
class RelayReport:
    """What one relay run did: rows now in Tidings, and rows Tidings refused for good."""

    relayed: int = 0
    rejected: int = 0

    def __add__(self, other: RelayReport) -> RelayReport:
        return RelayReport(self.relayed + other.relayed, self.rejected + other.rejected)


SentHook = Callable[[OutboxRow, str], None]
"""Called with a row and its notification id after Tidings accepted it, before marking."""


@dataclass
class _Done:
    seq: int
    notification_id: str | None
    error: str | None


def source_engine(url: str) -> Engine:
    """A synchronous engine on the notifier's database; plain `postgresql://` means psycopg."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    url = url.replace("sqlite+aiosqlite:", "sqlite:", 1).replace("+asyncpg", "+psycopg", 1)
    return sa.create_engine(url)


def _pending(engine: Engine, table: sa.Table, limit: int) -> list[OutboxRow]:
    c = table.c
    select = (
        sa.select(c.seq, c.id, c.topic, c.key, c.content_type, c.body)
        .where(c.relayed_at.is_(None))
        .order_by(c.seq)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [
            OutboxRow(r.seq, r.id, r.topic, r.key, r.content_type, bytes(r.body))
            for r in conn.execute(select)
        ]


def _mark(engine: Engine, table: sa.Table, done: list[_Done]) -> None:
    if not done:
        return
    statement = (
        table.update()
        .where(table.c.seq == sa.bindparam("b_seq"))
        .values(
            relayed_at=sa.bindparam("b_relayed_at"),
            notification_id=sa.bindparam("b_notification_id"),
            error=sa.bindparam("b_error"),
        )
    )
    now = time.time()
    params = [
        {
            "b_seq": d.seq,
            "b_relayed_at": now,
            "b_notification_id": d.notification_id,
            "b_error": d.error,
        }
        for d in done
    ]
    with engine.begin() as conn:
        conn.execute(statement, params)


# Limitation: one request per row, one row at a time, so a relay moves roughly as many rows
# per second as the service accepts single sends (tens to hundreds); a backlog drains at
# that pace. Running two relays on one outbox is safe (the idempotency key) but no faster.
def _send(client: Client, row: OutboxRow) -> str:
    notification = client.send(
        row.topic,
        raw=row.body,
        content_type=row.content_type,
        key=row.key,
        idempotency_key=row.id,
    )
    return str(notification["id"])


def _relay_batch(
    engine: Engine,
    table: sa.Table,
    rows: list[OutboxRow],
    client: Client,
    after_send: SentHook | None,
) -> RelayReport:
    done: list[_Done] = []
    try:
        for row in rows:
            try:
                notification_id = _send(client, row)
            except ApiError as exc:
                if exc.status not in _REJECTING_STATUSES:
                    raise
                log.error(
                    "outbox row %s was refused by Tidings and will not be retried: %s",
                    row.id,
                    exc,
                    extra={"action": "outbox_rejected"},
                )
                done.append(_Done(row.seq, None, str(exc)[:_ERROR_CHARS]))
                continue
            if after_send is not None:
                after_send(row, notification_id)
            done.append(_Done(row.seq, notification_id, None))
    finally:
        # Whatever reached Tidings is marked even when a later row failed.
        _mark(engine, table, done)
    rejected = sum(1 for d in done if d.notification_id is None)
    return RelayReport(relayed=len(done) - rejected, rejected=rejected)


def relay_once(
    source: Engine | str,
    client: Client,
    *,
    table: sa.Table = OUTBOX,
    batch_size: int = 100,
    after_send: SentHook | None = None,
) -> RelayReport:
    """Relay every row committed and not yet relayed, oldest first, until none is left.

    Raises on the first row Tidings could not take now (unreachable, 5xx, 401); rows sent
    before it are marked, the rest wait for the next run.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    engine = source_engine(source) if isinstance(source, str) else source
    total = RelayReport()
    try:
        while True:
            rows = _pending(engine, table, batch_size)
            total += _relay_batch(engine, table, rows, client, after_send)
            if len(rows) < batch_size:
                break
    finally:
        if isinstance(source, str):
            engine.dispose()
    if total.relayed or total.rejected:
        log.info(
            "relayed %d outbox rows (%d rejected)",
            total.relayed,
            total.rejected,
            extra={"action": "outbox_relayed"},
        )
    return total


def _gives_up(exc: Exception) -> bool:
    """Whether an error needs an operator (wrong URL, bad key) rather than a retry."""
    if isinstance(exc, NotFound):
        return True
    return isinstance(exc, ApiError) and exc.status in (401, 403)


def run_relay(
    source: Engine | str,
    client: Client,
    *,
    table: sa.Table = OUTBOX,
    batch_size: int = 100,
    interval_s: float = 1.0,
    stop: threading.Event | None = None,
) -> None:
    """Relay until `stop` is set, looking for new rows every `interval_s` seconds.

    Tidings or the database being unreachable is logged and retried; a refused API key or
    a wrong URL stops the relay with the error.
    """
    stop = stop or threading.Event()
    engine = source_engine(source) if isinstance(source, str) else source
    log.info("relay started", extra={"action": "relay_started"})
    try:
        while not stop.is_set():
            try:
                relay_once(engine, client, table=table, batch_size=batch_size)
            except (TidingsError, SQLAlchemyError) as exc:
                if isinstance(exc, TidingsError) and _gives_up(exc):
                    raise
                log.warning(
                    "relay will retry in %gs: %s",
                    interval_s,
                    exc,
                    extra={"action": "relay_retry"},
                )
            stop.wait(interval_s)
    finally:
        if isinstance(source, str):
            engine.dispose()
        log.info("relay stopped", extra={"action": "relay_stopped"})


def parse_table_name(name: str) -> sa.Table:
    """The outbox table for a `name` or `schema.name` given on the command line."""
    schema, _, table = name.rpartition(".")
    return outbox_table(name=table or DEFAULT_TABLE_NAME, schema=schema or None)


def main(
    *,
    source: str,
    tidings_url: str,
    api_key: str | None,
    table_name: str = DEFAULT_TABLE_NAME,
    interval_s: float = 1.0,
    batch_size: int = 100,
    once: bool = False,
) -> RelayReport | None:
    """The `tidings relay` command: one pass with `once`, else until SIGTERM or SIGINT."""
    table = parse_table_name(table_name)
    with Client(tidings_url, api_key) as client:
        if once:
            return relay_once(source, client, table=table, batch_size=batch_size)
        stop = threading.Event()

        def _stop(*_: Any) -> None:
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop)
        run_relay(
            source, client, table=table, batch_size=batch_size, interval_s=interval_s, stop=stop
        )
    return None
