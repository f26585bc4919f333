"""Operational notifications: Tidings tells its own subscribers what went wrong.

Topics: `tidings.delivery.exhausted` (one per delivery given up) and
`tidings.endpoint.disabled` (an endpoint failed for longer than the policy allows).
Endpoints subscribe to them like to any topic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from tidings.brokers.base import Broker
from tidings.models import NewNotification, Outcome, OutcomeKind
from tidings.stores.base import Store

log = logging.getLogger(__name__)

DELIVERY_EXHAUSTED = "tidings.delivery.exhausted"
ENDPOINT_DISABLED = "tidings.endpoint.disabled"
_OWN_PREFIX = "tidings."


def _body(payload: dict[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def exhausted_notice(
    *,
    notification_id: str,
    delivery_id: str,
    endpoint_id: str,
    topic: str,
    attempts: int,
    last_status_code: int | None,
    last_error: str | None,
) -> NewNotification | None:
    """The `tidings.delivery.exhausted` notification for one delivery given up.

    None for Tidings' own notifications: a failing subscriber would feed itself.
    """
    if topic.startswith(_OWN_PREFIX):
        return None
    payload = {
        "notification_id": notification_id,
        "delivery_id": delivery_id,
        "endpoint_id": endpoint_id,
        "topic": topic,
        "attempts": attempts,
        "last_status_code": last_status_code,
        "last_error": last_error,
    }
    return NewNotification(
        topic=DELIVERY_EXHAUSTED,
        body=_body(payload),
        key=notification_id,
        idempotency_key=f"{DELIVERY_EXHAUSTED}:{delivery_id}:{attempts}",
    )


async def announce(
    store: Store,
    broker: Broker,
    outcomes: Sequence[Outcome],
    disabled_endpoint_ids: Sequence[str],
    now: float,
) -> None:
    """Send the operational notifications a batch of outcomes calls for."""
    news: list[NewNotification] = []
    for outcome in outcomes:
        if outcome.kind is OutcomeKind.EXHAUSTED:
            claim = outcome.claim
            notice = exhausted_notice(
                notification_id=claim.notification_id,
                delivery_id=claim.delivery_id,
                endpoint_id=claim.endpoint_id,
                topic=claim.topic,
                attempts=claim.attempt_number,
                last_status_code=outcome.attempt.status_code,
                last_error=outcome.attempt.error_class.value
                if outcome.attempt.error_class
                else None,
            )
            if notice is not None:
                news.append(notice)
    for endpoint_id in disabled_endpoint_ids:
        news.append(
            NewNotification(
                topic=ENDPOINT_DISABLED,
                body=_body({"endpoint_id": endpoint_id, "disabled_at": now}),
                key=endpoint_id,
                idempotency_key=f"{ENDPOINT_DISABLED}:{endpoint_id}:{int(now)}",
            )
        )
    for new in news:
        notification, created = await store.add_notification(new, now)
        if created and notification.deliveries:
            await broker.publish_due([d.id for d in notification.deliveries])
        log.info(
            "sent %s about %s",
            new.topic,
            new.key,
            extra={"action": "operational_notification", "notification_id": notification.id},
        )
