"""Queue subscribers: receivers that take notifications straight from RabbitMQ.

A subscriber group is a queue endpoint (`queue://<group>`) of the Tidings API: its
deliveries, attempts and statuses are listed next to the HTTP ones. Each message is one
attempt; the handler returning is the ack, the handler raising sends the notification back
on the endpoint's ladder, and the next attempt comes as a new message with the same id and
body.

    async def handle(message: Message) -> None:
        await credit(message.json())

    await Subscriber(
        "amqp://guest:guest@127.0.0.1:5672/", topic="recharge.succeeded", group="accounts"
    ).run(handle)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from tidings.brokers.rabbitmq import redact_url
from tidings.client import ApiError, Client
from tidings.dispatch.queue import (
    ATTEMPT_HEADER,
    DELIVERY_ID_HEADER,
    QUEUE_SCHEME,
    RESULT_ERROR_CHARS,
    TOPIC_HEADER,
    Result,
    check_group,
    results_queue,
    subscriber_queue,
)
from tidings.errors import TidingsError

log = logging.getLogger(__name__)

STDERR_TAIL_BYTES = 2048


@dataclass(frozen=True)
class Message:
    """One notification as a subscriber gets it: the stored bytes, its id and which try."""

    id: str  # the notification id: deduplicate on it
    body: bytes
    attempt: int
    topic: str
    delivery_id: str
    content_type: str
    # Every header, with the Standard Webhooks ones to verify the body against the secret.
    headers: Mapping[str, str]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @classmethod
    def of(cls, incoming: AbstractIncomingMessage) -> Message:
        """Read a message of a subscriber queue; raises ValueError when Tidings did not
        send it."""
        headers = {name: _text(value) for name, value in (incoming.headers or {}).items()}
        try:
            return cls(
                id=headers["webhook-id"],
                body=incoming.body,
                attempt=int(headers[ATTEMPT_HEADER]),
                topic=headers[TOPIC_HEADER],
                delivery_id=headers[DELIVERY_ID_HEADER],
                content_type=incoming.content_type or "application/octet-stream",
                headers=headers,
            )
        except KeyError as exc:
            raise ValueError(f"not a Tidings message: no {exc} header") from exc


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


Handler = Callable[[Message], Awaitable[object]]
"""Handles one message; returning acks it, raising sends it back on the ladder."""


class Subscriber:
    """Consumes one subscriber group's queue and answers every message: handled, or failed.

    The group's endpoint is found through the Tidings API, or registered there with
    `retry_schedule`, `window` and `timeout` (the time one message may take) when it does
    not exist yet; both need an admin API key when the API asks for keys.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        topic: str,
        group: str,
        tidings_url: str = "http://127.0.0.1:8080",
        api_key: str | None = None,
        prefix: str = "tidings",
        retry_schedule: str | list[str] | None = None,
        window: str | None = None,
        timeout: str | float = "30s",
        concurrency: int = 1,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.broker_url = broker_url
        self.topic = topic
        self.group = check_group(group)
        self.tidings_url = tidings_url
        self.api_key = api_key
        self.prefix = prefix
        self.retry_schedule = retry_schedule
        self.window = window
        self.timeout = timeout
        self.concurrency = concurrency
        self.connect_timeout_s = connect_timeout_s
        self.queue_name = subscriber_queue(prefix, group)
        self.ready = asyncio.Event()  # set while consuming
        self._handling: set[asyncio.Task[object]] = set()

    @property
    def endpoint_url(self) -> str:
        """The URL of this group's queue endpoint."""
        return QUEUE_SCHEME + self.group

    async def ensure_endpoint(self) -> dict[str, Any]:
        """This group's queue endpoint, registered through the Tidings API if need be."""
        return await asyncio.to_thread(self._ensure_endpoint)

    def _ensure_endpoint(self) -> dict[str, Any]:
        with Client(self.tidings_url, self.api_key) as client:
            found = self._find_endpoint(client)
            if found is not None:
                return found
            try:
                made: dict[str, Any] = client.add_endpoint(
                    self.endpoint_url,
                    [self.topic],
                    kind="queue",
                    retry_schedule=self.retry_schedule,
                    window=self.window,
                    timeout=self.timeout,
                    description=f"subscriber group {self.group}",
                )
            except ApiError as exc:
                # Another member of the group registered it a moment ago.
                found = self._find_endpoint(client) if exc.status == 409 else None
                if found is None:
                    raise
                return found
            log.info(
                "registered subscriber group %s as endpoint %s",
                self.group,
                made["id"],
                extra={"action": "endpoint_added", "endpoint": made["id"]},
            )
            return made

    def _find_endpoint(self, client: Client) -> dict[str, Any] | None:
        for endpoint in client.endpoints():
            if endpoint["kind"] != "queue" or endpoint["url"] != self.endpoint_url:
                continue
            if self.topic not in endpoint["topics"] and "*" not in endpoint["topics"]:
                raise TidingsError(
                    f"subscriber group {self.group!r} is endpoint {endpoint['id']} for "
                    f"topics {endpoint['topics']}, not {self.topic!r}; add the topic to it "
                    f"(PATCH /v1/endpoints/{endpoint['id']}) or name another group"
                )
            return endpoint
        return None

    async def run(self, handler: Handler, stop: asyncio.Event | None = None) -> None:
        """Handle messages until `stop` is set (forever without one); messages being
        handled then are finished and answered first."""
        await self.ensure_endpoint()
        try:
            connection = await aio_pika.connect_robust(
                self.broker_url,
                timeout=self.connect_timeout_s,
                client_properties={"connection_name": f"tidings subscriber {self.group}"},
            )
        except Exception as exc:
            raise TidingsError(
                f"cannot reach RabbitMQ at {redact_url(self.broker_url)} "
                f"({type(exc).__name__}: {exc}); start it or fix the broker URL"
            ) from exc
        try:
            publisher = await connection.channel(publisher_confirms=True)
            await publisher.declare_queue(results_queue(self.prefix), durable=True)
            consumer = await connection.channel()
            await consumer.set_qos(prefetch_count=self.concurrency)
            queue = await consumer.declare_queue(self.queue_name, durable=True)
            tag = await queue.consume(partial(self._on_message, handler, publisher))
            log.info(
                "subscriber group %s consuming %s",
                self.group,
                self.queue_name,
                extra={"action": "subscriber_start"},
            )
            self.ready.set()
            await (stop or asyncio.Event()).wait()
            await queue.cancel(tag)
            if self._handling:
                await asyncio.wait(set(self._handling))
        finally:
            self.ready.clear()
            with contextlib.suppress(Exception):
                await connection.close()
            log.info("subscriber group %s stopped", self.group, extra={"action": "subscriber_stop"})

    async def _on_message(
        self, handler: Handler, publisher: AbstractChannel, incoming: AbstractIncomingMessage
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handling.add(task)
        try:
            await self._handle(handler, publisher, incoming)
        finally:
            if task is not None:
                self._handling.discard(task)

    async def _handle(
        self, handler: Handler, publisher: AbstractChannel, incoming: AbstractIncomingMessage
    ) -> None:
        try:
            message = Message.of(incoming)
        except ValueError as exc:
            log.warning(
                "dropped a message on %s: %s", self.queue_name, exc, extra={"action": "malformed"}
            )
            await incoming.reject(requeue=False)
            return
        started_at, clock = time.time(), time.perf_counter()
        try:
            await handler(message)
        except Exception as exc:
            error: str | None = f"{type(exc).__name__}: {exc}"[:RESULT_ERROR_CHARS]
            log.warning(
                "handler failed attempt %d of %s: %s",
                message.attempt,
                message.id,
                error,
                extra={"action": "handler_failed", "notification_id": message.id},
            )
        else:
            error = None
        result = Result(
            delivery_id=message.delivery_id,
            attempt=message.attempt,
            ok=error is None,
            error=error,
            started_at=started_at,
            duration_ms=(time.perf_counter() - clock) * 1000,
        )
        try:
            await publisher.default_exchange.publish(
                aio_pika.Message(
                    result.to_bytes(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=results_queue(self.prefix),
            )
        except Exception as exc:
            # Unanswered and unacked: RabbitMQ gives the message again (after a reconnect).
            log.warning(
                "could not send the answer to attempt %d of %s (%s); it will be handled again",
                message.attempt,
                message.id,
                exc,
                extra={"action": "answer_failed", "notification_id": message.id},
            )
            with contextlib.suppress(Exception):
                await incoming.nack(requeue=True)
            return
        # Acked only once the answer is safe with RabbitMQ, so neither can be lost.
        await incoming.ack()


class CommandFailed(TidingsError):
    """The command run for a message did not exit 0."""

    code = "command_failed"


def command_handler(command: str, *, timeout_s: float | None = None) -> Handler:
    """A handler that runs a shell command per message: the body on stdin, the id, attempt
    and topic in TIDINGS_NOTIFICATION_ID, TIDINGS_ATTEMPT and TIDINGS_TOPIC; exit 0 acks,
    any other exit fails the attempt with the tail of stderr."""

    async def run_command(message: Message) -> None:
        env = {
            **os.environ,
            "TIDINGS_NOTIFICATION_ID": message.id,
            "TIDINGS_ATTEMPT": str(message.attempt),
            "TIDINGS_TOPIC": message.topic,
            "TIDINGS_DELIVERY_ID": message.delivery_id,
            "TIDINGS_CONTENT_TYPE": message.content_type,
        }
        process = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # so a timeout kills what the shell started too
        )
        try:
            _, stderr = await asyncio.wait_for(process.communicate(message.body), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise CommandFailed(f"killed after {timeout_s:g}s without exiting") from None
        if process.returncode != 0:
            tail = stderr[-STDERR_TAIL_BYTES:].decode("utf-8", "replace").strip()
            raise CommandFailed(f"exit {process.returncode}" + (f": {tail}" if tail else ""))

    return run_command
