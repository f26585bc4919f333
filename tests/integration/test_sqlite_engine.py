"""The SQLite engine's driver: one trip to aiosqlite's thread per statement, same results."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from tidings.stores.engine import create_engine_for
from tidings.stores.onehop import OneHopConnection

_items = sa.Table(
    "items",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
)


async def test_a_file_database_uses_the_one_hop_driver_and_returns_what_sqlite_returns(
    tmp_path: Path,
) -> None:
    engine = create_engine_for(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    try:
        async with engine.begin() as conn:
            raw = await conn.get_raw_connection()
            assert isinstance(raw.driver_connection, OneHopConnection)
            await conn.run_sync(_items.metadata.create_all)
            single = await conn.execute(_items.insert().values(name="a"))
            assert single.lastrowid == 1
            many = await conn.execute(_items.insert(), [{"name": n} for n in "bcde"])
            assert many.rowcount == 4
            returned = await conn.execute(
                _items.insert().returning(_items.c.id, sort_by_parameter_order=True),
                [{"name": "f"}, {"name": "g"}],
            )
            assert [row.id for row in returned] == [6, 7]
            changed = await conn.execute(_items.update().where(_items.c.id > 5).values(name="late"))
            assert changed.rowcount == 2
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(_items.c.name).order_by(_items.c.id))).all()
            assert [row.name for row in rows] == ["a", "b", "c", "d", "e", "late", "late"]
            first = (await conn.execute(sa.select(_items.c.id).order_by(_items.c.id))).first()
            assert first is not None and first.id == 1
    finally:
        await engine.dispose()


async def test_a_failed_statement_raises_the_dbapi_error_and_rolls_back(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite+aiosqlite:///{tmp_path / 'two.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_items.metadata.create_all)
            await conn.execute(_items.insert().values(id=1, name="a"))
        with pytest.raises(sa.exc.IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(_items.insert().values(id=2, name="b"))
                await conn.execute(_items.insert().values(id=1, name="again"))
        async with engine.connect() as conn:
            count = (await conn.execute(sa.select(sa.func.count()).select_from(_items))).scalar()
            assert count == 1
    finally:
        await engine.dispose()
