"""The outbox table a notifier keeps in its own database, and the ways to create it.

One row per notification to send. `seq` orders rows for the relay; `id` is globally unique
and becomes the notification's idempotency key, so two notifiers whose outboxes both start
at row 1 never collide in Tidings.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

DEFAULT_TABLE_NAME = "tidings_outbox"

_epoch = sa.Float(precision=53)
# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_seq_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_PENDING = "relayed_at IS NULL"


def _columns_and_constraints(name: str) -> list[Any]:
    # Fresh objects on every call: a Column belongs to exactly one Table.
    return [
        sa.Column("seq", _seq_type, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200)),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", _epoch, nullable=False),
        sa.Column("relayed_at", _epoch),
        sa.Column("notification_id", sa.String(40)),
        sa.Column("error", sa.Text),
        sa.UniqueConstraint("id", name=f"uq_{name}_id"),
    ]


def _pending_index_name(name: str) -> str:
    return f"ix_{name}_pending"


def outbox_table(
    metadata: sa.MetaData | None = None,
    *,
    name: str = DEFAULT_TABLE_NAME,
    schema: str | None = None,
) -> sa.Table:
    """The outbox table in `metadata`; pass your own so Alembic autogenerate sees it."""
    table = sa.Table(
        name,
        metadata if metadata is not None else sa.MetaData(),
        *_columns_and_constraints(name),
        schema=schema,
        sqlite_autoincrement=True,
    )
    # Partial: the relay walks only rows not yet relayed, however many are kept.
    sa.Index(
        _pending_index_name(name),
        table.c.seq,
        postgresql_where=sa.text(_PENDING),
        sqlite_where=sa.text(_PENDING),
    )
    return table


OUTBOX = outbox_table()
"""The default outbox table, `tidings_outbox`."""


def create_all(bind: Engine | Connection, table: sa.Table = OUTBOX) -> None:
    """Create the outbox table and its index when missing (`run_sync` it for async)."""
    table.create(bind, checkfirst=True)


def drop(bind: Engine | Connection, table: sa.Table = OUTBOX) -> None:
    """Drop the outbox table when present."""
    table.drop(bind, checkfirst=True)


def upgrade_outbox(*, name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> None:
    """Create the outbox from inside an Alembic migration's `upgrade()`."""
    from alembic import op

    op.create_table(name, *_columns_and_constraints(name), schema=schema, sqlite_autoincrement=True)
    op.create_index(
        _pending_index_name(name),
        name,
        ["seq"],
        schema=schema,
        postgresql_where=sa.text(_PENDING),
        sqlite_where=sa.text(_PENDING),
    )


def downgrade_outbox(*, name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> None:
    """Drop the outbox from inside an Alembic migration's `downgrade()`."""
    from alembic import op

    op.drop_index(_pending_index_name(name), table_name=name, schema=schema)
    op.drop_table(name, schema=schema)
