"""Dispatchers killed with SIGKILL at the worst moments, restarted by a supervisor (the
test): nothing is lost, nothing stays in flight, and a poison notification ends exhausted
without taking the others down with it. Real `tidings dispatcher` processes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import TOPIC, ReceiverFactory, Tidings, TidingsFactory

TIDINGS = Path(sys.executable).parent / "tidings"
LEASE_S = 3.0


@pytest.fixture
async def api(tidings_factory: TidingsFactory) -> AsyncIterator[Tidings]:
    """The API and store in the test, with no dispatcher: the subprocesses do the work."""
    yield await tidings_factory(
        run_dispatcher=False, lease_s=LEASE_S, default_timeout_s=1, connect_timeout_s=1
    )


async def run_dispatcher(
    database_url: str, tmp_path: Path, fault: str | None, *, limit_s: float = 20.0
) -> int:
    """One `tidings dispatcher` until it dies or `limit_s` pass; returns its exit code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_DATABASE_URL=database_url,
        TIDINGS_ALLOW_PRIVATE_NETWORKS="true",
        TIDINGS_LEASE_S=str(LEASE_S),
        TIDINGS_DEFAULT_TIMEOUT_S="1",
        TIDINGS_CONNECT_TIMEOUT_S="1",
        TIDINGS_POLL_INTERVAL_S="0.05",
        TIDINGS_MAX_CRASHES="3",
    )
    if fault:
        env["TIDINGS_FAULT_INJECTION"] = fault
    with (tmp_path / "dispatcher.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            str(TIDINGS), "dispatcher", "--log-level", "warning", env=env, stdout=log, stderr=log
        )
        try:
            return await asyncio.wait_for(process.wait(), limit_s)
        except TimeoutError:
            process.terminate()
            return await process.wait()
        finally:
            # Also when the test cancels this supervisor: no dispatcher outlives its test.
            if process.returncode is None:
                process.kill()
                await asyncio.shield(process.wait())


async def _not_in_flight(api: Tidings, notification_id: str, status: str) -> dict[str, Any]:
    done = await api.wait_for_status(notification_id, status, timeout_s=30.0)
    assert all(d["status"] != "delivering" for d in done["deliveries"])
    return done


@pytest.mark.parametrize("fault", ["after_claim", "before_record"])
async def test_a_dispatcher_killed_mid_delivery_and_restarted_delivers_with_the_same_id(
    api: Tidings, receiver: ReceiverFactory, database_url: str, tmp_path: Path, fault: str
) -> None:
    rx = await receiver()
    await api.add_endpoint(rx.url())
    sent = await api.send({"recharge": "r-1"})

    assert await run_dispatcher(database_url, tmp_path, fault) == -9  # SIGKILL, as planned
    got_before = len(rx.requests())
    await asyncio.sleep(LEASE_S)  # the dead process's lease runs out
    supervisor = asyncio.create_task(run_dispatcher(database_url, tmp_path, None))
    done = await _not_in_flight(api, sent["id"], "delivered")
    supervisor.cancel()

    posts = rx.requests()
    if fault == "after_claim":
        assert got_before == 0 and len(posts) == 1  # died before the POST
    else:
        assert got_before == 1 and len(posts) == 2  # the 200 was never recorded: one extra
    assert {p.webhook_id for p in posts} == {sent["id"]}
    assert len({p.body for p in posts}) == 1
    attempts = [(a["number"], a["error"]) for a in done["deliveries"][0]["attempts"]]
    assert attempts == [(1, "interrupted"), (2, None)]


async def test_a_poison_notification_ends_exhausted_and_the_ones_behind_it_are_delivered(
    api: Tidings, receiver: ReceiverFactory, database_url: str, tmp_path: Path
) -> None:
    rx = await receiver()
    await api.add_endpoint(rx.url(), topics=[TOPIC, "poison"])
    poison = await api.send({"bad": True}, topic="poison")
    behind = [await api.send({"n": n}) for n in range(2)]

    # A supervisor restarting a dispatcher that dies whenever it takes the poison.
    exits = []
    for _ in range(6):
        exits.append(
            await run_dispatcher(database_url, tmp_path, "after_claim:poison", limit_s=8.0)
        )
        state = await api.get(poison["id"])
        if state["status"] == "exhausted":
            break
        await asyncio.sleep(LEASE_S)

    done = await _not_in_flight(api, poison["id"], "exhausted")
    assert exits.count(-9) == 3  # each crash counted; after three it is given up
    assert [a["error"] for a in done["deliveries"][0]["attempts"]] == ["interrupted"] * 3
    for sent in behind:
        delivered = await _not_in_flight(api, sent["id"], "delivered")
        assert delivered["deliveries"][0]["attempts"][-1]["status_code"] == 200
    assert sorted(p.webhook_id for p in rx.requests()) == sorted(s["id"] for s in behind)
