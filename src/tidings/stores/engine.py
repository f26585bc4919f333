"""Engines tuned per backend: SQLite gets WAL, a busy timeout and a single writer."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from tidings.errors import ConfigurationError
from tidings.stores import onehop

_SQLITE_BUSY_TIMEOUT_MS = 30_000


def sync_url(url: str) -> str:
    """The URL a synchronous engine (Alembic offline tools) would use."""
    return url.replace("sqlite+aiosqlite", "sqlite", 1)


def check_url(url: str) -> None:
    """Refuse database URLs Tidings has no async driver for."""
    if url.startswith("sqlite+aiosqlite:") or url.startswith("postgresql+psycopg:"):
        return
    raise ConfigurationError(
        f"unsupported database URL {url.split(':', 1)[0]!r}: use "
        "'sqlite+aiosqlite:///path/to/tidings.db' or "
        "'postgresql+psycopg://user@host/dbname' (TIDINGS_DATABASE_URL)"
    )


def create_engine_for(url: str, *, echo: bool = False, writer: bool = True) -> AsyncEngine:
    """An async engine for `url`; for SQLite, `writer` engines take the write lock up front."""
    check_url(url)
    if not url.startswith("sqlite"):
        return create_async_engine(
            url,
            echo=echo,
            pool_size=10,
            max_overflow=10,
            pool_pre_ping=True,
            # Errors must not carry statement parameters into logs: secrets and payloads.
            hide_parameters=True,
        )
    kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    database = make_url(url).database
    if database and ":memory:" not in database and "?" not in url:
        kwargs["async_creator"] = onehop.creator(database)
    if ":memory:" in url or url.rstrip("/").endswith("sqlite+aiosqlite:"):
        kwargs["poolclass"] = StaticPool
    elif writer:
        # One connection writes; the others would only queue on SQLite's file lock.
        kwargs.update(pool_size=1, max_overflow=0, pool_timeout=300)
    else:
        kwargs.update(pool_size=5, max_overflow=5)
    engine = create_async_engine(url, **kwargs)
    _tune_sqlite(engine, immediate=writer)
    return engine


def _tune_sqlite(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN can be IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads and then writes can fail at once with
        # SQLITE_BUSY when another process wrote in between; IMMEDIATE waits instead.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
