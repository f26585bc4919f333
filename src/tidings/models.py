"""The domain records: endpoints, notifications, deliveries and attempts."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import StrEnum

from tidings.schedule import RetrySchedule
from tidings.success import SuccessRule

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    """A sortable id: 48-bit milliseconds then 80 random bits, Crockford base32."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return prefix + "".join(reversed(chars))


class DeliveryStatus(StrEnum):
    """Where one notification stands with one endpoint."""

    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    EXHAUSTED = "exhausted"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset(
    {DeliveryStatus.DELIVERED, DeliveryStatus.EXHAUSTED, DeliveryStatus.CANCELLED}
)


class NotificationStatus(StrEnum):
    """The summary of a notification's deliveries."""

    PENDING = "pending"
    DELIVERED = "delivered"
    EXHAUSTED = "exhausted"
    CANCELLED = "cancelled"
    UNROUTED = "unrouted"  # no endpoint took the topic when it was sent


class EndpointKind(StrEnum):
    """How an endpoint takes deliveries."""

    HTTP = "http"
    QUEUE = "queue"


class ErrorClass(StrEnum):
    """Why an attempt got no answer from the receiver."""

    TIMEOUT = "timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECTION_RESET = "connection_reset"
    DNS = "dns"
    TLS = "tls"
    BLOCKED = "blocked"
    INVALID_RESPONSE = "invalid_response"  # not HTTP, or a head over the size limits
    INTERRUPTED = "interrupted"  # the dispatcher died while the attempt was in flight
    HANDLER_ERROR = "handler_error"  # a queue subscriber's handler raised
    ERROR = "error"


@dataclass(frozen=True)
class Endpoint:
    """Where a receiver takes deliveries, and how it wants them retried."""

    id: str
    url: str
    topics: tuple[str, ...]
    secrets: tuple[str, ...]
    schedule: RetrySchedule
    success: SuccessRule
    timeout_s: float
    created_at: float
    kind: EndpointKind = EndpointKind.HTTP
    enabled: bool = True
    description: str = ""
    # Parallel to `secrets` (newest first): when each stops signing; empty means never.
    secrets_expire_at: tuple[float | None, ...] = ()
    rate_limit_per_s: float | None = None  # across every dispatcher
    max_in_flight: int | None = None  # across every dispatcher

    def active_secrets(self, now: float) -> tuple[str, ...]:
        """The secrets that sign attempts made at `now`."""
        expiry = self.secrets_expire_at or (None,) * len(self.secrets)
        active = tuple(
            s for s, end in zip(self.secrets, expiry, strict=True) if end is None or end > now
        )
        return active or self.secrets[:1]

    def takes(self, topic: str) -> bool:
        """Whether a notification on `topic` goes to this endpoint."""
        return any(t == "*" or t == topic for t in self.topics)


@dataclass(frozen=True)
class Attempt:
    """One try at delivering a notification to an endpoint."""

    delivery_id: str
    number: int
    started_at: float
    duration_ms: float
    succeeded: bool
    status_code: int | None = None
    error_class: ErrorClass | None = None
    error_detail: str | None = None
    response_excerpt: bytes = b""
    location: str | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Delivery:
    """One notification on its way to one endpoint."""

    id: str
    notification_id: str
    endpoint_id: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: float | None
    deadline_at: float
    created_at: float
    updated_at: float
    attempts: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class Notification:
    """A business result to tell receivers about, with the exact bytes they will get."""

    id: str
    seq: int
    topic: str
    body: bytes
    content_type: str
    created_at: float
    status: NotificationStatus
    key: str | None = None
    idempotency_key: str | None = None
    deliveries: tuple[Delivery, ...] = field(default=())


@dataclass(frozen=True)
class NewNotification:
    """What a notifier asks to send."""

    topic: str
    body: bytes
    content_type: str = "application/json"
    key: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Claim:
    """A delivery leased to one dispatcher for one attempt."""

    delivery_id: str
    notification_id: str
    endpoint_id: str
    attempt_number: int
    body: bytes
    content_type: str
    topic: str
    created_at: float
    deadline_at: float
    # A dispatcher died holding this delivery before: it may be what killed it, so it is
    # attempted alone, with nothing else in flight to die with it.
    suspect: bool = False


class OutcomeKind(StrEnum):
    """What an attempt leads to."""

    DELIVERED = "delivered"
    RETRY = "retry"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True)
class Outcome:
    """A finished attempt and what follows from it."""

    claim: Claim
    attempt: Attempt
    kind: OutcomeKind
    next_attempt_at: float | None = None
