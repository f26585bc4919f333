"""The store contract, run against SqlStore on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.store_contract import *  # noqa: F403  # the contract's tests, collected here
from tidings.stores.base import Store
from tidings.stores.sql import SqlStore


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A fresh, open SqlStore on the test's own database."""
    opened = SqlStore(database_url)
    await opened.open()
    yield opened
    await opened.close()
