"""The RabbitMQ broker against a real RabbitMQ: due ids, delay queues, restarts, outages."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import aio_pika
import pytest

from tests.conftest import CI
from tests.integration.harness import (
    Receiver,
    ReceiverFactory,
    Reply,
    Tidings,
    TidingsFactory,
    attempts_of,
)
from tidings.brokers import EmbeddedBroker, open_broker
from tidings.brokers.rabbitmq import DELAY_BUCKETS_MS, RabbitBroker, delay_bucket_ms
from tidings.errors import BrokerUnavailable, ConfigurationError

RABBITMQ_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
RABBITMQ_NAME: Final = "RabbitMQ at 127.0.0.1:5672 (guest/guest)"

# helpers shared with test_many_dispatchers ---------------------------------------------------


def rabbitmq_reachable() -> bool:
    """Whether something accepts connections on RabbitMQ's port (asked per test: tests here
    stop and start it)."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


def queue_names(prefix: str) -> list[str]:
    """Every queue a RabbitBroker with `prefix` may have declared."""
    return [f"{prefix}.due", *(f"{prefix}.delay.{ms}" for ms in DELAY_BUCKETS_MS)]


async def delete_queues(prefix: str) -> None:
    """Delete a test's queues (deleting one that was never declared is fine in RabbitMQ)."""
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        for name in queue_names(prefix):
            await channel.queue_delete(name)
    finally:
        await connection.close()


async def messages_in(queue_name: str) -> int:
    """How many ready messages a queue holds right now."""
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)
    finally:
        await connection.close()


async def rabbitmqctl(*args: str) -> None:
    """Run rabbitmqctl without blocking the loop (the service under test runs on it)."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {stderr.decode()}"


def start_rabbitmq_app_blocking() -> None:
    """Start the RabbitMQ application even when the loop is gone (a test timed out)."""
    for args in (["start_app"], ["await_startup"]):
        subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=120, check=False)


@asynccontextmanager
async def rabbitmq_app_stopped() -> AsyncIterator[None]:
    """Stop the RabbitMQ application (the node keeps running); ALWAYS start it again."""
    await rabbitmqctl("stop_app")
    try:
        yield
    finally:
        try:
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")
        except BaseException:
            start_rabbitmq_app_blocking()
            raise


# fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def rabbitmq_url(ci: type[CI]) -> str:
    """The local RabbitMQ's URL; a loud skip (or a CI failure) when it does not answer."""
    ci.require_server(RABBITMQ_NAME, rabbitmq_reachable())
    return RABBITMQ_URL


@pytest.fixture
def rabbitmqctl_available(ci: type[CI]) -> None:
    """The fault tests stop and start RabbitMQ with rabbitmqctl."""
    ci.require_server(
        "rabbitmqctl (the local RabbitMQ's control tool)", bool(shutil.which("rabbitmqctl"))
    )


@pytest.fixture
async def queue_prefix(rabbitmq_url: str) -> AsyncIterator[str]:
    """A queue prefix of this test's own; its queues are deleted afterwards.

    Ask for it before the service fixtures, so that it is torn down after them.
    """
    prefix = f"tidings-test-{secrets.token_hex(4)}"
    yield prefix
    await delete_queues(prefix)


@pytest.fixture
async def broker_pair(queue_prefix: str) -> AsyncIterator[tuple[RabbitBroker, RabbitBroker]]:
    """Two brokers on one prefix: a publisher (an API process) and a dispatcher's."""
    publisher = RabbitBroker(RABBITMQ_URL, prefix=queue_prefix, store_poll_interval_s=30.0)
    consumer = RabbitBroker(RABBITMQ_URL, prefix=queue_prefix, store_poll_interval_s=30.0)
    await publisher.start()
    await consumer.start()
    yield publisher, consumer
    await consumer.close()
    await publisher.close()


def on_rabbitmq(queue_prefix: str, **overrides: object) -> dict[str, object]:
    """Settings for a service whose broker is the test's RabbitMQ queues.

    The store poll is slow (30 s) unless overridden: a delivery that arrives quickly came
    through RabbitMQ.
    """
    return {
        "broker_url": RABBITMQ_URL,
        "broker_prefix": queue_prefix,
        "store_poll_interval_s": 30.0,
        **overrides,
    }


async def wait_until_delivered(
    tidings: Tidings, ids: list[str], *, timeout_s: float
) -> list[dict[str, object]]:
    """Wait until every notification in `ids` is delivered; fail naming the stragglers."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [await tidings.get(nid) for nid in ids]
        waiting = [n["id"] for n in found if n["status"] != "delivered"]
        if not waiting:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{len(waiting)} of {len(ids)} not delivered in {timeout_s}s: {waiting}")
        await asyncio.sleep(0.05)


async def wait_for_statuses(tidings: Tidings, expected: dict[str, int]) -> None:
    """Wait until the store counts exactly `expected` deliveries by status."""
    deadline = time.monotonic() + 10
    while (counts := (await tidings.service.store.stats())["deliveries"]) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"deliveries by status: {counts}; expected {expected}")
        await asyncio.sleep(0.02)


# choosing a broker ---------------------------------------------------------------------------


def test_open_broker_gives_the_embedded_broker_without_a_url_and_rabbitmq_for_amqp() -> None:
    assert isinstance(open_broker(None), EmbeddedBroker)
    assert isinstance(open_broker(""), EmbeddedBroker)
    rabbit = open_broker("amqp://guest:guest@127.0.0.1:5672/", prefix="p1", store_poll_interval_s=3)
    assert isinstance(rabbit, RabbitBroker)
    assert (rabbit.work_queue_name, rabbit.store_poll_interval_s) == ("p1.due", 3)
    with pytest.raises(ConfigurationError, match=r"unsupported broker URL 'redis'.*amqp://"):
        open_broker("redis://127.0.0.1:6379/0")


def test_a_delay_is_rounded_down_to_the_longest_bucket_that_fits() -> None:
    assert delay_bucket_ms(0.4) is None  # under a second: held in memory by the consumer
    assert delay_bucket_ms(0.96) == 1_000  # 40 ms late is fine; three hops are not
    assert delay_bucket_ms(1.0) == 1_000
    assert delay_bucket_ms(1.9) == 1_000
    assert delay_bucket_ms(4.99) == 5_000
    assert delay_bucket_ms(59.0) == 30_000
    assert delay_bucket_ms(59.5) == 60_000  # 1 % late at most
    assert delay_bucket_ms(60.0) == 60_000
    assert delay_bucket_ms(5 * 3600.0) == 18_000_000
    assert delay_bucket_ms(30 * 3600.0) == 36_000_000  # longer waits hop through 10 h


async def test_a_broker_that_cannot_connect_names_the_url_and_what_to_do() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broker = RabbitBroker(f"amqp://guest:s3cret@127.0.0.1:{port}/", connect_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        await broker.start()
    message = str(caught.value)
    assert time.monotonic() - started < 5
    assert f"amqp://guest:***@127.0.0.1:{port}/" in message
    assert "s3cret" not in message
    assert "rabbitmq-server -detached" in message
    assert "TIDINGS_BROKER_URL" in message


# the broker on its own -----------------------------------------------------------------------


async def test_due_ids_reach_the_waiting_dispatcher_and_not_a_publisher_that_never_waits(
    broker_pair: tuple[RabbitBroker, RabbitBroker], queue_prefix: str
) -> None:
    publisher, consumer = broker_pair
    ids = [f"dlv_{n:04d}" for n in range(250)]

    await publisher.publish_due(ids[:130])
    await publisher.publish_due(ids[130:])
    received: list[str] = []
    while len(received) < len(ids):
        batch = await consumer.wait_due(0.05)
        assert batch is not None, f"no news after {len(received)} ids"
        assert len(batch) <= 200 + 99  # whole messages up to the per-wait cap
        received.extend(batch)

    assert received == ids
    assert await messages_in(f"{queue_prefix}.due") == 0


async def test_a_retry_waits_in_a_delay_queue_and_comes_back_when_due(
    broker_pair: tuple[RabbitBroker, RabbitBroker], queue_prefix: str
) -> None:
    publisher, consumer = broker_pair
    published_at = time.time()

    await publisher.publish_retry("dlv_later", published_at + 1.5)

    assert await messages_in(f"{queue_prefix}.delay.1000") == 1
    got = await consumer.wait_due(0.05)
    arrived_at = time.time()
    assert got == ["dlv_later"]
    # 1 s in the TTL queue, then the last half second held in memory: on time, not early.
    assert 1.5 <= arrived_at - published_at < 2.3


async def test_wait_due_says_look_in_the_store_once_per_poll_interval_even_under_traffic(
    queue_prefix: str,
) -> None:
    publisher = RabbitBroker(RABBITMQ_URL, prefix=queue_prefix)
    consumer = RabbitBroker(RABBITMQ_URL, prefix=queue_prefix, store_poll_interval_s=0.5)
    await publisher.start()
    await consumer.start()

    async def keep_publishing() -> None:
        for n in range(10_000):
            await publisher.publish_due([f"dlv_{n}"])
            await asyncio.sleep(0.01)

    feeder = asyncio.create_task(keep_publishing())
    looks = ids = 0
    try:
        until = time.monotonic() + 1.75
        while time.monotonic() < until:
            got = await consumer.wait_due(0.05)
            if got is None:
                looks += 1
            else:
                ids += len(got)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await consumer.close()
        await publisher.close()

    assert 3 <= looks <= 4  # at 0.5, 1.0, 1.5 s (and perhaps right at the end)
    assert ids > 50


# the service on RabbitMQ ---------------------------------------------------------------------


async def test_a_notification_travels_from_the_api_through_rabbitmq_to_the_receiver(
    queue_prefix: str, tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    tidings = await tidings_factory(**on_rabbitmq(queue_prefix))
    rcv = await receiver()
    await tidings.add_endpoint(rcv.url())
    await asyncio.sleep(0.1)  # the dispatcher's first look in the store is behind it
    sent_at = time.monotonic()

    sent = await tidings.send({"recharge": "r-1", "amount": 100})

    [post] = await rcv.wait_for(1, timeout_s=5)
    # The store is polled every 30 s here: this came through RabbitMQ.
    assert post.arrived_at - sent_at < 2.0
    assert post.webhook_id == sent["id"]
    assert post.body == b'{"recharge":"r-1","amount":100}'
    done = await tidings.wait_for_status(sent["id"], "delivered")
    assert [a["status_code"] for a in attempts_of(done)] == [200]
    await tidings.settle(0.3)
    assert len(rcv.requests()) == 1


async def test_a_failed_attempt_comes_back_through_a_delay_queue_on_the_ladder(
    queue_prefix: str, tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    tidings = await tidings_factory(**on_rabbitmq(queue_prefix))
    rcv = await receiver()
    rcv.script("/hook", Reply(500, "busy"), Reply(200))
    await tidings.add_endpoint(rcv.url(), retry_schedule=["1s"])

    sent = await tidings.send({"recharge": "r-2"})

    first, second = await rcv.wait_for(2, timeout_s=6)
    # The "1s" step less the 10 % jitter at the earliest: never earlier than 0.9 s.
    assert 0.9 <= second.arrived_at - first.arrived_at < 2.5
    assert first.webhook_id == second.webhook_id == sent["id"]
    assert first.body == second.body == b'{"recharge":"r-2"}'
    assert (first.headers["tidings-attempt"], second.headers["tidings-attempt"]) == ("1", "2")
    done = await tidings.wait_for_status(sent["id"], "delivered")
    assert [a["status_code"] for a in attempts_of(done)] == [500, 200]


async def test_a_dispatcher_waiting_on_rabbitmq_stops_at_once(
    queue_prefix: str, tidings_factory: TidingsFactory
) -> None:
    tidings = await tidings_factory(**on_rabbitmq(queue_prefix))
    await asyncio.sleep(0.2)  # now waiting for news, with the next store look 30 s away
    started = time.monotonic()

    await tidings.close()

    assert time.monotonic() - started < 1.5


# faults --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("rabbitmqctl_available")
async def test_fifty_waiting_retries_are_all_delivered_after_rabbitmq_stops_and_starts(
    queue_prefix: str, tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    # 50 failures in a row would open the endpoint's circuit breaker: not what this tests.
    tidings = await tidings_factory(**on_rabbitmq(queue_prefix, breaker_threshold=1000))
    rcv = await receiver()
    rcv.script("/hook", *[Reply(500)] * 50, Reply(200))
    await tidings.add_endpoint(rcv.url(), retry_schedule=["8s"])
    sent = [n["id"] for n in await asyncio.gather(*(tidings.send({"n": n}) for n in range(50)))]
    first_posts = await rcv.wait_for(50, timeout_s=10)
    await wait_for_statuses(tidings, {"pending": 50})  # recorded, so the retries are parked
    assert len(rcv.requests()) == 50  # and none of them is due yet

    async with rabbitmq_app_stopped():
        await asyncio.sleep(1.0)
        assert not rabbitmq_reachable()

    found = await wait_until_delivered(tidings, sent, timeout_s=45)
    for notification in found:
        assert [a["status_code"] for a in attempts_of(notification)] == [500, 200]
    posts = Counter(r.webhook_id for r in rcv.requests())
    assert posts == Counter({nid: 2 for nid in sent})
    # Never early; normally on time through the delay queue (8-16 s). A retry whose news
    # was lost with the broker waits for the next look in the store (every 30 s here).
    took_s = rcv.requests()[-1].arrived_at - first_posts[0].arrived_at
    assert 7.2 <= took_s < 40.0  # the 8 s step less its 10 % jitter, at the earliest
    # The dispatcher reconnected: a new notification comes through RabbitMQ again at once.
    sent_at = time.monotonic()
    late = await tidings.send({"n": "after"})
    await rcv.wait_for(101, timeout_s=5)
    assert rcv.requests()[-1].webhook_id == late["id"]
    assert rcv.requests()[-1].arrived_at - sent_at < 2.0


@pytest.mark.usefixtures("rabbitmqctl_available")
async def test_a_retry_that_cannot_be_announced_stays_pending_and_is_attempted_later(
    queue_prefix: str,
    tidings_factory: TidingsFactory,
    receiver: ReceiverFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tidings")
    tidings = await tidings_factory(**on_rabbitmq(queue_prefix))
    rcv: Receiver = await receiver()
    # The first answer takes 2 s: RabbitMQ is stopped before the retry is announced.
    rcv.script("/hook", Reply(500, delay_s=2.0), Reply(200))
    await tidings.add_endpoint(rcv.url(), retry_schedule=["1s"])
    sent = await tidings.send({"recharge": "r-5"})
    await rcv.wait_for(1, timeout_s=5)

    async with rabbitmq_app_stopped():
        pending = await tidings.wait_for_attempts(sent["id"], 1, timeout_s=5)
        [delivery] = pending["deliveries"]
        assert delivery["status"] == "pending"
        assert delivery["next_attempt_at"] is not None
        # Retried from the store while RabbitMQ is still away.
        done = await tidings.wait_for_status(sent["id"], "delivered", timeout_s=6)
        # A notification sent meanwhile is accepted and delivered from the store too.
        meanwhile = await tidings.send({"recharge": "r-6"})
        await tidings.wait_for_status(meanwhile["id"], "delivered", timeout_s=5)

    assert [a["status_code"] for a in attempts_of(done)] == [500, 200]
    assert [r.webhook_id for r in rcv.requests()] == [sent["id"], sent["id"], meanwhile["id"]]
    failed = [r for r in caplog.records if getattr(r, "action", None) == "announce_failed"]
    assert any(getattr(r, "delivery_id", None) == delivery["id"] for r in failed), [
        r.getMessage() for r in failed
    ]
