"""The in-process store: plain dicts with the semantics of the SQL store, for tests and demos."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from tidings.auth import ApiKey
from tidings.errors import Conflict, NotFound
from tidings.health import Health, HealthPolicy, admissible, is_gated, spend
from tidings.models import (
    Attempt,
    Claim,
    Delivery,
    DeliveryStatus,
    Endpoint,
    ErrorClass,
    NewNotification,
    Notification,
    NotificationStatus,
    Outcome,
    OutcomeKind,
    new_id,
)
from tidings.stores.base import (
    HAND_OVER_PREFIX,
    REDELIVERY_GRACE_S,
    NotificationQuery,
    Page,
    Store,
    lost_attempt,
)

log = logging.getLogger(__name__)

_LIVE = frozenset({DeliveryStatus.PENDING, DeliveryStatus.DELIVERING})
# Not delivering (in flight), delivered, or cancelled (the endpoint is gone): final stays.
_REDELIVERABLE = frozenset({DeliveryStatus.PENDING, DeliveryStatus.EXHAUSTED})
# The first status present among a notification's deliveries decides its summary.
_SUMMARY = (
    (DeliveryStatus.PENDING, NotificationStatus.PENDING),
    (DeliveryStatus.DELIVERING, NotificationStatus.PENDING),
    (DeliveryStatus.EXHAUSTED, NotificationStatus.EXHAUSTED),
    (DeliveryStatus.DELIVERED, NotificationStatus.DELIVERED),
    (DeliveryStatus.CANCELLED, NotificationStatus.CANCELLED),
)
_STATUS_AFTER = {
    OutcomeKind.DELIVERED: DeliveryStatus.DELIVERED,
    OutcomeKind.RETRY: DeliveryStatus.PENDING,
    OutcomeKind.EXHAUSTED: DeliveryStatus.EXHAUSTED,
}


_DELIVERY_COLUMNS = [f.name for f in dataclasses.fields(Delivery) if f.name != "attempts"]


@dataclass
class _DeliveryRow:
    """One row of the deliveries table; mutable, unlike the Delivery it is read as."""

    id: str
    notification_id: str
    endpoint_id: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: float | None
    deadline_at: float
    created_at: float
    updated_at: float
    crashes: int = 0
    lease_owner: str | None = None
    attempts: dict[int, Attempt] = dataclasses.field(default_factory=dict)

    def move(
        self, status: DeliveryStatus, next_attempt_at: float | None, now: float, owner: str = ""
    ) -> None:
        """Move to `status`, leased to `owner` if one is named."""
        self.status = status
        self.next_attempt_at = next_attempt_at
        self.lease_owner = owner or None
        self.updated_at = now

    def read(self, *, with_attempts: bool) -> Delivery:
        """The row as the domain record."""
        columns = {name: getattr(self, name) for name in _DELIVERY_COLUMNS}
        found = self.attempts if with_attempts else {}
        return Delivery(**columns, attempts=tuple(found[n] for n in sorted(found)))


def summary_status(statuses: Iterable[DeliveryStatus]) -> NotificationStatus:
    """The notification status its deliveries add up to (the rule of the SQL store)."""
    present = set(statuses)
    found = (summary for status, summary in _SUMMARY if status in present)
    return next(found, NotificationStatus.UNROUTED)


class MemoryStore(Store):
    """Everything in dicts of this process; each method runs without yielding, so atomically.

    Notification status is derived from the deliveries on every read; the SQL store keeps
    it in a column refreshed on every change that can alter it, so the two agree.
    """

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        # Notifications are kept without status and deliveries, in seq order.
        self._notifications: dict[str, Notification] = {}
        self._by_idempotency_key: dict[str, str] = {}
        # Limitation: claims and endpoint changes scan every delivery; fine for tests and
        # demos, slow past a few hundred thousand deliveries.
        self._deliveries: dict[str, _DeliveryRow] = {}
        self._delivery_ids: dict[str, list[str]] = {}  # by notification id
        self._last_seq = 0
        self._keys: dict[str, ApiKey] = {}
        self._health: dict[str, Health] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # endpoints -------------------------------------------------------------------------

    async def add_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint.id in self._endpoints:
            raise Conflict(f"an endpoint with id {endpoint.id!r} exists already")
        self._endpoints[endpoint.id] = endpoint

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        try:
            return self._endpoints[endpoint_id]
        except KeyError:
            raise NotFound(f"no endpoint with id {endpoint_id!r}") from None

    async def list_endpoints(self) -> list[Endpoint]:
        return sorted(self._endpoints.values(), key=lambda e: (e.created_at, e.id))

    async def replace_endpoint(self, endpoint: Endpoint, now: float) -> None:
        old = await self.get_endpoint(endpoint.id)
        self._endpoints[endpoint.id] = dataclasses.replace(endpoint, created_at=old.created_at)

    async def remove_endpoint(self, endpoint_id: str, now: float) -> int:
        await self.get_endpoint(endpoint_id)
        del self._endpoints[endpoint_id]
        self._health.pop(endpoint_id, None)
        touched = set()
        for row in self._deliveries.values():
            if row.endpoint_id == endpoint_id and row.status in _LIVE:
                row.move(DeliveryStatus.CANCELLED, None, now)
                touched.add(row.notification_id)
        return len(touched)

    # notifications ---------------------------------------------------------------------

    async def add_notification(self, new: NewNotification, now: float) -> tuple[Notification, bool]:
        if new.idempotency_key is not None and new.idempotency_key in self._by_idempotency_key:
            earlier = self._by_idempotency_key[new.idempotency_key]
            return await self.get_notification(earlier), False

        self._last_seq += 1
        notification = Notification(
            id=new_id("msg_"),
            seq=self._last_seq,
            topic=new.topic,
            key=new.key,
            idempotency_key=new.idempotency_key,
            content_type=new.content_type,
            body=new.body,
            status=NotificationStatus.UNROUTED,
            created_at=now,
        )
        self._notifications[notification.id] = notification
        if new.idempotency_key is not None:
            self._by_idempotency_key[new.idempotency_key] = notification.id

        for endpoint in self._endpoints.values():
            if endpoint.enabled and endpoint.takes(new.topic):
                row = _DeliveryRow(
                    id=new_id("dlv_"),
                    notification_id=notification.id,
                    endpoint_id=endpoint.id,
                    status=DeliveryStatus.PENDING,
                    attempt_count=0,
                    next_attempt_at=now,
                    deadline_at=now + endpoint.schedule.window_s,
                    created_at=now,
                    updated_at=now,
                )
                self._deliveries[row.id] = row
                self._delivery_ids.setdefault(notification.id, []).append(row.id)
        return self._read(notification, with_attempts=False), True

    async def get_notification(self, notification_id: str) -> Notification:
        if notification_id not in self._notifications:
            raise NotFound(f"no notification with id {notification_id!r}")
        return self._read(self._notifications[notification_id], with_attempts=True)

    def _rows_of(self, notification_id: str) -> list[_DeliveryRow]:
        rows = [self._deliveries[i] for i in self._delivery_ids.get(notification_id, [])]
        return sorted(rows, key=lambda r: (r.created_at, r.id))

    def _read(self, notification: Notification, *, with_attempts: bool) -> Notification:
        rows = self._rows_of(notification.id)
        return dataclasses.replace(
            notification,
            status=summary_status(r.status for r in rows),
            deliveries=tuple(r.read(with_attempts=with_attempts) for r in rows),
        )

    async def list_notifications(self, query: NotificationQuery) -> Page:
        found = (n for n in self._notifications.values() if self._matches(n, query))
        matched = [self._read(n, with_attempts=False) for n in islice(found, query.limit + 1)]
        page = matched[: query.limit]
        next_seq = page[-1].seq if len(matched) > query.limit else None
        return Page(items=page, next_seq=next_seq)

    def _matches(self, stored: Notification, query: NotificationQuery) -> bool:
        if stored.seq <= query.after_seq:
            return False
        if query.topic is not None and stored.topic != query.topic:
            return False
        if query.key is not None and stored.key != query.key:
            return False
        if query.created_after is not None and stored.created_at <= query.created_after:
            return False
        rows = self._rows_of(stored.id)
        if query.status is not None and summary_status(r.status for r in rows) != query.status:
            return False
        return query.endpoint_ids is None or any(r.endpoint_id in query.endpoint_ids for r in rows)

    async def redeliver(
        self, notification_id: str, now: float, endpoint_ids: frozenset[str] | None = None
    ) -> list[str]:
        if notification_id not in self._notifications:
            raise NotFound(f"no notification with id {notification_id!r}")
        touched = []
        for row in self._rows_of(notification_id):
            # A leased delivery is being attempted right now; a second one would overlap.
            if row.status not in _REDELIVERABLE:
                continue
            if endpoint_ids is not None and row.endpoint_id not in endpoint_ids:
                continue
            row.move(DeliveryStatus.PENDING, now, now)
            # A manual redelivery gets one attempt even after the window closed.
            row.deadline_at = max(row.deadline_at, now + REDELIVERY_GRACE_S)
            row.crashes = 0
            touched.append(row.id)
        return touched

    # dispatching -----------------------------------------------------------------------

    async def claim_due(
        self,
        *,
        now: float,
        limit: int,
        lease_s: float,
        owner: str,
        exclude_endpoints: Sequence[str] = (),
        delivery_ids: Sequence[str] | None = None,
        max_crashes: int = 3,
    ) -> list[Claim]:
        excluded = set(exclude_endpoints)
        wanted = None if delivery_ids is None else set(delivery_ids)
        # Endpoints with a breaker or limits take turns at their gate, after the rest.
        gated = [
            e.id for e in self._endpoints.values() if self._is_gated(e) and self._due(now, e.id)
        ]
        free = [
            row
            for row in self._due(now)
            if row.endpoint_id not in excluded
            and row.endpoint_id not in gated
            and (wanted is None or row.id in wanted)
        ]
        claims = self._lease(free[: max(limit, 0)], now, lease_s, owner, max_crashes)
        for endpoint_id in gated:
            room = limit - len(claims)
            if room <= 0:
                break
            if endpoint_id not in excluded:
                claims += self._claim_gated(endpoint_id, now, room, lease_s, owner, max_crashes)
        return claims

    def _due(self, now: float, endpoint_id: str | None = None) -> list[_DeliveryRow]:
        """Deliveries due at `now` (of one endpoint, if named), earliest first."""
        due = [
            row
            for row in self._deliveries.values()
            if row.next_attempt_at is not None
            and row.next_attempt_at <= now
            and endpoint_id in (None, row.endpoint_id)
        ]
        return sorted(due, key=lambda row: row.next_attempt_at or 0.0)

    def _is_gated(self, endpoint: Endpoint) -> bool:
        return is_gated(
            self._health.get(endpoint.id, Health()),
            enabled=endpoint.enabled,
            rate_limit_per_s=endpoint.rate_limit_per_s,
            max_in_flight=endpoint.max_in_flight,
        )

    def _claim_gated(
        self,
        endpoint_id: str,
        now: float,
        limit: int,
        lease_s: float,
        owner: str,
        max_crashes: int,
    ) -> list[Claim]:
        """Claim for one gated endpoint under its circuit breaker and limits."""
        endpoint = self._endpoints[endpoint_id]
        for row in self._due(now, endpoint_id):
            if row.status is DeliveryStatus.PENDING and row.deadline_at < now:
                row.move(DeliveryStatus.EXHAUSTED, None, now)  # held back past its window
        if not endpoint.enabled:
            return []
        health = self._health.get(endpoint_id, Health())
        leases = [
            r.next_attempt_at
            for r in self._deliveries.values()
            if r.endpoint_id == endpoint_id and r.status is DeliveryStatus.DELIVERING
        ]
        in_flight = sum(1 for until in leases if until is not None and until > now)
        room = admissible(
            health,
            now=now,
            in_flight=in_flight,
            rate_limit_per_s=endpoint.rate_limit_per_s,
            max_in_flight=endpoint.max_in_flight,
        )
        due = self._due(now, endpoint_id)[: max(min(limit, room), 0)]
        claims = self._lease(due, now, lease_s, owner, max_crashes)
        self._health[endpoint_id] = spend(
            health, now=now, started=len(claims), rate_limit_per_s=endpoint.rate_limit_per_s
        )
        return claims

    def _lease(
        self, rows: list[_DeliveryRow], now: float, lease_s: float, owner: str, max_crashes: int
    ) -> list[Claim]:
        """Lease `rows`; record lost attempts; refuse attempts past the window."""
        claims: list[Claim] = []
        for row in rows:
            # A delivery still leased when its lease ran out lost its holder mid-attempt,
            # unless it was handed to a queue subscriber group that did not answer in time.
            reclaimed = row.status is DeliveryStatus.DELIVERING
            timed_out = reclaimed and (row.lease_owner or "").startswith(HAND_OVER_PREFIX)
            crashed = reclaimed and not timed_out
            row.crashes += 1 if crashed else 0
            row.attempt_count += 1
            row.move(DeliveryStatus.DELIVERING, now + lease_s, now, owner)
            if reclaimed:
                self._record_lost_attempt(row, now, timed_out=timed_out)
            if now > row.deadline_at or (crashed and row.crashes >= max_crashes):
                row.attempt_count -= 1
                row.move(DeliveryStatus.EXHAUSTED, None, now)
                log.error(
                    "gave up on %s: window closed or dispatcher died mid-attempt",
                    row.id,
                    extra={"action": "exhausted_unattempted", "delivery_id": row.id},
                )
                continue
            claims.append(self._claim(row))
        return claims

    def _record_lost_attempt(self, row: _DeliveryRow, now: float, *, timed_out: bool) -> None:
        # The lost attempt is the one numbered just before this claim's.
        number = row.attempt_count - 1
        if number < 1 or number in row.attempts:
            return
        row.attempts[number] = lost_attempt(row.id, number, now, timed_out=timed_out)

    def _claim(self, row: _DeliveryRow) -> Claim:
        notification = self._notifications[row.notification_id]
        return Claim(
            delivery_id=row.id,
            notification_id=row.notification_id,
            endpoint_id=row.endpoint_id,
            attempt_number=row.attempt_count,
            body=notification.body,
            content_type=notification.content_type,
            topic=notification.topic,
            created_at=notification.created_at,
            deadline_at=row.deadline_at,
            suspect=row.crashes > 0,
        )

    async def renew_leases(self, *, owner: str, now: float, lease_s: float) -> int:
        renewed = 0
        for row in self._deliveries.values():
            if row.lease_owner == owner and row.status is DeliveryStatus.DELIVERING:
                row.next_attempt_at = now + lease_s
                renewed += 1
        return renewed

    async def release(self, claims: Sequence[Claim], now: float) -> None:
        for claim in claims:
            row = self._current(claim)
            if row is not None:
                row.move(DeliveryStatus.PENDING, now, now)
                row.attempt_count -= 1

    async def hand_over(self, claim: Claim, until: float, owner: str) -> bool:
        row = self._current(claim)
        if row is None:
            return False
        row.next_attempt_at, row.lease_owner = until, owner
        return True

    async def get_claim(self, delivery_id: str, attempt_number: int) -> Claim | None:
        row = self._deliveries.get(delivery_id)
        in_flight = row is not None and row.status is DeliveryStatus.DELIVERING
        if row is None or not in_flight or row.attempt_count != attempt_number:
            return None
        return self._claim(row)

    def _current(self, claim: Claim) -> _DeliveryRow | None:
        """The delivery row if `claim` still holds it (no one reclaimed it since)."""
        row = self._deliveries[claim.delivery_id]  # deliveries are never deleted
        same_attempt = row.attempt_count == claim.attempt_number
        return row if same_attempt and row.status is DeliveryStatus.DELIVERING else None

    async def record_outcomes(
        self, outcomes: Sequence[Outcome], now: float, policy: HealthPolicy | None = None
    ) -> list[str]:
        for outcome in outcomes:
            row = self._current(outcome.claim)
            if row is None:
                self._record_late(outcome, now)
                continue
            row.move(_STATUS_AFTER[outcome.kind], outcome.next_attempt_at, now)
            row.attempts[outcome.attempt.number] = outcome.attempt
        return self._update_health(outcomes, now, policy or HealthPolicy())

    def _update_health(
        self, outcomes: Sequence[Outcome], now: float, policy: HealthPolicy
    ) -> list[str]:
        """Feed the circuit breakers; returns endpoints disabled for failing too long."""
        # An attempt the dispatcher cut short itself (its store went away, it stopped) says
        # nothing about the receiver: it must not open the endpoint's circuit.
        outcomes = [o for o in outcomes if o.attempt.error_class is not ErrorClass.INTERRUPTED]
        disabled = []
        for endpoint_id in sorted({o.claim.endpoint_id for o in outcomes}):
            endpoint = self._endpoints.get(endpoint_id)
            if endpoint is None:
                continue  # removed meanwhile
            health = self._health.get(endpoint_id, Health())
            for attempt in (o.attempt for o in outcomes if o.claim.endpoint_id == endpoint_id):
                health = (
                    health.after_success()
                    if attempt.succeeded
                    else health.after_failure(
                        at=attempt.started_at,
                        now=now,
                        policy=policy,
                        retry_after_s=attempt.retry_after_s,
                    )
                )
            self._health[endpoint_id] = health
            if endpoint.enabled and health.should_disable(now, policy):
                self._endpoints[endpoint_id] = dataclasses.replace(endpoint, enabled=False)
                disabled.append(endpoint_id)
        return disabled

    async def endpoint_health(self, endpoint_id: str) -> Health:
        return self._health.get(endpoint_id, Health())

    def _record_late(self, outcome: Outcome, now: float) -> None:
        """An attempt finished after its lease was taken over: keep what it learned."""
        row, attempt = self._deliveries[outcome.claim.delivery_id], outcome.attempt
        earlier = row.attempts.get(attempt.number)
        if earlier is None or earlier.error_class is ErrorClass.INTERRUPTED:
            row.attempts[attempt.number] = attempt
        else:
            log.warning(
                "attempt %s of %s was already recorded",
                attempt.number,
                attempt.delivery_id,
                extra={"action": "late_attempt_duplicate", "delivery_id": attempt.delivery_id},
            )
        if outcome.kind is OutcomeKind.DELIVERED and row.status in _LIVE:
            row.move(DeliveryStatus.DELIVERED, None, now)

    async def next_due_at(self) -> float | None:
        due = (r.next_attempt_at for r in self._deliveries.values())
        return min((at for at in due if at is not None), default=None)

    # API keys --------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> None:
        if key.id in self._keys or await self.key_by_hash(key.key_hash) is not None:
            raise Conflict(f"an API key with id {key.id!r} or the same hash exists already")
        self._keys[key.id] = key

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        return next((k for k in self._keys.values() if k.key_hash == key_hash), None)

    async def list_keys(self) -> list[ApiKey]:
        return sorted(self._keys.values(), key=lambda k: (k.created_at, k.id))

    async def revoke_key(self, key_id: str, now: float) -> None:
        key = self._keys.get(key_id)
        if key is None:
            raise NotFound(f"no API key with id {key_id!r}")
        if key.revoked_at is None:
            self._keys[key_id] = dataclasses.replace(key, revoked_at=now)

    async def stats(self) -> dict[str, Any]:
        return {"deliveries": dict(Counter(r.status.value for r in self._deliveries.values()))}
