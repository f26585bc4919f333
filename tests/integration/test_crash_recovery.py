"""A `tidings serve` killed with SIGKILL mid-delivery loses nothing: the lease runs out, and the
delivery is attempted again by the next process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import (
    TOPIC,
    ReceiverFactory,
    Reply,
    attempts_of,
    closed_port,
)

TIDINGS = Path(sys.executable).parent / "tidings"
LEASE_S = 3.0


class Serving:
    """One `tidings serve` process on 127.0.0.1, its output kept in a log file."""

    def __init__(self, database_url: str, workdir: Path, name: str) -> None:
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self._database_url = database_url
        self._workdir = workdir
        self.process: asyncio.subprocess.Process | None = None

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env.update(
            TIDINGS_DATABASE_URL=self._database_url,
            TIDINGS_ALLOW_PRIVATE_NETWORKS="true",
            TIDINGS_AUTH_REQUIRED="false",
            TIDINGS_ADMIN_KEY_FILE=str(self._workdir / "admin.key"),
            # A short lease so a dead process's claim runs out in seconds; one attempt
            # (1s connect + 1s answer) must still fit inside it.
            TIDINGS_LEASE_S=str(LEASE_S),
            TIDINGS_DEFAULT_TIMEOUT_S="1",
            TIDINGS_CONNECT_TIMEOUT_S="1",
            TIDINGS_POLL_INTERVAL_S="0.05",
        )
        return env

    async def start(self) -> None:
        """Start the process and wait until its API answers."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(TIDINGS),
                "serve",
                "--port",
                str(self.port),
                env=self._environment(),
                cwd=self._workdir,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30.0
        async with httpx.AsyncClient(base_url=self.url) as client:
            while True:
                if self.process.returncode is not None:
                    pytest.fail(f"tidings serve exited: {self.log_path.read_text()}")
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"tidings serve did not start in 30s: {self.log_path.read_text()}")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is handed back."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()


ServingFactory = Callable[[str], Awaitable[Serving]]


@pytest.fixture
async def serving(database_url: str, tmp_path: Path) -> AsyncIterator[ServingFactory]:
    """Start `tidings serve` processes on the test's database; all are killed afterwards."""
    started: list[Serving] = []

    async def start(name: str) -> Serving:
        process = Serving(database_url, tmp_path, name)
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        await process.kill()


async def _wait_delivered(api: httpx.AsyncClient, notification_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 4 * LEASE_S + 10.0
    while True:
        found: dict[str, Any] = (await api.get(f"/v1/notifications/{notification_id}")).json()
        if found["status"] == "delivered":
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{notification_id} was not delivered after the restart: {found}")
        await asyncio.sleep(0.1)


async def test_a_delivery_in_flight_when_the_server_is_killed_completes_after_a_restart(
    serving: ServingFactory, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    # The first POST hangs, so the delivery is in flight when the process dies.
    rx.script("/hook", Reply(200, "late", delay_s=30.0), Reply(200, "ok"))
    first = await serving("first")
    async with httpx.AsyncClient(base_url=first.url) as api:
        endpoint = await api.post(
            "/v1/endpoints",
            json={"url": rx.url("/hook"), "topics": [TOPIC], "retry_schedule": ["1s"]},
        )
        assert endpoint.status_code == 201, endpoint.text
        answer = await api.post(
            "/v1/notifications", json={"topic": TOPIC, "payload": {"recharge_id": "r-1"}}
        )
        assert answer.status_code == 201, answer.text
    sent = answer.json()
    await rx.wait_for(1, "/hook")
    await first.kill()
    assert first.process is not None and first.process.returncode == -signal.SIGKILL

    second = await serving("second")
    async with httpx.AsyncClient(base_url=second.url) as api:
        done = await _wait_delivered(api, sent["id"])
        health = (await api.get("/healthz")).json()
        pending = (await api.get("/v1/notifications", params={"status": "pending"})).json()

    assert health["deliveries"] == {"delivered": 1}, "nothing is left delivering"
    assert pending["items"] == []
    [delivery] = done["deliveries"]
    assert (delivery["status"], delivery["attempt_count"]) == ("delivered", 2)
    interrupted, completed = attempts_of(done)
    assert (interrupted["number"], interrupted["error"], interrupted["succeeded"]) == (
        1,
        "interrupted",
        False,
    )
    assert (completed["number"], completed["status_code"], completed["succeeded"]) == (
        2,
        200,
        True,
    )
    posts = rx.requests("/hook")
    assert [p.webhook_id for p in posts] == [sent["id"]] * 2
    assert posts[0].body == posts[1].body == b'{"recharge_id":"r-1"}'
    assert [p.headers["tidings-attempt"] for p in posts] == ["1", "2"]
