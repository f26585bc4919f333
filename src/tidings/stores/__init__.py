"""Stores: where notifications, deliveries and attempts are kept."""

from __future__ import annotations

from tidings.stores.base import NotificationQuery, Page, Store

__all__ = ["NotificationQuery", "Page", "Store", "open_store"]


def open_store(url: str) -> Store:
    """The store for a URL: `memory://` for the in-process fake, else SQLAlchemy."""
    if url.startswith("memory:"):
        from tidings.stores.memory import MemoryStore

        return MemoryStore()
    from tidings.stores.sql import SqlStore

    return SqlStore(url)
