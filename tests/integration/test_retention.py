"""Retention: final notifications go after their retention, in batches; live ones stay."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.harness import (
    ReceiverFactory,
    Reply,
    Tidings,
    TidingsFactory,
    attempts_of,
)
from tidings.clock import Clock, FakeClock
from tidings.retention import PurgeReport, RetentionPolicy, purge, purge_batch
from tidings.stores.sql import SqlStore
from tidings.stores.tables import attempts, deliveries, notifications

DAY_S: Final = 86400.0
# Long enough ago that the real clock (the CLI's) sees every final notification as expired.
T0: Final = time.time() - 200 * DAY_S
POLICY: Final = RetentionPolicy()  # 30 days delivered, 90 days the rest


@pytest.fixture
def clock() -> Clock:
    """The service's clock starts 200 days ago and moves only when a test says so."""
    return FakeClock(T0)


@dataclass
class World:
    """Notification ids by what became of them, all sent at T0."""

    delivered: list[str]
    exhausted: list[str]
    cancelled: list[str]
    unrouted: list[str]
    live: list[str]  # one delivery still pending
    mixed: list[str]  # one delivery delivered, one still pending
    # What the service itself sent about the exhausted deliveries (`tidings.*` topics);
    # nobody subscribes to those here, so they are unrouted.
    operational: list[str]


async def _world(tidings: Tidings, receiver: ReceiverFactory) -> World:
    rx = await receiver()
    rx.script("/ok", Reply(200))
    rx.script("/down", Reply(500))
    # The live deliveries' next attempt is a year away, so no clock jump below reaches it.
    far = {"retry_schedule": ["365d"], "window": "400d"}
    await tidings.add_endpoint(rx.url("/ok"), topics=["ok", "mixed"], retry_schedule=["1h"])
    # A 1s window with a 2s step: the first failure exhausts the delivery.
    await tidings.add_endpoint(rx.url("/down"), topics=["down"], retry_schedule=["2s"], window="1s")
    await tidings.add_endpoint(rx.url("/down"), topics=["live", "mixed"], **far)
    gone = await tidings.add_endpoint(rx.url("/down"), topics=["gone"], **far)

    async def send(topic: str, count: int) -> list[str]:
        return [(await tidings.send({"n": n}, topic=topic))["id"] for n in range(count)]

    world = World(
        delivered=await send("ok", 3),
        exhausted=await send("down", 2),
        cancelled=await send("gone", 1),
        unrouted=await send("nobody", 1),
        live=await send("live", 1),
        mixed=await send("mixed", 1),
        operational=[],
    )
    for notification_id in world.delivered:
        await tidings.wait_for_status(notification_id, "delivered")
    for notification_id in world.exhausted:
        await tidings.wait_for_status(notification_id, "exhausted")
    for notification_id in [*world.cancelled, *world.live]:
        await tidings.wait_for_attempts(notification_id, 1)
    await tidings.wait_for_attempts(world.mixed[0], 2)
    removed = await tidings.client.delete(f"/v1/endpoints/{gone['id']}")
    assert removed.status_code == 204
    for notification_id in world.cancelled:
        await tidings.wait_for_status(notification_id, "cancelled")
    for notification_id in [*world.live, *world.mixed]:
        assert (await tidings.get(notification_id))["status"] == "pending"
    assert (await tidings.get(world.unrouted[0]))["status"] == "unrouted"
    async with _engine(tidings).connect() as conn:
        n = notifications.c
        found = await conn.execute(
            sa.select(n.id, n.status, n.created_at).where(n.topic.startswith("tidings."))
        )
        for row in found:
            assert (row.status, row.created_at) == ("unrouted", T0)
            world.operational.append(row.id)
    return world


def _engine(tidings: Tidings) -> AsyncEngine:
    store = tidings.service.store
    assert isinstance(store, SqlStore)
    return store.engine


async def _rows(tidings: Tidings) -> tuple[int, int, int]:
    """How many notifications, deliveries and attempts the store holds."""
    async with _engine(tidings).connect() as conn:
        counts = [
            (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
            for table in (notifications, deliveries, attempts)
        ]
    return counts[0], counts[1], counts[2]


async def _purge(tidings: Tidings, *, dry_run: bool = False, batch: int = 500) -> PurgeReport:
    return await purge(
        _engine(tidings), now=tidings.clock.now(), policy=POLICY, batch=batch, dry_run=dry_run
    )


async def _exists(tidings: Tidings, notification_id: str) -> bool:
    response = await tidings.client.get(f"/v1/notifications/{notification_id}")
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


async def test_each_final_notification_goes_when_its_retention_ends_and_live_ones_stay(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    world = await _world(tidings, receiver)
    ops = len(world.operational)
    # 9 notifications; deliveries: 3 ok + 2 down + 1 gone + 1 live + 2 mixed; one attempt
    # each; the unrouted notification has none.
    assert await _rows(tidings) == (9 + ops, 9, 9)

    tidings.clock.advance(30 * DAY_S - 1)
    assert await _purge(tidings) == PurgeReport()
    assert await _rows(tidings) == (9 + ops, 9, 9)

    tidings.clock.advance(2)  # 30 days and a second since T0
    gone = await _purge(tidings)
    assert gone == PurgeReport(
        notifications=3, deliveries=3, attempts=3, batches=1, by_status={"delivered": 3}
    )
    assert await _rows(tidings) == (6 + ops, 6, 6)
    for notification_id in world.delivered:
        assert not await _exists(tidings, notification_id)

    tidings.clock.advance(60 * DAY_S - 2)  # a second short of 90 days
    assert await _purge(tidings) == PurgeReport()

    tidings.clock.advance(2)
    gone = await _purge(tidings)
    assert gone == PurgeReport(
        notifications=4 + ops,
        deliveries=3,
        attempts=3,
        batches=1,
        by_status={"exhausted": 2, "cancelled": 1, "unrouted": 1 + ops},
    )
    assert await _rows(tidings) == (2, 3, 3)
    for notification_id in [*world.exhausted, *world.cancelled, *world.unrouted]:
        assert not await _exists(tidings, notification_id)
    # However old, a notification with a delivery still pending keeps everything.
    live = await tidings.get(world.live[0])
    mixed = await tidings.get(world.mixed[0])
    assert [d["status"] for d in live["deliveries"]] == ["pending"]
    assert sorted(d["status"] for d in mixed["deliveries"]) == ["delivered", "pending"]
    assert len(attempts_of(live)) == 1
    assert len(attempts_of(mixed)) == 2

    tidings.clock.advance(300 * DAY_S)
    assert await _purge(tidings) == PurgeReport()
    assert await _rows(tidings) == (2, 3, 3)


async def test_a_dry_run_counts_what_would_go_and_deletes_nothing(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    world = await _world(tidings, receiver)
    ops = len(world.operational)
    tidings.clock.advance(90 * DAY_S + 1)

    would = await _purge(tidings, dry_run=True, batch=2)

    assert would == PurgeReport(
        notifications=7 + ops,
        deliveries=6,
        attempts=6,
        batches=(7 + ops + 1) // 2,  # walked two at a time in seq order
        by_status={"delivered": 3, "exhausted": 2, "cancelled": 1, "unrouted": 1 + ops},
    )
    assert await _rows(tidings) == (9 + ops, 9, 9)
    for notification_id in world.delivered + world.exhausted + world.unrouted:
        assert await _exists(tidings, notification_id)
    assert await _purge(tidings, batch=2) == would


async def test_retention_counts_from_when_a_notification_settled_not_from_when_it_was_sent(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    rx.script("/flaky", Reply(500), Reply(200))
    await tidings.add_endpoint(rx.url("/flaky"), retry_schedule=["2s"], window="1s")
    sent = (await tidings.send({"n": 1}))["id"]
    await tidings.wait_for_status(sent, "exhausted")

    # Redelivered by hand 29 days later, it is delivered then.
    tidings.clock.advance(29 * DAY_S)
    redelivered = await tidings.client.post(f"/v1/notifications/{sent}/redeliver")
    assert redelivered.status_code == 200
    await tidings.wait_for_status(sent, "delivered")

    tidings.clock.advance(1 * DAY_S + 1)  # 30 days after sending, 1 day after delivery
    assert await _purge(tidings) == PurgeReport()
    assert await _exists(tidings, sent)

    tidings.clock.advance(29 * DAY_S)  # 30 days and a second after delivery
    gone = await _purge(tidings)
    assert gone == PurgeReport(
        notifications=1, deliveries=1, attempts=2, batches=1, by_status={"delivered": 1}
    )
    assert not await _exists(tidings, sent)


async def test_one_batch_purges_at_most_its_limit_oldest_first(tidings: Tidings) -> None:
    sent = [(await tidings.send({"n": n}, topic="nobody"))["id"] for n in range(5)]
    tidings.clock.advance(90 * DAY_S + 1)

    report, after = await purge_batch(
        _engine(tidings), now=tidings.clock.now(), policy=POLICY, limit=2
    )

    assert report == PurgeReport(notifications=2, batches=1, by_status={"unrouted": 2})
    assert after is not None
    assert [await _exists(tidings, n) for n in sent] == [False, False, True, True, True]
    assert (await _rows(tidings))[0] == 3


async def test_the_running_service_purges_by_itself_every_purge_interval(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    tidings = await tidings_factory(purge_interval_s=0.05, purge_batch=2)
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/ok"), retry_schedule=["1h"])
    delivered = [(await tidings.send({"n": n}))["id"] for n in range(5)]
    unrouted = (await tidings.send({"n": 1}, topic="nobody"))["id"]
    for notification_id in delivered:
        await tidings.wait_for_status(notification_id, "delivered")
    await asyncio.sleep(0.3)  # several purge passes: nothing is old enough yet
    assert await _rows(tidings) == (6, 5, 5)

    tidings.clock.advance(30 * DAY_S + 1)

    deadline = time.monotonic() + 10
    while (await _rows(tidings))[0] > 1:
        assert time.monotonic() < deadline, f"still {await _rows(tidings)} rows after 10s"
        await asyncio.sleep(0.05)
    assert await _rows(tidings) == (1, 0, 0)
    assert await _exists(tidings, unrouted)


async def _cli(*args: str) -> tuple[int, str, str]:
    tidings_cli = str(Path(sys.executable).with_name("tidings"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    process = await asyncio.create_subprocess_exec(
        tidings_cli,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_tidings_purge_dry_run_prints_what_would_go_and_then_purges_it(
    tidings: Tidings, receiver: ReceiverFactory, database_url: str
) -> None:
    world = await _world(tidings, receiver)
    ops = len(world.operational)
    # The CLI runs on the real clock, 200 days after T0: every final notification expired.
    what = (
        f"{7 + ops} notifications (1 cancelled, 3 delivered, 2 exhausted, {1 + ops} unrouted), "
        "6 deliveries, 6 attempts"
    )

    code, out, err = await _cli("purge", "--dry-run", "--database-url", database_url)

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "retention: delivered kept 30d (TIDINGS_RETENTION_DELIVERED_S), exhausted, "
        "cancelled and unrouted kept 90d (TIDINGS_RETENTION_EXHAUSTED_S)",
        f"would purge {what}",
    ]
    assert await _rows(tidings) == (9 + ops, 9, 9)

    code, out, err = await _cli("purge", "--database-url", database_url)

    assert (code, err) == (0, "")
    assert out.splitlines()[1] == f"purged {what}"
    assert await _rows(tidings) == (2, 3, 3)
