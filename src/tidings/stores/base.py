"""The store: the source of truth for endpoints, notifications, deliveries and attempts."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tidings.auth import ApiKey
from tidings.health import Health, HealthPolicy
from tidings.models import (
    Attempt,
    Claim,
    Endpoint,
    ErrorClass,
    NewNotification,
    Notification,
    NotificationStatus,
    Outcome,
)

# The lease owner of a delivery handed over to a queue subscriber group: `queue:<group>`.
HAND_OVER_PREFIX = "queue:"


def lost_attempt(delivery_id: str, number: int, now: float, *, timed_out: bool) -> Attempt:
    """The record of an attempt whose lease ran out: a queue subscriber group that did not
    answer in time (`timed_out`), or a dispatcher that stopped mid-attempt."""
    if timed_out:
        error_class, detail = (
            ErrorClass.TIMEOUT,
            "the queue subscriber group did not answer before the next attempt was due",
        )
    else:
        error_class, detail = (
            ErrorClass.INTERRUPTED,
            "the dispatcher holding this attempt stopped before recording it; its lease ran out",
        )
    return Attempt(
        delivery_id=delivery_id,
        number=number,
        started_at=now,
        duration_ms=0.0,
        succeeded=False,
        error_class=error_class,
        error_detail=detail,
    )


# A manual redelivery after the window closed reopens it this long: the attempt it asks for
# happens when a dispatcher gets to it, not necessarily in the same instant.
REDELIVERY_GRACE_S = 60.0


@dataclass(frozen=True)
class NotificationQuery:
    """Filters for listing notifications, oldest first, after a cursor."""

    topic: str | None = None
    key: str | None = None
    status: NotificationStatus | None = None
    created_after: float | None = None
    after_seq: int = 0
    limit: int = 100
    endpoint_ids: frozenset[str] | None = None  # only notifications routed to these


@dataclass(frozen=True)
class Page:
    """One page of a listing and the cursor of the next one."""

    items: list[Notification]
    next_seq: int | None


class Store(abc.ABC):
    """Everything the service keeps. Every method is one transaction."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and make sure the schema is there."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    # endpoints -------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_endpoint(self, endpoint: Endpoint) -> None:
        """Register an endpoint."""

    @abc.abstractmethod
    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        """One endpoint; raises NotFound."""

    @abc.abstractmethod
    async def list_endpoints(self) -> list[Endpoint]:
        """Every endpoint, oldest first."""

    @abc.abstractmethod
    async def replace_endpoint(self, endpoint: Endpoint, now: float) -> None:
        """Save a changed endpoint (same id); raises NotFound."""

    @abc.abstractmethod
    async def remove_endpoint(self, endpoint_id: str, now: float) -> int:
        """Delete an endpoint and cancel its unfinished deliveries; returns how many."""

    # notifications ---------------------------------------------------------------------

    @abc.abstractmethod
    async def add_notification(self, new: NewNotification, now: float) -> tuple[Notification, bool]:
        """Record a notification and fan it out to one delivery per subscribed endpoint.

        Returns the notification and True, or the earlier one and False when the
        idempotency key was seen before.
        """

    @abc.abstractmethod
    async def get_notification(self, notification_id: str) -> Notification:
        """A notification with its deliveries and their attempts; raises NotFound."""

    @abc.abstractmethod
    async def list_notifications(self, query: NotificationQuery) -> Page:
        """Notifications matching the query, oldest first, without attempts."""

    @abc.abstractmethod
    async def redeliver(
        self, notification_id: str, now: float, endpoint_ids: frozenset[str] | None = None
    ) -> list[str]:
        """Make every unfinished or failed delivery due now; returns the delivery ids."""

    # dispatching -----------------------------------------------------------------------

    @abc.abstractmethod
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
        """Lease up to `limit` due deliveries to `owner` for one attempt each.

        A delivery whose lease ran out is due again: its lost attempt is recorded as
        interrupted, and after `max_crashes` such losses it is exhausted instead.
        With `delivery_ids`, only those are considered.
        """

    @abc.abstractmethod
    async def renew_leases(self, *, owner: str, now: float, lease_s: float) -> int:
        """Extend every lease `owner` holds; returns how many."""

    @abc.abstractmethod
    async def release(self, claims: Sequence[Claim], now: float) -> None:
        """Hand claimed deliveries back untried (shutdown), due at once."""

    @abc.abstractmethod
    async def hand_over(self, claim: Claim, until: float, owner: str) -> bool:
        """Pass a claimed delivery to a queue subscriber group until `until`.

        The delivery stays `delivering`, leased to `owner` (`queue:<group>`). When the lease
        runs out unanswered, the next claim records the attempt as a `timeout`, not as a
        crash. Returns False, changing nothing, when `claim` no longer holds the delivery.
        """

    @abc.abstractmethod
    async def get_claim(self, delivery_id: str, attempt_number: int) -> Claim | None:
        """The claim of an attempt still in flight, rebuilt to record its outcome; None
        when that attempt is over (answered, taken back, or the delivery is gone)."""

    @abc.abstractmethod
    async def record_outcomes(
        self, outcomes: Sequence[Outcome], now: float, policy: HealthPolicy | None = None
    ) -> list[str]:
        """Record finished attempts, move each delivery on and feed the endpoints' circuit
        breakers, in one transaction. Returns the endpoints disabled for failing too long."""

    @abc.abstractmethod
    async def endpoint_health(self, endpoint_id: str) -> Health:
        """The breaker and limiter state of one endpoint."""

    @abc.abstractmethod
    async def next_due_at(self) -> float | None:
        """When the earliest waiting delivery is due, if any."""

    # API keys --------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_key(self, key: ApiKey) -> None:
        """Store a key (its hash only)."""

    @abc.abstractmethod
    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not."""

    @abc.abstractmethod
    async def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first."""

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, now: float) -> None:
        """Revoke a key; raises NotFound."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, Any]:
        """Counts of deliveries by status, for operators."""
