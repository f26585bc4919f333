"""Integration fixtures: a fresh database, real HTTP receivers, a running service."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import CI
from tests.integration.harness import (
    BASE_SETTINGS,
    POSTGRES_ADMIN_URL,
    Receiver,
    ReceiverFactory,
    Tidings,
    TidingsFactory,
    postgres_admin,
)
from tidings.api.app import create_app
from tidings.clock import Clock, SystemClock
from tidings.service import Service
from tidings.settings import Settings
from tidings.stores.sql import SqlStore

# stores ------------------------------------------------------------------------------------


@cache
def postgres_reachable() -> bool:
    """Whether the local PostgreSQL answers (asked once per run)."""
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, ci: type[CI]) -> Iterator[str]:
    """A fresh, empty database per test: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tidings.db'}"
        return
    ci.require_server("PostgreSQL at 127.0.0.1:5432 (user postgres)", postgres_reachable())
    name = f"tidings_test_{secrets.token_hex(6)}"
    postgres_admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        # FORCE: a killed `tidings serve` may have left a session behind.
        postgres_admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


# receivers ---------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[ReceiverFactory]:
    """Start receivers on demand (`await receiver()`); each is closed after the test."""
    started: list[Receiver] = []

    async def start() -> Receiver:
        made = Receiver()
        await made.start()
        started.append(made)
        return made

    yield start
    for made in reversed(started):
        await made.close()


# the service -------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    """The service's clock; a module overrides this fixture to return a FakeClock."""
    return SystemClock()


@pytest.fixture
async def tidings_factory(
    database_url: str, clock: Clock, receiver: ReceiverFactory
) -> AsyncIterator[TidingsFactory]:
    """Start services on the test's database, with settings overridden by keyword.

    It asks for `receiver` only so that receivers close after the services: a stopping
    dispatcher then finishes against a live receiver, not a vanished one.
    """
    running: list[Tidings] = []

    async def start(**overrides: Any) -> Tidings:
        run_dispatcher = bool(overrides.pop("run_dispatcher", True))
        settings = Settings(**{**BASE_SETTINGS, "database_url": database_url, **overrides})
        service = Service(
            settings, store=SqlStore(database_url), clock=clock, run_dispatcher=run_dispatcher
        )
        await service.start()
        transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
        client = httpx.AsyncClient(transport=transport, base_url="http://tidings.test")
        harness = Tidings(service, client)
        running.append(harness)
        return harness

    yield start
    for harness in reversed(running):
        await harness.close()


@pytest.fixture
async def tidings(tidings_factory: TidingsFactory) -> Tidings:
    """A running service (API and dispatcher) on a fresh database."""
    return await tidings_factory()
