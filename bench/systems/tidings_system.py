"""Systems (c) and (d): Tidings as its own processes, driven only through its HTTP API."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.backlog import insert_backlog
from bench.harness import RunContext, SubmitResult, drive_async
from bench.payloads import Item, topic_of
from bench.procs import VENV_BIN, Child, free_port, run_to_end, wait_http_ok
from bench.systems.base import System

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
# Delay queues a broker prefix may have made, if the RabbitMQ broker does not say.
_FALLBACK_DELAY_BUCKETS_MS = (1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000)


def _delay_buckets_ms() -> tuple[int, ...]:
    try:
        from tidings.brokers.rabbitmq import DELAY_BUCKETS_MS
    except ImportError:
        return _FALLBACK_DELAY_BUCKETS_MS
    return tuple(DELAY_BUCKETS_MS)


def postgres_reachable() -> bool:
    """Whether the local PostgreSQL takes a connection as user postgres."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except Exception:
        return False


def _pg_admin(*statements: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        for statement in statements:
            conn.execute(statement.encode())


class TidingsSystem(System):
    """`tidings serve` on SQLite, or `tidings api` plus N `tidings dispatcher` on PostgreSQL."""

    def __init__(
        self, name: str, label: str, *, postgres: bool, dispatchers: int, broker: bool
    ) -> None:
        super().__init__()
        self.name = name
        self.label = label
        self.postgres = postgres
        self.dispatchers = dispatchers
        self.broker = broker
        self.needs_rabbitmq = broker
        self._children: list[Child] = []
        self._delivering: list[Child] = []
        self._base_url = ""
        self._database_url = ""
        self._database_name = ""
        self._env: dict[str, str] = {}
        self._dir = Path()
        self._endpoint_ids: list[str] = []
        self._ctx: RunContext | None = None
        self._peak_mb: float | None = None
        self._launches = 0

    # lifecycle -------------------------------------------------------------------------

    async def start(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._dir = ctx.run_dir / self.name
        self._dir.mkdir(parents=True, exist_ok=True)
        config = ctx.config
        if self.postgres:
            self._database_name = f"tidings_bench_{os.getpid()}"
            await asyncio.to_thread(
                _pg_admin,
                f'DROP DATABASE IF EXISTS "{self._database_name}" WITH (FORCE)',
                f'CREATE DATABASE "{self._database_name}"',
            )
            self._database_url = PG_URL.format(name=self._database_name)
        else:
            self._database_url = f"sqlite+aiosqlite:///{self._dir / 'tidings.db'}"
        self._env = {
            "TIDINGS_DATABASE_URL": self._database_url,
            "TIDINGS_AUTH_REQUIRED": "false",
            "TIDINGS_ALLOW_PRIVATE_NETWORKS": "true",
            "TIDINGS_HOST": "127.0.0.1",
            "TIDINGS_MAX_IN_FLIGHT": str(config.concurrency),
            "TIDINGS_ENDPOINT_CONCURRENCY": str(config.endpoint_concurrency),
            "TIDINGS_SHUTDOWN_GRACE_S": "1",
            "TIDINGS_ADMIN_KEY_FILE": str(self._dir / "admin.key"),
        }
        if self.broker and ctx.rabbit is not None:
            self._env["TIDINGS_BROKER_URL"] = ctx.rabbit.url
            self._env["TIDINGS_BROKER_PREFIX"] = f"bench.{ctx.tag}"
        if self.postgres:
            # One migration before several processes start, so they do not race to make it.
            await asyncio.to_thread(
                run_to_end,
                "tidings db upgrade",
                [str(VENV_BIN / "tidings"), "db", "upgrade"],
                log_path=self._dir / "migrate.log",
                env=self._env,
                cwd=self._dir,
                drop_env_prefix="TIDINGS_",
            )
        await self._launch()
        await self._register_endpoints(ctx)

    async def _launch(self) -> None:
        port = free_port()
        self._base_url = f"http://127.0.0.1:{port}"
        tidings = str(VENV_BIN / "tidings")
        number = self._launches
        self._launches += 1

        def child(name: str, argv: list[str]) -> Child:
            return Child(
                name,
                argv,
                log_path=self._dir / f"{name.replace(' ', '-')}-{number}.log",
                env=self._env,
                cwd=self._dir,
                drop_env_prefix="TIDINGS_",
            )

        server_args = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        if self.postgres:
            api = child("tidings api", [tidings, "api", *server_args])
            self._delivering = [
                child(f"tidings dispatcher {i}", [tidings, "dispatcher", "--log-level", "warning"])
                for i in range(self.dispatchers)
            ]
            self._children = [api, *self._delivering]
        else:
            serve = child("tidings serve", [tidings, "serve", *server_args])
            self._delivering = [serve]
            self._children = [serve]
        await asyncio.to_thread(wait_http_ok, f"{self._base_url}/healthz", self._children, 60.0)

    async def _halt(self) -> None:
        peaks = [mb for mb in (c.peak_rss_mb() for c in self._delivering) if mb is not None]
        if peaks:
            self._peak_mb = max(peaks + ([self._peak_mb] if self._peak_mb else []))
        for child in self._children:
            await asyncio.to_thread(child.stop, 15.0)
        self._children = []
        self._delivering = []

    async def _register_endpoints(self, ctx: RunContext) -> None:
        self._endpoint_ids = []
        async with aiohttp.ClientSession() as session:
            for index, url in enumerate(ctx.receiver_urls):
                spec = {
                    "url": url,
                    "topics": [topic_of(index)],
                    "retry_schedule": list(ctx.scenario.ladder),
                    "window": "24h",
                    "timeout": f"{ctx.config.timeout_s:g}s",
                }
                async with session.post(f"{self._base_url}/v1/endpoints", json=spec) as reply:
                    answer: dict[str, Any] = await reply.json()
                    if reply.status != 201:
                        raise RuntimeError(f"registering an endpoint answered {answer}")
                self._endpoint_ids.append(str(answer["id"]))

    async def load_backlog(self, ctx: RunContext, count: int) -> float:
        """Stop Tidings, insert the backlog straight into its tables, start it again."""
        await self._halt()
        took_s = await asyncio.to_thread(
            insert_backlog,
            self._database_url,
            self._endpoint_ids,
            count,
            tag=ctx.tag.replace("-", "")[-12:],
            payload_bytes=ctx.config.payload_bytes,
        )
        self.notes.append(
            f"{self.label}, S4 backlog: {count:,} notifications, deliveries and failed first "
            f"attempts inserted by direct SQL in {took_s:.1f}s (not through the API)"
        )
        await self._launch()
        return took_s

    async def submit(
        self, ctx: RunContext, items: Sequence[Item], rate: float | None
    ) -> SubmitResult:
        url = f"{self._base_url}/v1/notifications"
        connector = aiohttp.TCPConnector(limit=ctx.config.producers)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def submit_one(item: Item) -> str:
                body = {"topic": item.topic, "payload": item.payload}
                async with session.post(url, json=body) as reply:
                    answer: dict[str, Any] = await reply.json()
                    if reply.status != 201:
                        raise RuntimeError(f"{reply.status}: {answer}")
                    return str(answer["id"])

            return await drive_async(items, ctx.config.producers, rate, ctx.deadline, submit_one)

    async def explain(self, ctx: RunContext, ids: Sequence[str], file_name: str) -> None:
        """Save Tidings' own record (deliveries, attempts) of up to 20 of these notifications."""
        found: dict[str, Any] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for notification_id in list(ids)[:20]:
                try:
                    url = f"{self._base_url}/v1/notifications/{notification_id}"
                    async with session.get(url) as reply:
                        found[notification_id] = await reply.json()
                except Exception as exc:
                    found[notification_id] = f"{type(exc).__name__}: {exc}"
            try:
                async with session.get(f"{self._base_url}/healthz") as reply:
                    found["healthz"] = await reply.json()
            except Exception as exc:
                found["healthz"] = f"{type(exc).__name__}: {exc}"
        (ctx.run_dir / file_name).write_text(json.dumps(found, indent=1))

    def delivering_pids(self) -> list[int]:
        return [child.pid for child in self._delivering]

    def watched(self) -> list[Child]:
        return list(self._children)

    def peak_rss_mb(self) -> float | None:
        peaks = [mb for mb in (c.peak_rss_mb() for c in self._delivering) if mb is not None]
        if self._peak_mb is not None:
            peaks.append(self._peak_mb)
        return max(peaks) if peaks else None

    async def stop(self) -> None:
        await self._halt()
        self._peak_mb = None
        if not self.postgres:
            # The logs stay; a store with a million-row backlog is not worth keeping.
            for leftover in self._dir.glob("tidings.db*"):
                leftover.unlink(missing_ok=True)
        if self.postgres and self._database_name:
            await asyncio.to_thread(
                _pg_admin, f'DROP DATABASE IF EXISTS "{self._database_name}" WITH (FORCE)'
            )
        ctx = self._ctx
        if ctx is not None and ctx.rabbit is not None and "TIDINGS_BROKER_PREFIX" in self._env:
            prefix = self._env["TIDINGS_BROKER_PREFIX"]
            names = [f"{prefix}.due", *(f"{prefix}.delay.{ms}" for ms in _delay_buckets_ms())]
            await asyncio.to_thread(ctx.rabbit.forget_queues, names)
