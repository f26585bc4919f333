"""Queue endpoints: notifications handed to subscriber groups on RabbitMQ, and their answers.

A queue endpoint (`queue://<group>`) takes its deliveries on `<prefix>.sub.<group>`. The
dispatcher publishes the stored body there and hands the delivery over to the group in the
store. The subscriber answers on `<prefix>.results`, which every dispatcher consumes, and the
answer is recorded like the answer to a POST: same ladder, window and circuit breaker. A
delivery given up on is copied to `<prefix>.sub.<group>.dead`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from tidings.brokers.base import Broker
from tidings.brokers.rabbitmq import redact_url
from tidings.clock import Clock
from tidings.dispatch.endpoints import EndpointCache
from tidings.dispatch.outcome import decide_outcome
from tidings.health import HealthPolicy
from tidings.models import Attempt, Claim, Endpoint, ErrorClass, Outcome, OutcomeKind
from tidings.operational import announce
from tidings.signing import webhook_headers
from tidings.stores.base import HAND_OVER_PREFIX, Store

log = logging.getLogger(__name__)

QUEUE_SCHEME = "queue://"
RESULT_ERROR_CHARS = 500
DELIVERY_ID_HEADER = "tidings-delivery-id"
ATTEMPT_HEADER = "tidings-attempt"
TOPIC_HEADER = "tidings-topic"
ERROR_HEADER = "tidings-error"
# Dots are left out so that no group's queue can be another group's dead-letter queue.
_GROUP = re.compile(r"[A-Za-z0-9_-]{1,100}")


def check_group(group: str) -> str:
    """Refuse a subscriber group name that cannot name a queue; returns it unchanged."""
    if not _GROUP.fullmatch(group):
        raise ValueError(
            f"subscriber group {group!r}: use 1 to 100 letters, digits, '_' or '-', e.g. 'accounts'"
        )
    return group


def group_of(url: str) -> str:
    """The subscriber group a queue endpoint's URL names: `queue://<group>`."""
    if not url.startswith(QUEUE_SCHEME):
        raise ValueError(
            f"a queue endpoint's URL is queue://<group>, e.g. queue://accounts; got {url!r}"
        )
    return check_group(url[len(QUEUE_SCHEME) :])


def subscriber_queue(prefix: str, group: str) -> str:
    """The durable queue a subscriber group consumes."""
    return f"{prefix}.sub.{group}"


def dead_letter_queue(prefix: str, group: str) -> str:
    """Where the deliveries given up on for a group are copied."""
    return f"{subscriber_queue(prefix, group)}.dead"


def results_queue(prefix: str) -> str:
    """The queue subscribers answer on; every dispatcher consumes it."""
    return f"{prefix}.results"


def message_headers(claim: Claim, secrets: tuple[str, ...], now: float) -> dict[str, str]:
    """The headers of one attempt: the Standard Webhooks three, and who and which try it is."""
    return {
        **webhook_headers(secrets, claim.notification_id, int(now), claim.body),
        DELIVERY_ID_HEADER: claim.delivery_id,
        ATTEMPT_HEADER: str(claim.attempt_number),
        TOPIC_HEADER: claim.topic,
    }


@dataclass(frozen=True)
class Result:
    """A subscriber's answer to one attempt, as it travels on `<prefix>.results`."""

    delivery_id: str
    attempt: int
    ok: bool
    error: str | None = None
    started_at: float = 0.0
    duration_ms: float = 0.0

    def to_bytes(self) -> bytes:
        """The JSON body of the result message."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def parse(cls, body: bytes) -> Result:
        """Read a result message; raises ValueError when it is not one."""
        try:
            data = json.loads(body)
            error = data.get("error")
            return cls(
                delivery_id=str(data["delivery_id"]),
                attempt=int(data["attempt"]),
                ok=data["ok"] is True,
                error=None if error is None else str(error)[:RESULT_ERROR_CHARS],
                started_at=float(data.get("started_at") or 0.0),
                duration_ms=float(data.get("duration_ms") or 0.0),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a result message: {exc}") from exc


class QueueDispatch:
    """The dispatcher's side of queue endpoints: hands deliveries over, records answers."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        store: Store,
        broker: Broker,
        endpoints: EndpointCache,
        clock: Clock,
        health: HealthPolicy,
        connect_timeout_s: float = 5.0,
        publish_timeout_s: float = 5.0,
        reconnect_interval_s: float = 1.0,
        prefetch_results: int = 32,
        shutdown_grace_s: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.reconnect_interval_s = reconnect_interval_s
        self.prefetch_results = prefetch_results
        self.shutdown_grace_s = shutdown_grace_s
        self._store = store
        self._broker = broker
        self._endpoints = endpoints
        self._clock = clock
        self._health = health
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._results: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._declared: set[str] = set()
        self._recording: set[asyncio.Task[object]] = set()
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and consume the results; if RabbitMQ is away, keep trying in the background."""
        self._closed = False
        try:
            await self._connect()
        except Exception as exc:
            await self._disconnect()
            log.warning(
                "cannot reach RabbitMQ at %s for queue endpoints yet (%s: %s); retrying",
                redact_url(self.url),
                type(exc).__name__,
                exc,
                extra={"action": "queue_connect_failed"},
            )
            self._connecting = asyncio.create_task(
                self._connect_until_up(), name="tidings-queue-connect"
            )

    async def _connect_until_up(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.reconnect_interval_s)
            try:
                await self._connect()
            except Exception:
                await self._disconnect()
                continue
            log.info("queue endpoints connected", extra={"action": "queue_connected"})
            return

    async def _connect(self) -> None:
        connection = self._connection = await asyncio.wait_for(
            aio_pika.connect_robust(
                self.url,
                timeout=self.connect_timeout_s,
                reconnect_interval=self.reconnect_interval_s,
                client_properties={"connection_name": f"tidings {self.prefix} queue endpoints"},
            ),
            self.connect_timeout_s * 2,
        )
        self._publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=self.prefetch_results)
        self._results = await consumer.declare_queue(results_queue(self.prefix), durable=True)
        self._consumer_tag = await self._results.consume(self._on_result)

    async def close(self) -> None:
        """Stop taking results, let those being recorded finish, and disconnect."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._results is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._results.cancel(self._consumer_tag), self.connect_timeout_s
                )
        if self._recording:
            # Unacked results go back on the queue for another dispatcher; waiting here
            # only saves recording them twice.
            await asyncio.wait(set(self._recording), timeout=self.shutdown_grace_s)
        await self._disconnect()

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._publisher = self._results = None
        self._consumer_tag = None
        self._declared.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self.connect_timeout_s)

    # handing over ----------------------------------------------------------------------

    async def hand_over(self, claim: Claim, endpoint: Endpoint) -> Outcome | None:
        """Publish the attempt to the group's queue and hand the delivery over to it.

        Returns None once handed over, or the outcome of a failed attempt when RabbitMQ
        did not take the message.
        """
        group = group_of(endpoint.url)
        queue_name = subscriber_queue(self.prefix, group)
        now = self._clock.now()
        until = self._due_back_at(claim, endpoint, now)
        started = time.perf_counter()
        message = aio_pika.Message(
            claim.body,
            headers=dict(message_headers(claim, endpoint.active_secrets(now), now)),
            content_type=claim.content_type,
            message_id=claim.notification_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            # Gone when the next attempt is due, so that a group that was away does not find
            # every earlier attempt waiting for it too.
            expiration=max(until - self._clock.now(), 0.001),
        )
        try:
            await self._publish(queue_name, message)
        except Exception as exc:
            attempt = Attempt(
                delivery_id=claim.delivery_id,
                number=claim.attempt_number,
                started_at=now,
                duration_ms=(time.perf_counter() - started) * 1000,
                succeeded=False,
                error_class=ErrorClass.ERROR,
                error_detail=f"could not publish to the RabbitMQ queue {queue_name}: "
                f"{type(exc).__name__}: {exc}"[:RESULT_ERROR_CHARS],
            )
            return decide_outcome(claim, endpoint, attempt, now=self._clock.now())
        if await self._store.hand_over(claim, until, HAND_OVER_PREFIX + group):
            try:
                await self._broker.publish_retry(claim.delivery_id, until)
            except Exception as exc:
                log.warning(
                    "could not announce when %s comes back (%s); the store poll will find it",
                    claim.delivery_id,
                    exc,
                    extra={"action": "announce_failed", "delivery_id": claim.delivery_id},
                )
        log.debug(
            "handed attempt %d of %s to subscriber group %s",
            claim.attempt_number,
            claim.notification_id,
            group,
            extra={
                "action": "handed_over",
                "notification_id": claim.notification_id,
                "delivery_id": claim.delivery_id,
                "endpoint": claim.endpoint_id,
                "attempt": claim.attempt_number,
            },
        )
        return None

    def _due_back_at(self, claim: Claim, endpoint: Endpoint, now: float) -> float:
        """When an unanswered attempt is taken back: when the ladder would try again had it
        timed out after the endpoint's timeout, as an HTTP attempt would have."""
        timed_out_at = now + endpoint.timeout_s
        decision = endpoint.schedule.after_failure(
            attempt_number=claim.attempt_number, deadline_at=claim.deadline_at, now=timed_out_at
        )
        if decision.next_attempt_at is not None:
            return decision.next_attempt_at
        # The last attempt: an answer counts until the window closes, and the claim that
        # takes it back after that gives the delivery up without another attempt.
        # Limitation: a delivery given up that way (its group never answered) is exhausted by
        # the store alone: it is not copied to the dead-letter queue, and its timeouts do not
        # feed the circuit breaker; it stays listed as exhausted for reconciliation.
        return max(timed_out_at, math.nextafter(claim.deadline_at, math.inf))

    def _ready_publisher(self) -> AbstractRobustChannel:
        connection, channel = self._connection, self._publisher
        if connection is None or channel is None:
            raise ConnectionError(f"not connected to RabbitMQ at {redact_url(self.url)}")
        if not connection.connected.is_set():
            # Fail at once: the attempt goes back on the ladder instead of stalling.
            raise ConnectionError(f"RabbitMQ at {redact_url(self.url)} is away; reconnecting")
        return channel

    async def _publish(self, queue_name: str, message: aio_pika.Message) -> None:
        channel = self._ready_publisher()
        if queue_name not in self._declared:
            await asyncio.wait_for(
                channel.declare_queue(queue_name, durable=True), self.publish_timeout_s
            )
            self._declared.add(queue_name)
        await asyncio.wait_for(
            channel.default_exchange.publish(message, routing_key=queue_name),
            self.publish_timeout_s,
        )

    # recording answers -----------------------------------------------------------------

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._recording.add(task)
        try:
            await self._take_result(message)
        finally:
            if task is not None:
                self._recording.discard(task)

    async def _take_result(self, message: AbstractIncomingMessage) -> None:
        try:
            result = Result.parse(message.body)
        except ValueError:
            log.warning(
                "dropped a malformed message on %s: %r",
                results_queue(self.prefix),
                message.body[:200],
                extra={"action": "malformed_result"},
            )
            await _settle(message, ack=True)
            return
        try:
            await self.record(result)
        except Exception:
            log.warning(
                "could not record the answer to attempt %d of %s; it goes back on the queue",
                result.attempt,
                result.delivery_id,
                exc_info=True,
                extra={"action": "record_retry", "delivery_id": result.delivery_id},
            )
            # Not at once: the store is likely away, and the answer would come right back.
            await asyncio.sleep(self.reconnect_interval_s)
            await _settle(message, ack=False)
            return
        await _settle(message, ack=True)

    async def record(self, result: Result) -> Outcome | None:
        """Record a subscriber's answer like an HTTP answer; None when it came too late."""
        claim = await self._store.get_claim(result.delivery_id, result.attempt)
        endpoint = None if claim is None else await self._endpoints.get(claim.endpoint_id)
        if claim is None or endpoint is None:
            # Limitation: an answer that comes after its attempt was taken back is dropped;
            # the next attempt goes on, and the subscriber sees the notification again.
            log.info(
                "dropped the late answer to attempt %d of %s: that attempt is over",
                result.attempt,
                result.delivery_id,
                extra={"action": "late_result", "delivery_id": result.delivery_id},
            )
            return None
        attempt = Attempt(
            delivery_id=claim.delivery_id,
            number=claim.attempt_number,
            started_at=result.started_at or self._clock.now(),
            duration_ms=result.duration_ms,
            succeeded=result.ok,
            error_class=None if result.ok else ErrorClass.HANDLER_ERROR,
            error_detail=None if result.ok else (result.error or "the handler failed"),
        )
        now = self._clock.now()
        outcome = decide_outcome(claim, endpoint, attempt, now=now)
        disabled = await self._store.record_outcomes([outcome], now, self._health)
        _log_outcome(outcome, now)
        if outcome.kind is OutcomeKind.EXHAUSTED:
            await self._dead_letter(claim, endpoint, outcome)
        await self._follow_up(outcome, disabled, now)
        return outcome

    async def _dead_letter(self, claim: Claim, endpoint: Endpoint, outcome: Outcome) -> None:
        group = group_of(endpoint.url)
        now = self._clock.now()
        headers = message_headers(claim, endpoint.active_secrets(now), now)
        headers[ERROR_HEADER] = outcome.attempt.error_detail or ""
        message = aio_pika.Message(
            claim.body,
            headers=dict(headers),
            content_type=claim.content_type,
            message_id=claim.notification_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._publish(dead_letter_queue(self.prefix, group), message)
        except Exception as exc:
            # Limitation: the copy is not tried again; the delivery stays listed as
            # exhausted in the store, where reconciliation finds it.
            log.error(
                "could not copy %s to the dead-letter queue of group %s: %s",
                claim.notification_id,
                group,
                exc,
                extra={"action": "dead_letter_failed", "delivery_id": claim.delivery_id},
            )

    async def _follow_up(self, outcome: Outcome, disabled: list[str], now: float) -> None:
        if outcome.kind is OutcomeKind.RETRY and outcome.next_attempt_at is not None:
            try:
                await self._broker.publish_retry(outcome.claim.delivery_id, outcome.next_attempt_at)
            except Exception as exc:
                log.warning(
                    "could not announce the retry of %s (%s); the store poll will find it",
                    outcome.claim.delivery_id,
                    exc,
                    extra={"action": "announce_failed", "delivery_id": outcome.claim.delivery_id},
                )
        if disabled or outcome.kind is OutcomeKind.EXHAUSTED:
            try:
                await announce(self._store, self._broker, [outcome], disabled, now)
            except Exception:
                log.exception(
                    "could not send operational notifications",
                    extra={"action": "operational_failed"},
                )


def _log_outcome(outcome: Outcome, now: float) -> None:
    claim = outcome.claim
    fields = {
        "notification_id": claim.notification_id,
        "delivery_id": claim.delivery_id,
        "endpoint": claim.endpoint_id,
        "attempt": claim.attempt_number,
        "error_class": outcome.attempt.error_class.value if outcome.attempt.error_class else None,
    }
    if outcome.kind is OutcomeKind.DELIVERED:
        log.debug(
            "subscriber handled %s", claim.notification_id, extra={"action": "delivered", **fields}
        )
    elif outcome.kind is OutcomeKind.RETRY:
        log.warning(
            "subscriber failed attempt %d of %s (%s); retrying in %.1fs",
            claim.attempt_number,
            claim.notification_id,
            outcome.attempt.error_detail,
            (outcome.next_attempt_at or now) - now,
            extra={"action": "retry", **fields},
        )
    else:
        log.error(
            "gave up on %s to %s after %d attempts (last: %s)",
            claim.notification_id,
            claim.endpoint_id,
            claim.attempt_number,
            outcome.attempt.error_detail,
            extra={"action": "exhausted", **fields},
        )


async def _settle(message: AbstractIncomingMessage, *, ack: bool) -> None:
    # A message from before a reconnect cannot be settled; RabbitMQ delivers it again, and
    # an answer recorded twice is dropped the second time (its attempt is over).
    with contextlib.suppress(Exception):
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=True)
