"""aiosqlite with one trip to its thread per statement, for SQLAlchemy's aiosqlite dialect.

aiosqlite runs every call in its connection's thread and SQLAlchemy's adapter makes four
calls per statement (open a cursor, execute, fetch, close), each a hand-off between the
event loop and that thread. Profiles of the dispatcher showed those hand-offs costing more
CPU than SQLite itself. Here a statement and the fetch of its rows are one call; opening
and closing a cursor are no calls at all.

Limitation: this leans on aiosqlite's `Connection._execute` and `_conn`, which are not
public; the version range in pyproject.toml is the one it was written and tested against.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import aiosqlite

_Ran = tuple[list[Any], Any, int, int | None]


def _run(conn: sqlite3.Connection, sql: str, parameters: Any) -> _Ran:
    """In aiosqlite's thread: execute, and fetch every row while there."""
    cursor = conn.execute(sql, parameters)
    try:
        rows = cursor.fetchall() if cursor.description else []
        return rows, cursor.description, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _run_many(conn: sqlite3.Connection, sql: str, parameters: Sequence[Any]) -> _Ran:
    cursor = conn.executemany(sql, parameters)
    try:
        return [], cursor.description, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class OneHopCursor:
    """The part of aiosqlite's cursor SQLAlchemy uses, with the rows fetched up front."""

    def __init__(self, connection: OneHopConnection) -> None:
        self._connection = connection
        self._rows: list[Any] = []
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.arraysize = 1

    async def __aenter__(self) -> OneHopCursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._rows = []

    async def execute(self, sql: str, parameters: Any = ()) -> OneHopCursor:
        ran = await self._connection.run(partial(_run, self._connection.sqlite, sql, parameters))
        self._rows, self.description, self.rowcount, self.lastrowid = ran
        return self

    async def executemany(self, sql: str, parameters: Sequence[Any]) -> OneHopCursor:
        ran = await self._connection.run(
            partial(_run_many, self._connection.sqlite, sql, parameters)
        )
        self._rows, self.description, self.rowcount, self.lastrowid = ran
        return self

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = self.arraysize if size is None else size
        rows, self._rows = self._rows[:count], self._rows[count:]
        return rows

    async def close(self) -> None:
        self._rows = []


class OneHopConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors are `OneHopCursor`s."""

    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._thread.daemon = True  # as SQLAlchemy does for the connections it opens

    @property
    def sqlite(self) -> sqlite3.Connection:
        """The sqlite3 connection, used only from aiosqlite's thread."""
        return self._conn

    def run(self, function: Callable[[], _Ran]) -> Awaitable[_Ran]:
        """Run `function` in the connection's thread."""
        return self._execute(function)  # type: ignore[no-untyped-call]

    def cursor(self) -> OneHopCursor:  # type: ignore[override]
        return OneHopCursor(self)


def creator(database: str) -> Callable[[], OneHopConnection]:
    """The `async_creator` of an engine on the SQLite file `database`."""

    def connector() -> sqlite3.Connection:
        return sqlite3.connect(database)  # in aiosqlite's thread, where it is always used

    return lambda: OneHopConnection(connector)
