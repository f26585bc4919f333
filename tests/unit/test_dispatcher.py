"""The dispatcher's logic on MemoryStore, a fake clock and a scripted sender (no network)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import pytest

from tidings.brokers.embedded import EmbeddedBroker
from tidings.clock import FakeClock
from tidings.dispatch.dispatcher import START_CAP, Dispatcher, DispatcherConfig
from tidings.dispatch.http import HttpResult, HttpSender
from tidings.guard import AddressGuard
from tidings.models import (
    FINAL_STATUSES,
    DeliveryStatus,
    Endpoint,
    ErrorClass,
    NewNotification,
    Notification,
    NotificationStatus,
    new_id,
)
from tidings.schedule import RetrySchedule
from tidings.stores.base import NotificationQuery
from tidings.stores.memory import MemoryStore
from tidings.success import SuccessRule

T0 = 1_700_000_000.0
TOPIC = "recharge.succeeded"
BODY = b'{"recharge_id":"r-1","status":"paid"}'
# Small real-time poll, no jitter: the fake clock then says exactly when attempts happen.
CONFIG = DispatcherConfig(poll_interval_s=0.005, lease_s=60.0, jitter=0.0, shutdown_grace_s=0.05)


@dataclass(frozen=True)
class Post:
    """One POST the dispatcher asked for."""

    url: str
    msg_id: str
    body: bytes
    attempt_number: int
    at: float


class ScriptedSender(HttpSender):
    """Answers each URL from a script of status codes instead of the network.

    The last code of a script repeats. A URL with an event in `blocked` waits for it
    before answering, which holds its attempts in flight.
    """

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(AddressGuard())
        self.clock = clock
        self.scripts: dict[str, list[int]] = {}
        self.blocked: dict[str, asyncio.Event] = {}
        self.posts: list[Post] = []
        self.in_flight: Counter[str] = Counter()
        self.most_in_flight: Counter[str] = Counter()
        self.posted = asyncio.Event()

    async def post(
        self,
        *,
        url: str,
        msg_id: str,
        body: bytes,
        content_type: str,
        secrets: tuple[str, ...],
        timeout_s: float,
        attempt_number: int,
    ) -> HttpResult:
        started_at = self.clock.now()
        self.posts.append(Post(url, msg_id, body, attempt_number, started_at))
        self.posted.set()
        self.in_flight[url] += 1
        self.most_in_flight[url] = max(self.most_in_flight[url], self.in_flight[url])
        try:
            await asyncio.sleep(0.001)  # let other attempts start meanwhile
            if url in self.blocked:
                await self.blocked[url].wait()
        finally:
            self.in_flight[url] -= 1
        script = self.scripts[url]
        status_code = script.pop(0) if len(script) > 1 else script[0]
        return HttpResult(
            started_at=started_at,
            duration_ms=3.0,
            status_code=status_code,
            body_head=b"answer %d" % status_code,
        )

    def posts_to(self, url: str) -> list[Post]:
        """The posts made to one URL, in order."""
        return [p for p in self.posts if p.url == url]


@dataclass
class World:
    """A store, a fake clock and a scripted sender, and the dispatchers running on them."""

    store: MemoryStore
    clock: FakeClock
    sender: ScriptedSender
    running: list[tuple[Dispatcher, asyncio.Task[None]]] = field(default_factory=list)

    def start(self, config: DispatcherConfig = CONFIG) -> Dispatcher:
        """Run a dispatcher in the background."""
        dispatcher = Dispatcher(self.store, EmbeddedBroker(), self.sender, config, self.clock)
        self.running.append((dispatcher, asyncio.create_task(dispatcher.run())))
        return dispatcher

    async def stop(self) -> None:
        """Stop every dispatcher and wait until each has finished."""
        for dispatcher, task in self.running:
            dispatcher.stop()
            async with asyncio.timeout(5):
                await task

    async def add_endpoint(self, url: str, ladder: str, window: str) -> Endpoint:
        """An HTTP endpoint on TOPIC with this ladder and window."""
        endpoint = Endpoint(
            id=new_id("ep_"),
            url=url,
            topics=(TOPIC,),
            secrets=("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=",),
            schedule=RetrySchedule.parse(ladder, window),
            success=SuccessRule(),
            timeout_s=5.0,
            created_at=self.clock.now(),
        )
        await self.store.add_endpoint(endpoint)
        return endpoint

    async def send(self) -> Notification:
        """Record a notification on TOPIC now."""
        new = NewNotification(topic=TOPIC, body=BODY)
        notification, _ = await self.store.add_notification(new, self.clock.now())
        return notification

    async def count(self, status: DeliveryStatus) -> int:
        """How many deliveries have `status`."""
        counts: dict[str, int] = (await self.store.stats())["deliveries"]
        return counts.get(status.value, 0)

    async def settled(self, notification_id: str) -> bool:
        """Whether every delivery of the notification is final."""
        found = await self.store.get_notification(notification_id)
        return all(d.status in FINAL_STATUSES for d in found.deliveries)

    async def run_until(self, done: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
        """Move the clock to each next due time, while nothing is in flight, until `done`."""
        async with asyncio.timeout(timeout_s):
            while not await done():
                due = await self.store.next_due_at()
                idle = await self.count(DeliveryStatus.DELIVERING) == 0
                if idle and due is not None and due > self.clock.now():
                    self.clock.advance(due - self.clock.now())
                await asyncio.sleep(0.002)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    store = MemoryStore()
    await store.open()
    clock = FakeClock(T0)
    world = World(store, clock, ScriptedSender(clock))

    yield world

    for event in world.sender.blocked.values():
        event.set()
    await world.stop()
    await store.close()


async def test_two_failures_then_a_success_take_three_attempts_on_the_ladder(
    world: World,
) -> None:
    url = "https://receiver.invalid/notify"
    world.sender.scripts[url] = [500, 500, 200]
    await world.add_endpoint(url, "1m,5m", "1h")
    sent = await world.send()
    world.start()

    await world.run_until(lambda: world.settled(sent.id))

    assert [(p.attempt_number, p.at) for p in world.sender.posts] == [
        (1, T0),
        (2, T0 + 60),
        (3, T0 + 60 + 300),
    ]
    # Every attempt carries the same notification id and the same bytes.
    assert {(p.msg_id, p.body) for p in world.sender.posts} == {(sent.id, BODY)}
    found = await world.store.get_notification(sent.id)
    assert found.status is NotificationStatus.DELIVERED
    (delivery,) = found.deliveries
    assert (delivery.status, delivery.attempt_count) == (DeliveryStatus.DELIVERED, 3)
    assert [(a.number, a.status_code, a.succeeded) for a in delivery.attempts] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    assert delivery.attempts[0].response_excerpt == b"answer 500"


async def test_a_receiver_that_always_refuses_is_exhausted_and_never_tried_after_the_window(
    world: World,
) -> None:
    url = "https://refusing.invalid/notify"
    world.sender.scripts[url] = [403]
    await world.add_endpoint(url, "1m", "200s")
    sent = await world.send()
    world.start()

    await world.run_until(lambda: world.settled(sent.id))

    # T0 + 240 would fall after the window (T0 + 200): four attempts, then give up.
    assert [(p.attempt_number, p.at) for p in world.sender.posts] == [
        (1, T0),
        (2, T0 + 60),
        (3, T0 + 120),
        (4, T0 + 180),
    ]
    world.clock.advance(86400.0)
    await asyncio.sleep(0.1)  # twenty polls of the store, a day after the window
    assert len(world.sender.posts) == 4

    found = await world.store.get_notification(sent.id)
    assert found.status is NotificationStatus.EXHAUSTED
    (delivery,) = found.deliveries
    assert (delivery.status, delivery.next_attempt_at) == (DeliveryStatus.EXHAUSTED, None)
    assert [(a.number, a.status_code) for a in delivery.attempts] == [
        (1, 403),
        (2, 403),
        (3, 403),
        (4, 403),
    ]
    # Operators hear about it on Tidings' own topic.
    page = await world.store.list_notifications(
        NotificationQuery(topic="tidings.delivery.exhausted")
    )
    (news,) = page.items
    report = json.loads(news.body)
    assert (report["delivery_id"], report["attempts"], report["last_status_code"]) == (
        delivery.id,
        4,
        403,
    )


async def test_the_per_endpoint_concurrency_cap_holds_and_a_slow_endpoint_holds_up_no_other(
    world: World,
) -> None:
    slow, fast = "https://slow.invalid/notify", "https://fast.invalid/notify"
    world.sender.scripts.update({slow: [200], fast: [200]})
    world.sender.blocked[slow] = asyncio.Event()
    await world.add_endpoint(slow, "1m", "1h")
    await world.add_endpoint(fast, "1m", "1h")
    for _ in range(8):
        await world.send()
    world.start(replace(CONFIG, endpoint_concurrency=2))

    async def delivered(count: int) -> bool:
        return await world.count(DeliveryStatus.DELIVERED) == count

    await world.run_until(lambda: delivered(8))
    assert len(world.sender.posts_to(fast)) == 8
    assert world.sender.in_flight[slow] == 2  # the rest wait for a slot

    world.sender.blocked[slow].set()
    await world.run_until(lambda: delivered(16))

    assert len(world.sender.posts_to(slow)) == 8
    assert world.sender.most_in_flight == Counter({slow: 2, fast: 2})


async def test_an_endpoint_that_never_answers_gets_only_its_first_slots_in_flight(
    world: World,
) -> None:
    hanging, fast = "https://hanging.invalid/notify", "https://fast.invalid/notify"
    world.sender.scripts.update({hanging: [200], fast: [200]})
    world.sender.blocked[hanging] = asyncio.Event()
    await world.add_endpoint(hanging, "1m", "1h")
    await world.add_endpoint(fast, "1m", "1h")
    for _ in range(30):
        await world.send()  # one delivery to each endpoint
    world.start()

    async def counted(status: DeliveryStatus, count: int) -> bool:
        return await world.count(status) == count

    await world.run_until(lambda: counted(DeliveryStatus.DELIVERED, 30))
    # Slow start: never an answer, so never more than its first slots in flight.
    assert world.sender.in_flight[hanging] == START_CAP
    assert world.sender.most_in_flight[hanging] == START_CAP

    world.sender.blocked[hanging].set()
    await world.run_until(lambda: counted(DeliveryStatus.DELIVERED, 60))
    assert len(world.sender.posts_to(hanging)) == 30


async def test_stopping_with_an_attempt_in_flight_records_it_interrupted_and_due_again(
    world: World,
) -> None:
    url = "https://hanging.invalid/notify"
    world.sender.scripts[url] = [200]
    world.sender.blocked[url] = asyncio.Event()  # never answers
    await world.add_endpoint(url, "1m", "1h")
    sent = await world.send()
    world.start()
    await asyncio.wait_for(world.sender.posted.wait(), 5)
    world.clock.advance(7.0)

    await world.stop()

    assert world.sender.in_flight[url] == 0  # the POST was cut short
    (delivery,) = (await world.store.get_notification(sent.id)).deliveries
    assert delivery.status is DeliveryStatus.PENDING
    assert delivery.next_attempt_at == T0 + 7.0
    (attempt,) = delivery.attempts
    assert (attempt.number, attempt.status_code) == (1, None)
    assert attempt.error_class is ErrorClass.INTERRUPTED
    assert attempt.error_detail == "the dispatcher stopped mid-attempt"
    (again,) = await world.store.claim_due(
        now=world.clock.now(), limit=10, lease_s=60.0, owner="next-dispatcher"
    )
    assert (again.delivery_id, again.attempt_number) == (delivery.id, 2)
