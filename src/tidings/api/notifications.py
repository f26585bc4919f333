"""Routes for notifications: send, look up, list (reconcile) and redeliver."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import replace
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from tidings.api.schemas import (
    MAX_JSON_DEPTH,
    ErrorOut,
    NotificationIn,
    NotificationOut,
    NotificationPage,
    RedeliverOut,
    json_depth,
)
from tidings.api.security import require
from tidings.auth import ApiKey, Scope
from tidings.errors import Forbidden, InvalidInput, NotFound
from tidings.models import NewNotification, Notification, NotificationStatus
from tidings.service import Service
from tidings.stores.base import NotificationQuery

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])
Sender = Annotated[ApiKey, Depends(require(Scope.NOTIFIER))]
Reader = Annotated[ApiKey, Depends(require(Scope.NOTIFIER, Scope.RECEIVER))]
Redeliverer = Annotated[ApiKey, Depends(require(Scope.RECEIVER))]
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    403: {"model": ErrorOut},
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    413: {"model": ErrorOut},
    422: {"model": ErrorOut},
}
MAX_PAGE = 500
_JSON = "application/json"


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def encode_payload(body: NotificationIn) -> tuple[bytes, str]:
    """The exact bytes every attempt will carry, and their content type."""
    given = body.model_fields_set
    if "payload_base64" in given and body.payload_base64 is not None:
        if "payload" in given:
            raise InvalidInput("give either payload or payload_base64, not both", field="payload")
        try:
            raw = base64.b64decode(body.payload_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(
                "payload_base64: not valid base64; encode the bytes with standard base64",
                field="payload_base64",
            ) from exc
        return raw, body.content_type or "application/octet-stream"
    if "payload" not in given:
        raise InvalidInput(
            "payload: required (any JSON), or payload_base64 with content_type", field="payload"
        )
    if json_depth(body.payload) > MAX_JSON_DEPTH:
        raise InvalidInput(
            f"payload: nested deeper than {MAX_JSON_DEPTH} levels; flatten it or send it as "
            "payload_base64",
            field="payload",
        )
    if body.content_type not in (None, "application/json"):
        raise InvalidInput(
            "content_type: a JSON payload is sent as application/json; use payload_base64 "
            "for other content types",
            field="content_type",
        )
    try:
        text = json.dumps(body.payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8"), "application/json"
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            "payload: contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which "
            "is not valid Unicode; send the character itself or a valid surrogate pair",
            field="payload",
        ) from exc
    except ValueError as exc:
        raise InvalidInput(
            "payload: numbers must be finite (no NaN or Infinity)", field="payload"
        ) from exc


@router.post("", status_code=201, response_model=NotificationOut, responses=_ERRORS)
async def send_notification(body: NotificationIn, request: Request, key: Sender) -> Response:
    """Accept a notification and fan it out to every endpoint of its topic.

    A repeated `idempotency_key` answers 200 with the first notification.
    """
    # Under create_app this route is answered by tidings.api.submit before FastAPI sees it;
    # it stays declared for the OpenAPI document and for routers mounted without it.
    status, content = await accept(_service(request), key, body)
    return Response(content, status_code=status, media_type=_JSON)


async def accept(service: Service, key: ApiKey, body: NotificationIn) -> tuple[int, bytes]:
    """Send `body` as `key`: the status (201 new, 200 repeated) and the JSON to answer."""
    if not key.may_send(body.topic):
        raise Forbidden(
            f"this key may not send on topic {body.topic!r}; its topics: {', '.join(key.topics)}"
        )
    raw, content_type = encode_payload(body)
    new = NewNotification(
        topic=body.topic,
        body=raw,
        content_type=content_type,
        key=body.key,
        idempotency_key=body.idempotency_key,
    )
    notification, created = await service.send(new)
    # Serialised here rather than by FastAPI, which would validate the model a second time
    # and walk it with jsonable_encoder: a fifth of the cost of a send under load.
    shown = NotificationOut.of(notification, with_attempts=not created)
    return (201 if created else 200), shown.model_dump_json().encode()


def _parse_time(value: str | None, field: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(
            f"{field}: expected an ISO 8601 time such as 2026-01-31T12:00:00Z or epoch "
            f"seconds, got {value!r}",
            field=field,
        ) from exc
    if when.tzinfo is None:
        raise InvalidInput(f"{field}: give a time zone, e.g. a trailing Z", field=field)
    return when.timestamp()


def _parse_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    if not cursor.isdigit():
        raise InvalidInput("cursor: pass back the next_cursor of the previous page", field="cursor")
    return int(cursor)


@router.get("", response_model=NotificationPage, responses=_ERRORS)
async def list_notifications(
    request: Request,
    caller: Reader,
    topic: str | None = None,
    key: str | None = None,
    status: NotificationStatus | None = None,
    created_after: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> NotificationPage:
    """Notifications oldest first, by topic, business key, status and creation time."""
    if caller.scope is Scope.NOTIFIER and "*" not in caller.topics and topic not in caller.topics:
        raise Forbidden("a notifier key lists only its own topics; pass topic=<one of them>")
    query = NotificationQuery(
        endpoint_ids=frozenset(caller.endpoint_ids) if caller.scope is Scope.RECEIVER else None,
        topic=topic,
        key=key,
        status=status,
        created_after=_parse_time(created_after, "created_after"),
        after_seq=_parse_cursor(cursor),
        limit=limit,
    )
    page = await _service(request).list_notifications(query)
    return NotificationPage(
        items=[NotificationOut.of(n, with_attempts=False) for n in page.items],
        next_cursor=None if page.next_seq is None else str(page.next_seq),
    )


@router.get("/{notification_id}", response_model=NotificationOut, responses=_ERRORS)
async def get_notification(notification_id: str, request: Request, key: Reader) -> NotificationOut:
    """A notification, its deliveries and every attempt: the authoritative answer."""
    notification = visible(await _service(request).get(notification_id), key)
    return NotificationOut.of(notification, with_attempts=True)


def visible(notification: Notification, key: ApiKey) -> Notification:
    """The notification as `key` may see it; NotFound when it may not (no leak)."""
    if key.scope is Scope.ADMIN:
        return notification
    if key.scope is Scope.NOTIFIER and ("*" in key.topics or notification.topic in key.topics):
        return notification
    if key.scope is Scope.RECEIVER:
        mine = tuple(d for d in notification.deliveries if d.endpoint_id in key.endpoint_ids)
        if mine:
            return replace(notification, deliveries=mine)
    raise NotFound(f"no notification with id {notification.id!r}")


@router.post("/{notification_id}/redeliver", response_model=RedeliverOut, responses=_ERRORS)
async def redeliver(notification_id: str, request: Request, key: Redeliverer) -> RedeliverOut:
    """An immediate attempt for each delivery not yet delivered."""
    service = _service(request)
    if key.scope is Scope.RECEIVER:
        visible(await service.get(notification_id), key)
        ids = await service.redeliver(notification_id, frozenset(key.endpoint_ids))
    else:
        ids = await service.redeliver(notification_id)
    return RedeliverOut(notification_id=notification_id, deliveries=ids)
