"""The JSON shapes of the HTTP API, as pydantic models (and so the OpenAPI document)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tidings.durations import format_duration
from tidings.models import Attempt, Delivery, Endpoint, Notification


def iso(epoch_s: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC timestamp with milliseconds."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")


MAX_JSON_DEPTH = 64  # pydantic will not serialise much deeper: a record must stay readable


def json_depth(value: object) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar is 0)."""
    depth, level = 0, [value]
    while True:
        nested = [v for v in level if isinstance(v, list | dict)]
        if not nested:
            return depth
        depth += 1
        level = [child for v in nested for child in (v.values() if isinstance(v, dict) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenRule(_Strict):
    """Success when the 2xx body, trimmed of whitespace and a BOM, equals `token`."""

    token: str = Field(min_length=1, max_length=200, examples=["success"])


Duration = str | float
SuccessIn = Literal["2xx"] | TokenRule


class EndpointIn(_Strict):
    """A receiver's URL and how it wants notifications."""

    url: str = Field(
        max_length=2048, examples=["https://merchant.example/notify", "queue://accounts"]
    )
    kind: Literal["http", "queue"] = Field(
        default="http",
        description="http: POST to `url`; queue: a subscriber group `queue://<group>` "
        "consuming from RabbitMQ",
    )
    topics: list[str] = Field(min_length=1, max_length=100, examples=[["recharge.succeeded"]])
    secret: str | None = Field(default=None, min_length=8, max_length=200)
    retry_schedule: str | list[Duration] | None = Field(
        default=None, examples=["default", ["10s", "1m", "5m"]]
    )
    window: Duration | None = Field(default=None, examples=["24h"])
    success: SuccessIn | None = None
    timeout: Duration | None = Field(default=None, examples=["10s"])
    description: str | None = Field(default=None, max_length=500)
    rate_limit: float | None = Field(default=None, gt=0, le=100_000, description="deliveries/s")
    max_in_flight: int | None = Field(default=None, ge=1, le=10_000)


class EndpointPatch(_Strict):
    """Fields of an endpoint to change; absent ones stay."""

    url: str | None = Field(default=None, max_length=2048)
    topics: list[str] | None = Field(default=None, min_length=1, max_length=100)
    retry_schedule: str | list[Duration] | None = None
    window: Duration | None = None
    success: SuccessIn | None = None
    timeout: Duration | None = None
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None
    rate_limit: float | None = Field(default=None, gt=0, le=100_000)
    max_in_flight: int | None = Field(default=None, ge=1, le=10_000)


class EndpointOut(BaseModel):
    """An endpoint as the API shows it; the secret only when it was just made."""

    id: str
    url: str
    kind: str
    topics: list[str]
    retry_schedule: list[str]
    window: str
    success: Literal["2xx"] | TokenRule
    timeout: str
    enabled: bool
    description: str
    created_at: str
    rate_limit: float | None = None
    max_in_flight: int | None = None
    secret: str | None = None

    @classmethod
    def of(cls, endpoint: Endpoint, *, with_secret: bool = False) -> EndpointOut:
        rule = endpoint.success.to_json()
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            kind=endpoint.kind.value,
            topics=list(endpoint.topics),
            retry_schedule=endpoint.schedule.describe(),
            window=format_duration(endpoint.schedule.window_s),
            success="2xx" if isinstance(rule, str) else TokenRule(token=rule["token"]),
            timeout=format_duration(endpoint.timeout_s),
            enabled=endpoint.enabled,
            description=endpoint.description,
            created_at=iso(endpoint.created_at) or "",
            rate_limit=endpoint.rate_limit_per_s,
            max_in_flight=endpoint.max_in_flight,
            secret=endpoint.secrets[0] if with_secret else None,
        )


class RotateIn(_Strict):
    """A secret rotation: the new secret (generated when absent) and how long the old
    ones keep signing."""

    secret: str | None = Field(default=None, min_length=8, max_length=200)
    grace: Duration = Field(default="24h", examples=["24h"])


class EndpointList(BaseModel):
    """Every endpoint."""

    items: list[EndpointOut]


class NotificationIn(_Strict):
    """A business result to notify; `payload` (JSON) or `payload_base64` + `content_type`."""

    topic: str = Field(max_length=200, examples=["recharge.succeeded"])
    payload: Any = Field(default=None, examples=[{"recharge_id": "r-1", "amount": 100}])
    payload_base64: str | None = None
    content_type: str | None = Field(default=None, max_length=200)
    key: str | None = Field(default=None, max_length=200, examples=["r-1"])
    idempotency_key: str | None = Field(default=None, max_length=200)


class AttemptOut(BaseModel):
    """One attempt: when, how long, and what the receiver said."""

    number: int
    started_at: str
    duration_ms: float
    succeeded: bool
    status_code: int | None
    error: str | None
    error_detail: str | None
    response: str
    location: str | None
    retry_after_s: float | None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptOut:
        return cls(
            number=attempt.number,
            started_at=iso(attempt.started_at) or "",
            duration_ms=round(attempt.duration_ms, 3),
            succeeded=attempt.succeeded,
            status_code=attempt.status_code,
            error=attempt.error_class.value if attempt.error_class else None,
            error_detail=attempt.error_detail,
            response=attempt.response_excerpt.decode("utf-8", errors="replace"),
            location=attempt.location,
            retry_after_s=attempt.retry_after_s,
        )


class DeliveryOut(BaseModel):
    """A notification's way to one endpoint."""

    id: str
    endpoint_id: str
    status: str
    attempt_count: int
    next_attempt_at: str | None
    deadline_at: str
    attempts: list[AttemptOut] | None = None

    @classmethod
    def of(cls, delivery: Delivery, *, with_attempts: bool) -> DeliveryOut:
        return cls(
            id=delivery.id,
            endpoint_id=delivery.endpoint_id,
            status=delivery.status.value,
            attempt_count=delivery.attempt_count,
            next_attempt_at=iso(delivery.next_attempt_at),
            deadline_at=iso(delivery.deadline_at) or "",
            attempts=[AttemptOut.of(a) for a in delivery.attempts] if with_attempts else None,
        )


class NotificationOut(BaseModel):
    """A notification, its deliveries and (for one notification) their attempts."""

    id: str
    topic: str
    key: str | None
    idempotency_key: str | None
    status: str
    created_at: str
    content_type: str
    payload: Any = None
    payload_base64: str | None = None
    deliveries: list[DeliveryOut]
    cursor: str = Field(description="Pass as `cursor` to list what came after this one.")

    @classmethod
    def of(cls, notification: Notification, *, with_attempts: bool) -> NotificationOut:
        payload: Any = None
        payload_base64: str | None = None
        if notification.content_type.split(";")[0].strip() == "application/json":
            try:
                payload = json.loads(notification.body)
            except (ValueError, RecursionError):
                payload_base64 = base64.b64encode(notification.body).decode("ascii")
            else:
                if json_depth(payload) > MAX_JSON_DEPTH:
                    # Raw bytes sent as JSON may nest past what the answer can carry.
                    payload, payload_base64 = None, base64.b64encode(notification.body).decode()
        else:
            payload_base64 = base64.b64encode(notification.body).decode("ascii")
        return cls(
            id=notification.id,
            topic=notification.topic,
            key=notification.key,
            idempotency_key=notification.idempotency_key,
            status=notification.status.value,
            created_at=iso(notification.created_at) or "",
            content_type=notification.content_type,
            payload=payload,
            payload_base64=payload_base64,
            deliveries=[
                DeliveryOut.of(d, with_attempts=with_attempts) for d in notification.deliveries
            ],
            cursor=str(notification.seq),
        )


class NotificationPage(BaseModel):
    """A page of notifications, oldest first; pass `next_cursor` as `cursor` for more."""

    items: list[NotificationOut]
    next_cursor: str | None


class RedeliverOut(BaseModel):
    """Which deliveries were made due again."""

    notification_id: str
    deliveries: list[str]


class ErrorOut(BaseModel):
    """Every error: a stable code and a sentence saying what was wrong and what to do."""

    error: str
    message: str
