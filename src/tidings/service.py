"""The service: the operations notifiers, receivers and operators ask for, over one store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from tidings.auth import ApiKey, NewKey, Scope, make_key
from tidings.brokers import open_broker
from tidings.brokers.base import Broker
from tidings.brokers.embedded import EmbeddedBroker
from tidings.clock import Clock, SystemClock
from tidings.dispatch.dispatcher import Dispatcher, DispatcherConfig
from tidings.dispatch.http import HttpSender
from tidings.durations import parse_duration_s
from tidings.errors import Conflict, InvalidInput, PayloadTooLarge
from tidings.guard import AddressGuard
from tidings.health import HealthPolicy
from tidings.models import Endpoint, EndpointKind, NewNotification, Notification, new_id
from tidings.retention import Purger
from tidings.schedule import RetrySchedule
from tidings.settings import Settings
from tidings.signing import generate_secret, secret_key
from tidings.stores import open_store
from tidings.stores.base import NotificationQuery, Page, Store
from tidings.success import SuccessRule

log = logging.getLogger(__name__)

_MAX_TOPIC_CHARS = 200
# How long a looked-up API key is trusted without asking the store again.
KEY_CACHE_S = 1.0


@dataclass(frozen=True)
class EndpointSpec:
    """What an operator gives to register or change an endpoint; None keeps the default."""

    url: str | None = None
    topics: list[str] | None = None
    secret: str | None = None
    retry_schedule: str | list[str] | None = None
    window: str | float | None = None
    success: Any = None
    timeout: str | float | None = None
    description: str | None = None
    enabled: bool | None = None
    kind: EndpointKind | None = None
    rate_limit_per_s: float | None = None
    max_in_flight: int | None = None


def check_text(value: str, field: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate) or holds NUL, naming the field."""
    if "\x00" in value:
        raise InvalidInput(f"{field}: contains a NUL character (\\u0000); remove it", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{field}: contains a lone surrogate, which is not valid Unicode", field=field
        ) from exc
    return value


def check_secret(secret: str) -> str:
    """Accept only Standard Webhooks secrets, so receivers' libraries verify them as given."""
    try:
        key = secret_key(secret) if secret.startswith("whsec_") else b""
    except ValueError:
        key = b""
    if not 16 <= len(key) <= 64:
        raise InvalidInput(
            "secret: use the Standard Webhooks form whsec_<base64 of 16 to 64 random bytes>, "
            "or leave it out and Tidings generates one",
            field="secret",
        )
    return secret


def check_topic(topic: str, field: str = "topic") -> str:
    """Refuse empty, overlong or whitespace-carrying topics."""
    check_text(topic, field)
    if not topic or len(topic) > _MAX_TOPIC_CHARS or any(ch.isspace() for ch in topic):
        raise InvalidInput(
            f"{field}: a topic is 1 to {_MAX_TOPIC_CHARS} characters without spaces, "
            f"e.g. 'recharge.succeeded'; got {topic!r}",
            field=field,
        )
    return topic


class Service:
    """Tidings in one object: store, broker, dispatcher, and the rules around them."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        broker: Broker | None = None,
        clock: Clock | None = None,
        run_dispatcher: bool = True,
    ) -> None:
        settings.check()
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store = store or open_store(settings.database_url)
        self.broker = broker or open_broker(
            settings.broker_url,
            prefix=settings.broker_prefix,
            clock=self.clock,
            store_poll_interval_s=settings.store_poll_interval_s,
        )
        self.guard = AddressGuard(
            allow_private=settings.allow_private_networks,
            allowed_ports=frozenset(settings.allowed_ports) if settings.allowed_ports else None,
        )
        self.run_dispatcher = run_dispatcher
        self.dispatcher: Dispatcher | None = None
        self._dispatcher_task: asyncio.Task[None] | None = None
        self._sender: HttpSender | None = None
        self._purger: Purger | None = None
        self._keys: dict[str, tuple[float, ApiKey]] = {}

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and the broker; start the dispatcher (and the purge) when asked to."""
        await self.store.open()
        await self.broker.start()
        if self.run_dispatcher:
            await self.start_dispatcher()
            # Where dispatchers run, so a process that only serves the API never deletes.
            self._purger = Purger.for_store(self.store, self.settings, self.clock)
            if self._purger is not None:
                self._purger.start()

    async def start_dispatcher(self) -> None:
        """Start a dispatcher in this process."""
        s = self.settings
        self._sender = HttpSender(
            self.guard,
            excerpt_bytes=s.response_excerpt_bytes,
            connect_timeout_s=s.connect_timeout_s,
            max_connections=s.max_in_flight,
        )
        await self._sender.start()
        config = DispatcherConfig(
            lease_s=s.lease_s,
            claim_batch=s.claim_batch,
            max_in_flight=s.max_in_flight,
            endpoint_concurrency=s.endpoint_concurrency,
            poll_interval_s=s.poll_interval_s,
            max_crashes=s.max_crashes,
            excerpt_bytes=s.response_excerpt_bytes,
            shutdown_grace_s=s.shutdown_grace_s,
            jitter=s.jitter,
            fault_injection=s.fault_injection,
            health=HealthPolicy(
                breaker_threshold=s.breaker_threshold,
                breaker_cooldown_s=s.breaker_cooldown_s,
                breaker_max_cooldown_s=s.breaker_max_cooldown_s,
                disable_after_s=s.disable_after_s,
            ),
        )
        self.dispatcher = Dispatcher(self.store, self.broker, self._sender, config, self.clock)
        self._dispatcher_task = asyncio.create_task(
            self.dispatcher.run(), name="tidings-dispatcher"
        )
        self._dispatcher_task.add_done_callback(_report_crash)

    async def stop(self) -> None:
        """Stop the dispatcher (in-flight attempts finish or are handed back), then close."""
        if self._purger is not None:
            await self._purger.stop()
        if self.dispatcher is not None and self._dispatcher_task is not None:
            self.dispatcher.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher_task
        if self._sender is not None:
            await self._sender.close()
        await self.broker.close()
        await self.store.close()

    # endpoints -------------------------------------------------------------------------

    def _build_endpoint(self, spec: EndpointSpec, base: Endpoint | None) -> Endpoint:
        now = self.clock.now()
        kind = spec.kind or (base.kind if base else EndpointKind.HTTP)
        url = spec.url if spec.url is not None else (base.url if base else None)
        if url is None:
            raise InvalidInput("url: required, e.g. 'https://example.com/notify'", field="url")
        if kind is EndpointKind.HTTP:
            self.guard.check_url(url)
        else:
            self._check_queue_url(url)
        topics = spec.topics if spec.topics is not None else (list(base.topics) if base else None)
        if not topics:
            raise InvalidInput("topics: give at least one topic, or '*' for all", field="topics")
        for index, topic in enumerate(topics):
            check_topic(topic, f"topics[{index}]")
        if spec.retry_schedule is not None or spec.window is not None or base is None:
            ladder = spec.retry_schedule
            if ladder is None:
                ladder = base.schedule.describe() if base else self.settings.default_retry_schedule
            window = spec.window
            if window is None:
                window = base.schedule.window_s if base else self.settings.default_window
            schedule = RetrySchedule.parse(ladder, window, jitter=self.settings.jitter)
        else:
            schedule = base.schedule
        success = (
            SuccessRule.parse(spec.success)
            if spec.success is not None
            else (base.success if base else SuccessRule())
        )
        timeout_s = (
            parse_duration_s(spec.timeout, field="timeout")
            if spec.timeout is not None
            else (base.timeout_s if base else self.settings.default_timeout_s)
        )
        longest_s = self.settings.lease_s - self.settings.connect_timeout_s
        # A queue endpoint's timeout is the subscriber's time, not the dispatcher's lease.
        if kind is EndpointKind.HTTP and timeout_s >= longest_s:
            raise InvalidInput(
                f"timeout: {timeout_s:g}s is too long; it must be shorter than "
                f"{longest_s:g}s (TIDINGS_LEASE_S minus TIDINGS_CONNECT_TIMEOUT_S)",
                field="timeout",
            )
        if spec.secret is not None:
            check_secret(spec.secret)
        secrets = (
            (spec.secret,) if spec.secret else (base.secrets if base else (generate_secret(),))
        )
        secrets_expire_at = () if spec.secret or base is None else base.secrets_expire_at
        return Endpoint(
            id=base.id if base else new_id("ep_"),
            url=url,
            kind=kind,
            topics=tuple(dict.fromkeys(topics)),
            secrets=secrets,
            secrets_expire_at=secrets_expire_at,
            schedule=schedule,
            success=success,
            timeout_s=timeout_s,
            enabled=spec.enabled if spec.enabled is not None else (base.enabled if base else True),
            description=spec.description
            if spec.description is not None
            else (base.description if base else ""),
            created_at=base.created_at if base else now,
            rate_limit_per_s=spec.rate_limit_per_s
            if spec.rate_limit_per_s is not None
            else (base.rate_limit_per_s if base else None),
            max_in_flight=spec.max_in_flight
            if spec.max_in_flight is not None
            else (base.max_in_flight if base else None),
        )

    def _check_queue_url(self, url: str) -> None:
        """A queue endpoint names its subscriber group, and needs RabbitMQ to carry it."""
        if isinstance(self.broker, EmbeddedBroker):
            raise InvalidInput(
                "kind: queue endpoints need RabbitMQ, and this service runs on the embedded "
                "broker; set TIDINGS_BROKER_URL=amqp://user:password@host:5672/ on the API "
                "and the dispatchers, or register an http endpoint",
                field="kind",
            )
        from tidings.dispatch.queue import group_of  # needs aio-pika, there with RabbitMQ

        try:
            group_of(url)
        except ValueError as exc:
            raise InvalidInput(f"url: {exc}", field="url") from exc

    async def add_endpoint(self, spec: EndpointSpec) -> Endpoint:
        """Register an endpoint; a secret is generated when none is given."""
        endpoint = self._build_endpoint(spec, None)
        if endpoint.kind is EndpointKind.QUEUE:
            # Two endpoints of one group would put every notification on its queue twice.
            for other in await self.store.list_endpoints():
                if other.kind is EndpointKind.QUEUE and other.url == endpoint.url:
                    raise Conflict(
                        f"subscriber group {endpoint.url} is endpoint {other.id} already; "
                        "change that one, or name another group"
                    )
        await self.store.add_endpoint(endpoint)
        log.info(
            "endpoint %s added for %s",
            endpoint.id,
            ",".join(endpoint.topics),
            extra={"action": "endpoint_added", "endpoint": endpoint.id},
        )
        return endpoint

    async def change_endpoint(self, endpoint_id: str, spec: EndpointSpec) -> Endpoint:
        """Change some fields of an endpoint."""
        base = await self.store.get_endpoint(endpoint_id)
        endpoint = self._build_endpoint(spec, base)
        await self.store.replace_endpoint(endpoint, self.clock.now())
        if self.dispatcher is not None:
            self.dispatcher.endpoints.forget(endpoint_id)
        return endpoint

    async def rotate_secret(
        self, endpoint_id: str, secret: str | None, grace: str | float
    ) -> Endpoint:
        """Sign with a new secret from now on; the old ones also sign until `grace` ends."""
        base = await self.store.get_endpoint(endpoint_id)
        now = self.clock.now()
        retire_at = now + parse_duration_s(grace, field="grace")
        expiry = base.secrets_expire_at or (None,) * len(base.secrets)
        kept = [
            (old, retire_at if end is None else min(end, retire_at))
            for old, end in zip(base.secrets, expiry, strict=True)
            if end is None or end > now
        ]
        fresh = check_secret(secret) if secret else generate_secret()
        endpoint = replace(
            base,
            secrets=(fresh, *(old for old, _ in kept)),
            secrets_expire_at=(None, *(end for _, end in kept)),
        )
        await self.store.replace_endpoint(endpoint, now)
        if self.dispatcher is not None:
            self.dispatcher.endpoints.forget(endpoint_id)
        log.info(
            "endpoint %s secret rotated",
            endpoint_id,
            extra={"action": "secret_rotated", "endpoint": endpoint_id},
        )
        return endpoint

    async def remove_endpoint(self, endpoint_id: str) -> int:
        """Remove an endpoint; its unfinished deliveries are cancelled."""
        cancelled = await self.store.remove_endpoint(endpoint_id, self.clock.now())
        if self.dispatcher is not None:
            self.dispatcher.endpoints.forget(endpoint_id)
        return cancelled

    # API keys --------------------------------------------------------------------------

    async def create_key(
        self,
        scope: Scope,
        *,
        name: str = "",
        topics: tuple[str, ...] = ("*",),
        endpoint_ids: tuple[str, ...] = (),
    ) -> NewKey:
        """Make an API key; its plain text is returned once and never stored."""
        for endpoint_id in endpoint_ids:
            await self.store.get_endpoint(endpoint_id)  # NotFound names the bad id
        for index, topic in enumerate(topics):
            if topic != "*":
                check_topic(topic, f"topics[{index}]")
        made = make_key(
            new_id("key_"),
            scope,
            self.clock.now(),
            name=name,
            topics=topics,
            endpoint_ids=endpoint_ids,
        )
        await self.store.add_key(made.record)
        log.info(
            "API key %s created with scope %s",
            made.record.id,
            scope.value,
            extra={"action": "key_created"},
        )
        return made

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash; asked of the store at most once a second per key.

        Every API request checks its key, and a store round trip per request was a tenth of
        the cost of a send under load.
        """
        now = time.monotonic()
        cached = self._keys.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        key = await self.store.key_by_hash(key_hash)
        if key is None:
            self._keys.pop(key_hash, None)  # unknown keys are not cached: a new one works at once
        else:
            if len(self._keys) > 10_000:
                self._keys.clear()
            # Limitation: a key revoked by another process (`tidings keys revoke`) is still
            # accepted here for up to KEY_CACHE_S; one revoked through this API is not.
            self._keys[key_hash] = (now + KEY_CACHE_S, key)
        return key

    async def revoke_key(self, key_id: str) -> None:
        """Revoke a key; this process refuses it from now on."""
        await self.store.revoke_key(key_id, self.clock.now())
        self._keys = {h: entry for h, entry in self._keys.items() if entry[1].id != key_id}

    async def ensure_admin_key(self) -> str | None:
        """Make the first admin key when there is none; returns its plain text if made."""
        if not self.settings.auth_required:
            return None
        if any(k.scope is Scope.ADMIN and not k.revoked for k in await self.store.list_keys()):
            return None
        made = await self.create_key(Scope.ADMIN, name="first admin key")
        return made.plain

    # notifications ---------------------------------------------------------------------

    async def send(self, new: NewNotification) -> tuple[Notification, bool]:
        """Accept a notification; returns it and whether it is new (idempotency)."""
        check_topic(new.topic)
        if len(new.body) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload is {len(new.body)} bytes; the maximum is "
                f"{self.settings.max_payload_bytes} (TIDINGS_MAX_PAYLOAD_BYTES). Send a "
                "smaller payload, e.g. an id the receiver can look up"
            )
        for name, value in (("key", new.key), ("idempotency_key", new.idempotency_key)):
            if value is not None and not 0 < len(check_text(value, name)) <= 200:
                raise InvalidInput(f"{name}: must be 1 to 200 characters", field=name)
        notification, created = await self.store.add_notification(new, self.clock.now())
        if not created and (
            notification.topic != new.topic
            or notification.body != new.body
            or notification.content_type != new.content_type
            or notification.key != new.key
        ):
            # Answering with the earlier notification would show one caller another's data
            # and tell it its own was accepted; refuse instead, as payment APIs do.
            raise Conflict(
                "idempotency_key: already used for a different notification (other topic, "
                "key or payload); use a new idempotency key for new content"
            )
        if created and notification.deliveries:
            await self.broker.publish_due([d.id for d in notification.deliveries])
        log.debug(
            "accepted %s on %s",
            notification.id,
            notification.topic,
            extra={"action": "accepted", "notification_id": notification.id},
        )
        return notification, created

    async def get(self, notification_id: str) -> Notification:
        """A notification with its deliveries and attempts."""
        return await self.store.get_notification(notification_id)

    async def list_notifications(self, query: NotificationQuery) -> Page:
        """Notifications by topic, key, status and time, oldest first."""
        return await self.store.list_notifications(query)

    async def redeliver(
        self, notification_id: str, endpoint_ids: frozenset[str] | None = None
    ) -> list[str]:
        """An immediate attempt for every delivery not yet delivered."""
        ids = await self.store.redeliver(notification_id, self.clock.now(), endpoint_ids)
        await self.broker.publish_due(ids)
        log.info(
            "redelivery of %s asked for %d deliveries",
            notification_id,
            len(ids),
            extra={"action": "redeliver", "notification_id": notification_id},
        )
        return ids


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "the dispatcher stopped on an error",
            exc_info=task.exception(),
            extra={"action": "dispatcher_crashed"},
        )
