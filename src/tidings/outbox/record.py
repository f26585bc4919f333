"""Record a notification in the notifier's own open transaction: one outbox row, nothing else.

The row commits or rolls back with the caller's business change, so a notification exists
exactly when the result it tells of does. The relay takes it to Tidings afterwards.

Rows that share a business key are relayed in the order their transactions committed. On
SQLite that holds by itself (one writer at a time); on PostgreSQL `record` takes a
transaction-scoped advisory lock on the key, so a second transaction recording the same key
waits until the first one ends, and its row gets the later `seq`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from tidings.errors import ConfigurationError, InvalidInput
from tidings.models import new_id
from tidings.outbox.table import OUTBOX

if TYPE_CHECKING:
    import psycopg

_MAX_TOPIC_CHARS = 200  # the service's topic rule, checked here so no row is doomed
_MAX_KEY_CHARS = 200
_DIALECTS = ("sqlite", "postgresql")
ID_PREFIX = "obx_"


def _check(topic: str, key: str | None) -> None:
    if not topic or len(topic) > _MAX_TOPIC_CHARS or any(ch.isspace() for ch in topic):
        raise InvalidInput(
            f"topic: a topic is 1 to {_MAX_TOPIC_CHARS} characters without spaces, "
            f"e.g. 'recharge.succeeded'; got {topic!r}",
            field="topic",
        )
    if key is not None and not 0 < len(key) <= _MAX_KEY_CHARS:
        raise InvalidInput(f"key: must be 1 to {_MAX_KEY_CHARS} characters", field="key")


def _encode(payload: Any, raw: bytes | None, content_type: str | None) -> tuple[bytes, str]:
    """The exact bytes receivers will get, encoded the way the Tidings API encodes JSON."""
    if raw is not None:
        if payload is not None:
            raise InvalidInput("give either payload or raw, not both", field="payload")
        return bytes(raw), content_type or "application/octet-stream"
    if content_type not in (None, "application/json"):
        raise InvalidInput(
            "content_type: a JSON payload is recorded as application/json; pass raw bytes "
            "for other content types",
            field="content_type",
        )
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"payload: not JSON-serialisable: {exc}", field="payload") from exc
    return text.encode("utf-8"), "application/json"


def _row(
    topic: str, payload: Any, key: str | None, raw: bytes | None, content_type: str | None
) -> dict[str, Any]:
    _check(topic, key)
    body, kind = _encode(payload, raw, content_type)
    return {
        "id": new_id(ID_PREFIX),
        "topic": topic,
        "key": key,
        "content_type": kind,
        "body": body,
        "created_at": time.time(),
    }


# Limitation: two transactions that each record several business keys, in opposite
# orders, wait on each other's key locks; PostgreSQL then aborts one with a deadlock error,
# as it would for two row locks taken that way. Record one key per transaction, or keys in
# a fixed order.
def key_lock_id(table: sa.Table, key: str) -> int:
    """The signed 64-bit advisory lock id that serializes recordings of `key` in `table`."""
    digest = hashlib.blake2b(f"{table.fullname}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _check_dialect(name: str) -> None:
    if name not in _DIALECTS:
        raise ConfigurationError(
            f"the outbox supports SQLite and PostgreSQL; this connection is {name!r}"
        )


def _require_psycopg(target: object, class_name: str, function: str) -> None:
    # Only a program that imported psycopg can hold a psycopg connection.
    module = sys.modules.get("psycopg")
    if module is None or not isinstance(target, getattr(module, class_name)):
        kinds = (
            "AsyncSession or AsyncConnection" if "Async" in class_name else "Session or Connection"
        )
        raise TypeError(
            f"{function}() takes a SQLAlchemy {kinds} or a psycopg {class_name}; "
            f"got {type(target).__name__}"
        )


def record(
    target: Session | Connection | psycopg.Connection[Any],
    topic: str,
    payload: Any = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    content_type: str | None = None,
    table: sa.Table = OUTBOX,
) -> str:
    """Write one outbox row inside `target`'s open transaction; returns the outbox row id.

    `target` is a SQLAlchemy `Session` or `Connection`, or a psycopg connection. Send a
    JSON `payload`, or `raw` bytes with their `content_type`. Nothing is committed here.
    """
    row = _row(topic, payload, key, raw, content_type)
    if isinstance(target, Session):
        connection = target.connection()
    elif isinstance(target, Connection):
        connection = target
    else:
        _require_psycopg(target, "Connection", "record")
        _record_psycopg(target, row, table)
        return str(row["id"])
    _check_dialect(connection.dialect.name)
    if key is not None and connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(key_lock_id(table, key))))
    connection.execute(table.insert().values(**row))
    return str(row["id"])


async def record_async(
    target: AsyncSession | AsyncConnection | psycopg.AsyncConnection[Any],
    topic: str,
    payload: Any = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    content_type: str | None = None,
    table: sa.Table = OUTBOX,
) -> str:
    """Like `record`, for an `AsyncSession`, an `AsyncConnection` or a psycopg async
    connection."""
    row = _row(topic, payload, key, raw, content_type)
    if isinstance(target, AsyncSession):
        connection = await target.connection()
    elif isinstance(target, AsyncConnection):
        connection = target
    else:
        _require_psycopg(target, "AsyncConnection", "record_async")
        await _record_psycopg_async(target, row, table)
        return str(row["id"])
    _check_dialect(connection.dialect.name)
    if key is not None and connection.dialect.name == "postgresql":
        lock = sa.select(sa.func.pg_advisory_xact_lock(key_lock_id(table, key)))
        await connection.execute(lock)
    await connection.execute(table.insert().values(**row))
    return str(row["id"])


def _psycopg_statements(table: sa.Table, row: dict[str, Any]) -> tuple[Any, Any, tuple[Any, ...]]:
    from psycopg import sql

    names = ([table.schema] if table.schema else []) + [table.name]
    lock = sql.SQL("SELECT pg_advisory_xact_lock(%s)")
    insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(*names),
        sql.SQL(", ").join(sql.Identifier(column) for column in row),
        sql.SQL(", ").join(sql.Placeholder() for _ in row),
    )
    return lock, insert, tuple(row.values())


def _refuse_autocommit(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    from psycopg import pq

    # In autocommit mode outside `conn.transaction()` the row would commit on its own,
    # before (or without) the business change it belongs to.
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise ConfigurationError(
            "this psycopg connection is in autocommit mode and not inside a transaction, so "
            "the outbox row would commit alone; record inside `with conn.transaction():`"
        )


def _record_psycopg(conn: psycopg.Connection[Any], row: dict[str, Any], table: sa.Table) -> None:
    _refuse_autocommit(conn)
    lock, insert, values = _psycopg_statements(table, row)
    if row["key"] is not None:
        conn.execute(lock, (key_lock_id(table, row["key"]),))
    conn.execute(insert, values)


async def _record_psycopg_async(
    conn: psycopg.AsyncConnection[Any], row: dict[str, Any], table: sa.Table
) -> None:
    _refuse_autocommit(conn)
    lock, insert, values = _psycopg_statements(table, row)
    if row["key"] is not None:
        await conn.execute(lock, (key_lock_id(table, row["key"]),))
    await conn.execute(insert, values)
