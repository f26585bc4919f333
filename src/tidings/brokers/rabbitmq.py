"""The RabbitMQ broker: due deliveries travel as ids on durable queues; delays use TTL queues."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from tidings.brokers.base import Broker
from tidings.clock import Clock, SystemClock
from tidings.errors import BrokerUnavailable

log = logging.getLogger(__name__)

# The delay queues, in milliseconds. RabbitMQ expires messages only from the head of a queue,
# so one queue mixing a 10 h message with a 1 s one behind it would hold the 1 s one for 10 h.
# Every delay queue has one TTL for all its messages instead: they expire in the order they
# arrived, and no message waits behind a longer one. A delay is rounded down to a bucket;
# when the message comes back early, the rest of the wait goes through a smaller bucket.
DELAY_BUCKETS_MS = (
    1_000,
    2_000,
    5_000,
    10_000,
    15_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    1_800_000,
    3_600_000,
    7_200_000,
    18_000_000,
    36_000_000,
)
IDS_PER_MESSAGE = 100
_LATE_OK_MS = 50
_LATE_OK_FRACTION = 0.01
_SMALLEST_DELAY_S = DELAY_BUCKETS_MS[0] / 1000


def delay_bucket_ms(wait_s: float) -> int | None:
    """The delay queue for a wait: the longest bucket not over it; None under the smallest.

    A bucket a little over the wait still counts (50 ms or 1 %, far inside the ladder's
    jitter), so that a 60 s step decided a few milliseconds ago takes the 60 s queue rather
    than five hops through smaller ones.
    """
    wait_ms = wait_s * 1000
    wait_ms += max(_LATE_OK_MS, wait_ms * _LATE_OK_FRACTION)
    fitting = [bucket for bucket in DELAY_BUCKETS_MS if bucket <= wait_ms]
    return fitting[-1] if fitting else None


def redact_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "<unparseable broker URL>"
    return str(parsed.with_password("***")) if parsed.password else url


class RabbitBroker(Broker):
    """Carries due delivery ids on RabbitMQ; any number of dispatchers share the work queue.

    Queues, all durable: `<prefix>.due` (ids due now, persistent messages) and
    `<prefix>.delay.<ms>` (declared on demand: the message TTL is `ms`, then it is
    dead-lettered back to `<prefix>.due`). The store stays the source of truth: a lost
    message delays a delivery by at most `store_poll_interval_s`.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tidings",
        clock: Clock | None = None,
        store_poll_interval_s: float = 2.0,
        connect_timeout_s: float = 5.0,
        publish_timeout_s: float = 5.0,
        reconnect_interval_s: float = 1.0,
        prefetch_messages: int = 32,
        max_ids_per_wait: int = 200,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.work_queue_name = f"{prefix}.due"
        self.store_poll_interval_s = store_poll_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.reconnect_interval_s = reconnect_interval_s
        self.prefetch_messages = prefetch_messages
        self.max_ids_per_wait = max_ids_per_wait
        self._clock = clock or SystemClock()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._consumer: AbstractRobustChannel | None = None
        self._work_queue: AbstractQueue | None = None
        self._delay_queues: set[str] = set()
        self._consuming = False
        # Announced ids waiting for the dispatcher, with the message to ack once taken.
        self._arrived: deque[tuple[AbstractIncomingMessage | None, list[str]]] = deque()
        self._news = asyncio.Event()
        self._held: set[asyncio.TimerHandle] = set()
        self._last_store_look = time.monotonic()
        self._closed = False

    @property
    def safe_url(self) -> str:
        """The broker URL without its password."""
        return redact_url(self.url)

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, open a publishing and a consuming channel, declare the work queue."""
        self._closed = False
        try:
            await asyncio.wait_for(self._connect(), self.connect_timeout_s * 2)
        except Exception as exc:
            await self._disconnect()
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ at {self.safe_url} ({type(exc).__name__}: {exc}); "
                "start it (e.g. `rabbitmq-server -detached`) or fix TIDINGS_BROKER_URL, "
                "or unset TIDINGS_BROKER_URL to run with the embedded broker"
            ) from exc
        log.info(
            "connected to RabbitMQ at %s (queues %s.*)",
            self.safe_url,
            self.prefix,
            extra={"action": "broker_connected"},
        )

    async def _connect(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self.url,
            timeout=self.connect_timeout_s,
            reconnect_interval=self.reconnect_interval_s,
            client_properties={"connection_name": f"tidings {self.prefix}"},
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._publisher = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._consumer = await self._connection.channel()
        await self._consumer.set_qos(prefetch_count=self.prefetch_messages)
        await self._publisher.declare_queue(self.work_queue_name, durable=True)
        self._work_queue = await self._consumer.declare_queue(self.work_queue_name, durable=True)

    async def close(self) -> None:
        """Stop waiting, forget held ids (the store has them), and disconnect."""
        self._closed = True
        self._news.set()
        for handle in self._held:
            handle.cancel()
        self._held.clear()
        self._arrived.clear()
        await self._disconnect()

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._publisher = self._consumer = self._work_queue = None
        self._consuming = False
        self._delay_queues.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self.connect_timeout_s)

    def _on_connection_lost(self, *_: object) -> None:
        if not self._closed:
            log.warning(
                "lost the connection to RabbitMQ at %s; reconnecting, and looking in the "
                "store meanwhile",
                self.safe_url,
                extra={"action": "broker_disconnected"},
            )
        self._news.set()  # a waiting dispatcher switches to the short store poll

    def _on_reconnect(self, *_: object) -> None:
        log.info(
            "reconnected to RabbitMQ at %s", self.safe_url, extra={"action": "broker_reconnected"}
        )
        # Messages taken before the drop cannot be acked any more; RabbitMQ redelivers them.
        self._arrived = deque((m, ids) for m, ids in self._arrived if m is None)
        # News published while RabbitMQ was away is lost: look in the store at once.
        self._last_store_look = float("-inf")
        self._news.set()

    # publishing ------------------------------------------------------------------------

    async def publish_due(self, delivery_ids: Sequence[str]) -> None:
        """Announce due deliveries; on failure log it, since the store poll finds them."""
        now = self._clock.now()
        for start in range(0, len(delivery_ids), IDS_PER_MESSAGE):
            chunk = list(delivery_ids[start : start + IDS_PER_MESSAGE])
            try:
                await self._publish(self.work_queue_name, chunk, now)
            except BrokerUnavailable as exc:
                log.warning(
                    "could not announce %d due deliveries (%s); the store poll will find them",
                    len(delivery_ids) - start,
                    exc,
                    extra={"action": "announce_failed"},
                )
                return

    async def publish_retry(self, delivery_id: str, due_at: float) -> None:
        """Park the id in the delay queue for its wait; raises BrokerUnavailable."""
        await self._schedule([delivery_id], due_at)

    async def _schedule(self, delivery_ids: list[str], due_at: float) -> None:
        # Limitation: the wait is measured on the service's clock but RabbitMQ's TTLs run on
        # the wall clock; under a FakeClock, parked ids come back in real seconds.
        bucket_ms = delay_bucket_ms(due_at - self._clock.now())
        if bucket_ms is None:
            # Due within a second: the consumer holds it in memory for the rest of the wait.
            await self._publish(self.work_queue_name, delivery_ids, due_at)
            return
        queue_name = await self._delay_queue(bucket_ms)
        await self._publish(queue_name, delivery_ids, due_at)

    async def _delay_queue(self, bucket_ms: int) -> str:
        name = f"{self.prefix}.delay.{bucket_ms}"
        if name in self._delay_queues:
            return name
        channel = self._ready_publisher()
        arguments: dict[str, str | int] = {
            "x-message-ttl": bucket_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.work_queue_name,
        }
        try:
            await asyncio.wait_for(
                channel.declare_queue(name, durable=True, arguments=arguments),
                self.publish_timeout_s,
            )
        except Exception as exc:
            raise BrokerUnavailable(
                f"could not declare {name} on RabbitMQ at {self.safe_url}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._delay_queues.add(name)
        return name

    def _ready_publisher(self) -> AbstractRobustChannel:
        connection, channel = self._connection, self._publisher
        if connection is None or channel is None:
            raise BrokerUnavailable(f"the broker for {self.safe_url} is not started")
        if not connection.connected.is_set():
            # Fail at once: waiting for the reconnect would stall whoever publishes.
            raise BrokerUnavailable(f"RabbitMQ at {self.safe_url} is away; reconnecting")
        return channel

    async def _publish(self, routing_key: str, delivery_ids: list[str], due_at: float) -> None:
        channel = self._ready_publisher()
        message = aio_pika.Message(
            json.dumps({"ids": delivery_ids, "due_at": due_at}).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await asyncio.wait_for(
                channel.default_exchange.publish(message, routing_key=routing_key),
                self.publish_timeout_s,
            )
        except Exception as exc:
            raise BrokerUnavailable(
                f"RabbitMQ at {self.safe_url} did not confirm a message to {routing_key}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    # consuming -------------------------------------------------------------------------

    async def wait_due(self, timeout_s: float) -> list[str] | None:
        """Announced ids as soon as they arrive; None once per store poll interval.

        This broker carries the news itself, so the dispatcher looks in the store only
        every `store_poll_interval_s` (or `timeout_s`, if longer), also under steady
        traffic, to pick up ids whose message was lost. While RabbitMQ is away no news
        comes, so it looks every `timeout_s`, as with the embedded broker, and once more
        right after the reconnect.
        """
        await self._start_consuming(timeout_s)
        while not self._closed:
            if self._arrived:
                return await self._take()
            left_s = self._last_store_look + self._poll_every_s(timeout_s) - time.monotonic()
            if left_s <= 0:
                break
            self._news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), left_s)
        self._last_store_look = time.monotonic()
        return None

    def _poll_every_s(self, timeout_s: float) -> float:
        connection = self._connection
        if connection is None or not connection.connected.is_set():
            return timeout_s
        return max(timeout_s, self.store_poll_interval_s)

    async def _start_consuming(self, timeout_s: float) -> None:
        # Lazily: an API-only process publishes but must not take the dispatchers' news.
        if self._consuming or self._work_queue is None:
            return
        try:
            await asyncio.wait_for(self._work_queue.consume(self._on_message), timeout_s)
        except Exception as exc:
            log.warning(
                "cannot consume %s yet (%s: %s); looking in the store meanwhile",
                self.work_queue_name,
                type(exc).__name__,
                exc,
                extra={"action": "consume_failed"},
            )
            return
        self._consuming = True

    async def _take(self) -> list[str]:
        # Limitation: ids the dispatcher cannot claim right now (it is full, or their
        # endpoint is busy or held back) are not announced again; its next look in the
        # store finds them, up to `store_poll_interval_s` later.
        taken: list[str] = []
        while self._arrived and len(taken) < self.max_ids_per_wait:
            message, delivery_ids = self._arrived.popleft()
            taken.extend(delivery_ids)
            if message is not None:
                await _ack(message)
        return list(dict.fromkeys(taken))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            news = json.loads(message.body)
            delivery_ids = [str(item) for item in news["ids"]]
            due_at = float(news.get("due_at") or 0.0)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning(
                "dropped a malformed message on %s: %r",
                self.work_queue_name,
                message.body[:200],
                extra={"action": "malformed_message"},
            )
            await _ack(message)
            return
        wait_s = due_at - self._clock.now()
        if wait_s <= 0:
            self._arrived.append((message, delivery_ids))
            self._news.set()
            return
        if wait_s < _SMALLEST_DELAY_S:
            self._hold(delivery_ids, wait_s)
        else:
            try:
                await self._schedule(delivery_ids, due_at)
            except BrokerUnavailable as exc:
                log.warning(
                    "could not park %d ids for their remaining %.1fs (%s); the store poll "
                    "will find them",
                    len(delivery_ids),
                    wait_s,
                    exc,
                    extra={"action": "announce_failed"},
                )
        await _ack(message)

    def _hold(self, delivery_ids: list[str], wait_s: float) -> None:
        """Keep ids due within a second in memory; if this process dies, the store has them."""
        loop = asyncio.get_running_loop()

        def release() -> None:
            self._held.discard(handle)
            if not self._closed:
                self._arrived.append((None, delivery_ids))
                self._news.set()

        handle = loop.call_later(wait_s, release)
        self._held.add(handle)


async def _ack(message: AbstractIncomingMessage) -> None:
    # A message from before a reconnect cannot be acked; RabbitMQ delivers it again, and a
    # repeated id is harmless since the store's lease decides who attempts a delivery.
    with contextlib.suppress(Exception):
        await message.ack()
