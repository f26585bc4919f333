"""Production shape: PostgreSQL + RabbitMQ, dispatcher processes, dropped database sessions."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import httpx
import psycopg
import pytest

from tests.conftest import CI
from tests.integration.harness import (
    BASE_SETTINGS,
    POSTGRES_ADMIN_URL,
    Receiver,
    ReceiverFactory,
    Tidings,
    TidingsFactory,
)
from tests.integration.test_rabbitmq_broker import (
    RABBITMQ_NAME,
    RABBITMQ_URL,
    delete_queues,
    on_rabbitmq,
    rabbitmq_reachable,
)
from tidings.api.app import create_app
from tidings.service import Service
from tidings.settings import Settings
from tidings.stores.sql import SqlStore

ON_POSTGRES: Final = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
TIDINGS_COMMAND: Final = str(Path(sys.executable).with_name("tidings"))


@pytest.fixture
async def queue_prefix(ci: type[CI]) -> AsyncIterator[str]:
    """A queue prefix of this test's own (RabbitMQ must answer); its queues are deleted after.

    Ask for it before the service fixtures, so that it is torn down after them.
    """
    ci.require_server(RABBITMQ_NAME, rabbitmq_reachable())
    prefix = f"tidings-test-{os.urandom(4).hex()}"
    yield prefix
    await delete_queues(prefix)


async def wait_for_statuses(service: Service, expected: dict[str, int], timeout_s: float) -> None:
    """Wait until the store counts exactly `expected` deliveries by status."""
    deadline = time.monotonic() + timeout_s
    while (counts := (await service.store.stats())["deliveries"]) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"deliveries by status: {counts}; expected {expected}")
        await asyncio.sleep(0.1)


# many dispatcher processes ---------------------------------------------------------------------


class DispatcherProcess:
    """A `tidings dispatcher` child process, its log in a file."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str], cwd: Path) -> None:
        """Start it; its stderr (the log) goes to `log_path`."""
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                TIDINGS_COMMAND,
                "dispatcher",
                "--log-level",
                "debug",
                env=env,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def wait_started(self, timeout_s: float = 20.0) -> None:
        """Wait until it logs that its dispatcher runs."""
        deadline = time.monotonic() + timeout_s
        while "dispatcher_start" not in self.log():
            assert self.process is not None and self.process.returncode is None, self.log()
            assert time.monotonic() < deadline, f"no start in {timeout_s}s: {self.log()}"
            await asyncio.sleep(0.1)

    def log(self) -> str:
        """What it logged so far."""
        return self.log_path.read_text(errors="replace")

    def delivered_ids(self) -> list[str]:
        """The notification ids it logged as delivered."""
        return re.findall(r"delivered (msg_\w+) to ", self.log())

    async def stop(self) -> int:
        """SIGTERM, then its exit code (it is killed if it does not stop in time)."""
        process = self.process
        if process is None:
            return 0
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        return int(process.returncode or 0)


def dispatcher_env(database_url: str, queue_prefix: str) -> dict[str, str]:
    """The environment of a dispatcher process: ours without TIDINGS_*, then its settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TIDINGS_")}
    env.update(
        TIDINGS_DATABASE_URL=database_url,
        TIDINGS_BROKER_URL=RABBITMQ_URL,
        TIDINGS_BROKER_PREFIX=queue_prefix,
        TIDINGS_STORE_POLL_INTERVAL_S="2",
        TIDINGS_ALLOW_PRIVATE_NETWORKS="true",
    )
    return env


@pytest.fixture
async def api_only(
    queue_prefix: str, database_url: str, receiver: ReceiverFactory
) -> AsyncIterator[Tidings]:
    """The API in this process, without a dispatcher; the store schema is made here."""
    settings = Settings(
        **{**BASE_SETTINGS, "database_url": database_url, **on_rabbitmq(queue_prefix)}
    )
    service = Service(settings, store=SqlStore(database_url), run_dispatcher=False)
    await service.start()
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    client = httpx.AsyncClient(transport=transport, base_url="http://tidings.test")
    tidings = Tidings(service, client)
    yield tidings
    await tidings.close()


@ON_POSTGRES
async def test_two_dispatcher_processes_post_each_of_2000_notifications_exactly_once(
    queue_prefix: str,
    api_only: Tidings,
    database_url: str,
    receiver: ReceiverFactory,
    tmp_path: Path,
) -> None:
    receivers: list[Receiver] = [await receiver() for _ in range(20)]
    for index, rcv in enumerate(receivers):
        await api_only.add_endpoint(rcv.url(), topics=[f"load.{index}"])
    dispatchers = [DispatcherProcess(tmp_path / f"dispatcher-{n}.log") for n in range(2)]
    env = dispatcher_env(database_url, queue_prefix)
    try:
        for dispatcher in dispatchers:
            await dispatcher.start(env, tmp_path)
        for dispatcher in dispatchers:
            await dispatcher.wait_started()

        sent: dict[int, list[str]] = {index: [] for index in range(20)}
        for start in range(0, 2000, 100):
            batch = await asyncio.gather(
                *(
                    api_only.send({"n": n}, topic=f"load.{n % 20}")
                    for n in range(start, start + 100)
                )
            )
            for n, notification in zip(range(start, start + 100), batch, strict=True):
                sent[n % 20].append(notification["id"])

        await wait_for_statuses(api_only.service, {"delivered": 2000}, timeout_s=90)
        await asyncio.sleep(0.5)  # anything a dispatcher would (wrongly) post twice
    finally:
        exit_codes = [await dispatcher.stop() for dispatcher in dispatchers]

    for index, rcv in enumerate(receivers):
        posts = Counter(r.webhook_id for r in rcv.requests())
        assert posts == Counter({nid: 1 for nid in sent[index]}), f"receiver {index}"
    per_process = [dispatcher.delivered_ids() for dispatcher in dispatchers]
    assert all(per_process), "RabbitMQ gave one of the two dispatchers no work"
    assert sorted(per_process[0] + per_process[1]) == sorted(
        nid for ids in sent.values() for nid in ids
    )
    assert exit_codes == [0, 0]


# PostgreSQL sessions terminated mid-work ----------------------------------------------------


def terminate_sessions(database: str) -> int:
    """pg_terminate_backend every other session on `database`; returns how many."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return sum(1 for (done,) in rows if done)


async def send_until_accepted(tidings: Tidings, key: str) -> str:
    """Send like a careful notifier: the same idempotency key until the API accepts it."""
    for _ in range(100):
        try:
            response = await tidings.client.post(
                "/v1/notifications",
                json={"topic": "recharge.succeeded", "payload": {"k": key}, "idempotency_key": key},
            )
        except Exception:  # the app raised through the test transport: a dropped session
            await asyncio.sleep(0.05)
            continue
        if response.status_code in (200, 201):
            notification_id: str = response.json()["id"]
            return notification_id
        await asyncio.sleep(0.05)
    pytest.fail(f"{key} was never accepted")


@ON_POSTGRES
async def test_terminated_database_sessions_are_replaced_and_no_notification_is_lost(
    queue_prefix: str,
    tidings_factory: TidingsFactory,
    receiver: ReceiverFactory,
    database_url: str,
) -> None:
    overrides: dict[str, Any] = on_rabbitmq(
        queue_prefix, store_poll_interval_s=1.0, lease_s=3.0, default_timeout_s=1.0
    )
    tidings = await tidings_factory(**overrides)
    rcv = await receiver()
    await tidings.add_endpoint(rcv.url())
    database = database_url.rsplit("/", 1)[1]
    keys = [f"k-{n}" for n in range(300)]
    terminated: list[int] = []

    async def keep_terminating() -> None:
        for _ in range(8):
            await asyncio.sleep(0.25)
            terminated.append(await asyncio.to_thread(terminate_sessions, database))

    async def send_all() -> list[str]:
        accepted: list[str] = []
        for start in range(0, len(keys), 10):
            accepted += await asyncio.gather(
                *(send_until_accepted(tidings, key) for key in keys[start : start + 10])
            )
        return accepted

    accepted, _ = await asyncio.gather(send_all(), keep_terminating())

    assert sum(terminated) > 0, "no session of Tidings was terminated"
    assert len(set(accepted)) == 300
    await wait_for_statuses(tidings.service, {"delivered": 300}, timeout_s=30)
    posts = Counter(r.webhook_id for r in rcv.requests())
    assert set(posts) == set(accepted)
    # At least once; a session dropped between a POST and its record costs one more POST.
    assert max(posts.values()) <= 2
