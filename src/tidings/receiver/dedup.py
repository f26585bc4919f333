"""Run a receiver's handler at most once per notification id, using the receiver's database.

`handle` opens a transaction, claims the id with an insert into the processed-ids table
(the primary key makes the claim unique) and runs the handler on the same connection. The
handler's writes and the claim commit together or not at all: a handler that raises leaves
no trace, so the redelivery runs it again. A second delivery of the same id arriving while
the first is running waits on the claimed key and then finds it taken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tidings.errors import ConfigurationError

log = logging.getLogger(__name__)

DEFAULT_TABLE_NAME = "tidings_processed"
T = TypeVar("T")


def processed_table(
    metadata: sa.MetaData | None = None,
    *,
    name: str = DEFAULT_TABLE_NAME,
    schema: str | None = None,
) -> sa.Table:
    """The table of processed notification ids; pass your metadata for Alembic."""
    return sa.Table(
        name,
        metadata if metadata is not None else sa.MetaData(),
        sa.Column("notification_id", sa.String(200), primary_key=True),
        sa.Column("processed_at", sa.Float(precision=53), nullable=False),
        schema=schema,
    )


PROCESSED = processed_table()
"""The default processed-ids table, `tidings_processed`."""


@dataclass(frozen=True)
class Handled(Generic[T]):
    """The outcome of `handle`: whether the handler ran now, and what it returned."""

    ran: bool
    result: T | None = None


def _claim(dialect: str, table: sa.Table, notification_id: str) -> Any:
    """An insert of the id that returns it, or does nothing when the id is taken.

    RETURNING tells the two apart: psycopg reports no rowcount for ON CONFLICT.
    """
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return (
            pg_insert(table)
            .values(notification_id=notification_id, processed_at=time.time())
            .on_conflict_do_nothing(index_elements=[table.c.notification_id])
            .returning(table.c.notification_id)
        )
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return (
            sqlite_insert(table)
            .values(notification_id=notification_id, processed_at=time.time())
            .on_conflict_do_nothing(index_elements=[table.c.notification_id])
            .returning(table.c.notification_id)
        )
    raise ConfigurationError(
        f"deduplication supports SQLite and PostgreSQL; this database is {dialect!r}"
    )


def _check_id(notification_id: str) -> None:
    if not notification_id or len(notification_id) > 200:
        raise ValueError("notification_id: must be 1 to 200 characters")


def _log_duplicate(notification_id: str) -> None:
    log.debug(
        "%s was processed before; handler skipped",
        notification_id,
        extra={"action": "duplicate_skipped", "notification_id": notification_id},
    )


# Limitation: on SQLite the claim holds the database's write lock until the handler
# returns, so handlers run one at a time; keep them short or use PostgreSQL.
# Limitation: a side effect the handler does outside the given connection (an e-mail, a
# call to another service) is not part of the transaction: if the commit fails after it,
# the redelivery does it again.


class Deduplicator:
    """Runs a handler at most once per notification id (synchronous SQLAlchemy)."""

    def __init__(self, engine: Engine, *, table: sa.Table = PROCESSED) -> None:
        self.engine = engine
        self.table = table

    def create_table(self) -> None:
        """Create the processed-ids table when missing."""
        self.table.create(self.engine, checkfirst=True)

    def handle(self, notification_id: str, handler: Callable[[Connection], T]) -> Handled[T]:
        """Run `handler(connection)` unless `notification_id` was processed; the handler's
        writes on `connection` commit with the record that it ran."""
        _check_id(notification_id)
        with self.engine.begin() as conn:
            claimed = conn.execute(_claim(conn.dialect.name, self.table, notification_id))
            if claimed.first() is None:
                _log_duplicate(notification_id)
                return Handled(ran=False)
            return Handled(ran=True, result=handler(conn))

    def processed(self, notification_id: str) -> bool:
        """Whether a handler already ran (and committed) for `notification_id`."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(self.table.c.notification_id).where(
                    self.table.c.notification_id == notification_id
                )
            ).first()
        return found is not None


class AsyncDeduplicator:
    """Runs a handler at most once per notification id (asyncio SQLAlchemy)."""

    def __init__(self, engine: AsyncEngine, *, table: sa.Table = PROCESSED) -> None:
        self.engine = engine
        self.table = table

    async def create_table(self) -> None:
        """Create the processed-ids table when missing."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.table.create, checkfirst=True)

    async def handle(
        self, notification_id: str, handler: Callable[[AsyncConnection], Awaitable[T]]
    ) -> Handled[T]:
        """Await `handler(connection)` unless `notification_id` was processed; the handler's
        writes on `connection` commit with the record that it ran."""
        _check_id(notification_id)
        async with self.engine.begin() as conn:
            claimed = await conn.execute(_claim(conn.dialect.name, self.table, notification_id))
            if claimed.first() is None:
                _log_duplicate(notification_id)
                return Handled(ran=False)
            return Handled(ran=True, result=await handler(conn))

    async def processed(self, notification_id: str) -> bool:
        """Whether a handler already ran (and committed) for `notification_id`."""
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(
                    sa.select(self.table.c.notification_id).where(
                        self.table.c.notification_id == notification_id
                    )
                )
            ).first()
        return found is not None
