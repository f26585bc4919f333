"""The store contract, run against the in-process MemoryStore."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tests.store_contract import *  # noqa: F403  # the contract's tests, collected here

from tidings.stores import open_store
from tidings.stores.base import Store
from tidings.stores.memory import MemoryStore


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    """A fresh, open MemoryStore."""
    opened = open_store("memory://")
    assert isinstance(opened, MemoryStore)
    await opened.open()
    yield opened
    await opened.close()
