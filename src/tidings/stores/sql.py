"""The store on SQLAlchemy Core: SQLite (aiosqlite) by default, PostgreSQL (psycopg) too."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tidings.auth import ApiKey, Scope
from tidings.errors import NotFound
from tidings.health import Health, HealthPolicy, admissible, is_gated, spend
from tidings.models import (
    Attempt,
    Claim,
    Delivery,
    DeliveryStatus,
    Endpoint,
    EndpointKind,
    ErrorClass,
    NewNotification,
    Notification,
    NotificationStatus,
    Outcome,
    OutcomeKind,
    new_id,
)
from tidings.operational import DELIVERY_EXHAUSTED, exhausted_notice
from tidings.schedule import RetrySchedule
from tidings.stores.base import (
    HAND_OVER_PREFIX,
    REDELIVERY_GRACE_S,
    NotificationQuery,
    Page,
    Store,
    lost_attempt,
)
from tidings.stores.engine import create_engine_for
from tidings.stores.migrate import upgrade_async
from tidings.stores.tables import (
    api_keys,
    attempts,
    deliveries,
    endpoint_health,
    endpoint_topics,
    endpoints,
    notifications,
)
from tidings.success import SuccessRule

log = logging.getLogger(__name__)

_INBOX_BATCH = 500

_LIVE = (DeliveryStatus.PENDING.value, DeliveryStatus.DELIVERING.value)
# Marks, inside one claim, the rows whose lease was a hand-over to a queue subscriber group.
_TAKEN_BACK = "tidings:taken-back"


def _health_from_row(row: Any) -> Health:
    return Health(
        consecutive_failures=row.consecutive_failures,
        failing_since=row.failing_since,
        circuit_open_until=row.circuit_open_until,
        circuit_opens=row.circuit_opens,
        next_slot_at=row.next_slot_at,
    )


def _secret_of(entry: Any) -> str:
    return entry if isinstance(entry, str) else str(entry["secret"])


def _expiry_of(entry: Any) -> float | None:
    return None if isinstance(entry, str) else entry.get("expires_at")


def _endpoint_from_row(row: Row[Any]) -> Endpoint:
    return Endpoint(
        id=row.id,
        url=row.url,
        kind=EndpointKind(row.kind),
        topics=tuple(row.topics),
        secrets=tuple(_secret_of(entry) for entry in row.secrets),
        secrets_expire_at=tuple(_expiry_of(entry) for entry in row.secrets),
        schedule=RetrySchedule.parse(list(row.retry_schedule), row.window_s),
        success=SuccessRule.parse(row.success),
        timeout_s=row.timeout_s,
        enabled=row.enabled,
        description=row.description,
        created_at=row.created_at,
        rate_limit_per_s=row.rate_limit_per_s,
        max_in_flight=row.max_in_flight,
    )


def _endpoint_values(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "url": endpoint.url,
        "kind": endpoint.kind.value,
        "topics": list(endpoint.topics),
        "secrets": [
            {"secret": secret, "expires_at": expires_at}
            for secret, expires_at in zip(
                endpoint.secrets,
                endpoint.secrets_expire_at or (None,) * len(endpoint.secrets),
                strict=True,
            )
        ],
        "retry_schedule": list(endpoint.schedule.intervals_s),
        "window_s": endpoint.schedule.window_s,
        "success": endpoint.success.to_json(),
        "timeout_s": endpoint.timeout_s,
        "enabled": endpoint.enabled,
        "description": endpoint.description,
        "rate_limit_per_s": endpoint.rate_limit_per_s,
        "max_in_flight": endpoint.max_in_flight,
    }


def _key_from_row(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        scope=Scope(row.scope),
        key_hash=row.key_hash,
        name=row.name,
        topics=tuple(row.topics),
        endpoint_ids=tuple(row.endpoint_ids),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _attempt_from_row(row: Row[Any]) -> Attempt:
    return Attempt(
        delivery_id=row.delivery_id,
        number=row.number,
        started_at=row.started_at,
        duration_ms=row.duration_ms,
        succeeded=row.succeeded,
        status_code=row.status_code,
        error_class=ErrorClass(row.error_class) if row.error_class else None,
        error_detail=row.error_detail,
        response_excerpt=row.response_excerpt or b"",
        location=row.location,
        retry_after_s=row.retry_after_s,
    )


def _attempt_values(attempt: Attempt) -> dict[str, Any]:
    return {
        "delivery_id": attempt.delivery_id,
        "number": attempt.number,
        "started_at": attempt.started_at,
        "duration_ms": attempt.duration_ms,
        "succeeded": attempt.succeeded,
        "status_code": attempt.status_code,
        "error_class": attempt.error_class.value if attempt.error_class else None,
        "error_detail": attempt.error_detail,
        "response_excerpt": attempt.response_excerpt,
        "location": attempt.location,
        "retry_after_s": attempt.retry_after_s,
    }


def _delivery_from_row(row: Row[Any], found: Sequence[Attempt] = ()) -> Delivery:
    return Delivery(
        id=row.id,
        notification_id=row.notification_id,
        endpoint_id=row.endpoint_id,
        status=DeliveryStatus(row.status),
        attempt_count=row.attempt_count,
        next_attempt_at=row.next_attempt_at,
        deadline_at=row.deadline_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        attempts=tuple(found),
    )


def _notification_from_row(row: Row[Any], found: Sequence[Delivery] = ()) -> Notification:
    return Notification(
        id=row.id,
        seq=row.seq,
        topic=row.topic,
        key=row.key,
        idempotency_key=row.idempotency_key,
        content_type=row.content_type,
        body=row.body,
        status=NotificationStatus(row.status),
        created_at=row.created_at,
        deliveries=tuple(found),
    )


def _summary_status() -> sa.ColumnElement[str]:
    """The notification status derived from its deliveries, as a correlated expression."""
    d = deliveries.alias("d")
    mine = d.c.notification_id == notifications.c.id

    def any_with(*statuses: str) -> sa.Exists:
        return sa.exists().where(mine, d.c.status.in_(statuses))

    return sa.case(
        (any_with(*_LIVE), NotificationStatus.PENDING.value),
        (any_with(DeliveryStatus.EXHAUSTED.value), NotificationStatus.EXHAUSTED.value),
        (any_with(DeliveryStatus.DELIVERED.value), NotificationStatus.DELIVERED.value),
        (any_with(DeliveryStatus.CANCELLED.value), NotificationStatus.CANCELLED.value),
        else_=NotificationStatus.UNROUTED.value,
    )


_STATUS_AFTER = {
    OutcomeKind.DELIVERED: DeliveryStatus.DELIVERED.value,
    OutcomeKind.RETRY: DeliveryStatus.PENDING.value,
    OutcomeKind.EXHAUSTED: DeliveryStatus.EXHAUSTED.value,
}

# Moves a delivery on after an attempt, only while the lease is still the one that made it.
_MOVE_ON = (
    deliveries.update()
    .where(
        deliveries.c.id == sa.bindparam("b_id"),
        deliveries.c.attempt_count == sa.bindparam("b_number"),
        deliveries.c.status == DeliveryStatus.DELIVERING.value,
    )
    .values(
        status=sa.bindparam("b_status"),
        next_attempt_at=sa.bindparam("b_next"),
        lease_owner=None,
        reclaimed=False,
        updated_at=sa.bindparam("b_now"),
    )
)

# The hot path's statements are built once, with every value a parameter: building
# SQLAlchemy expressions per call cost more CPU than SQLite spent running them.
_IDS: sa.BindParameter[Any] = sa.bindparam("b_ids", expanding=True)

# A notification's status, derived again from its deliveries.
_REFRESH_STATUS = (
    notifications.update().where(notifications.c.id.in_(_IDS)).values(status=_summary_status())
)

# What a claim carries of each notification.
_BODIES = sa.select(
    notifications.c.id,
    notifications.c.body,
    notifications.c.content_type,
    notifications.c.topic,
    notifications.c.created_at,
).where(notifications.c.id.in_(_IDS))

# Every gated endpoint, and whether it has work due.
_GATED = sa.select(
    endpoint_health.c.endpoint_id,
    sa.exists()
    .where(
        deliveries.c.endpoint_id == endpoint_health.c.endpoint_id,
        deliveries.c.next_attempt_at <= sa.bindparam("b_now"),
    )
    .label("has_due"),
).where(endpoint_health.c.gated.is_(True))

# The breaker and limits of some endpoints.
_HEALTH_OF = (
    sa.select(
        endpoint_health,
        endpoints.c.rate_limit_per_s,
        endpoints.c.max_in_flight,
        endpoints.c.enabled,
    )
    .join(endpoints, endpoints.c.id == endpoint_health.c.endpoint_id)
    .where(endpoint_health.c.endpoint_id.in_(_IDS))
)


@functools.cache
def _claim_statement(*, excluding: bool, only_ids: bool, one_endpoint: bool) -> sa.Update:
    """Lease up to b_limit due deliveries (oldest due first), in one of the claim's shapes.

    Parameters: b_now, b_limit, b_until (the lease's end), b_owner; b_excluded (endpoints
    left out) when `excluding`, b_ids (deliveries announced) when `only_ids`, b_endpoint
    when `one_endpoint`.
    """
    d = deliveries.c
    now: sa.BindParameter[float] = sa.bindparam("b_now", type_=sa.Float)
    due = (
        sa.select(d.id)
        .where(d.next_attempt_at <= now)
        .order_by(d.next_attempt_at)
        .limit(sa.bindparam("b_limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
    )
    if one_endpoint:
        due = due.where(d.endpoint_id == sa.bindparam("b_endpoint"))
    if excluding:
        due = due.where(d.endpoint_id.not_in(sa.bindparam("b_excluded", expanding=True)))
    if only_ids:
        due = due.where(d.id.in_(sa.bindparam("b_ids", expanding=True)))
    was_leased = d.status == DeliveryStatus.DELIVERING.value
    # A queue subscriber group that did not answer in time is not a crash.
    was_handed_over = sa.and_(was_leased, d.lease_owner.startswith(HAND_OVER_PREFIX))
    return (
        deliveries.update()
        .where(d.id.in_(due.scalar_subquery()), d.next_attempt_at <= now)
        .values(
            # Right-hand sides see the old row: a lease that ran out means the process
            # holding it died (or stalled) mid-attempt.
            reclaimed=was_leased,
            crashes=d.crashes
            + sa.case((sa.and_(was_leased, sa.not_(was_handed_over)), 1), else_=0),
            status=DeliveryStatus.DELIVERING.value,
            attempt_count=d.attempt_count + 1,
            next_attempt_at=sa.bindparam("b_until"),
            # RETURNING shows the new row only: the marker tells which were hand-overs.
            lease_owner=sa.case((was_handed_over, _TAKEN_BACK), else_=sa.bindparam("b_owner")),
            updated_at=now,
        )
        .returning(
            d.id,
            d.notification_id,
            d.endpoint_id,
            d.attempt_count,
            d.deadline_at,
            d.reclaimed,
            d.crashes,
            d.lease_owner,
        )
    )


class _Unattempted(NamedTuple):
    id: str
    notification_id: str
    endpoint_id: str
    attempt_count: int


class SqlStore(Store):
    """The store on any SQLAlchemy async URL; one code path for SQLite and PostgreSQL."""

    def __init__(self, url: str, *, create_schema: bool = True, echo: bool = False) -> None:
        self.url = url
        self._create_schema = create_schema
        self._echo = echo
        self._engine: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._inbox: list[
            tuple[NewNotification, float, asyncio.Future[tuple[Notification, bool]]]
        ] = []
        self._inbox_task: asyncio.Task[None] | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def engine(self) -> AsyncEngine:
        """The engine for transactions that write."""
        if self._engine is None:
            raise RuntimeError("the store is not open; call open() first")
        return self._engine

    @property
    def reader(self) -> AsyncEngine:
        """The engine for reads; on SQLite it does not queue behind the writer."""
        return self._reader or self.engine

    async def open(self) -> None:
        self._engine = create_engine_for(self.url, echo=self._echo)
        if self.is_sqlite and ":memory:" not in self.url:
            self._reader = create_engine_for(self.url, echo=self._echo, writer=False)
        if self._create_schema:
            await upgrade_async(self._engine)

    async def close(self) -> None:
        if self._inbox_task is not None:
            await asyncio.gather(self._inbox_task, return_exceptions=True)
        for engine in (self._engine, self._reader):
            if engine is not None:
                await engine.dispose()
        self._engine = self._reader = None

    # endpoints -------------------------------------------------------------------------

    async def add_endpoint(self, endpoint: Endpoint) -> None:
        async with self.engine.begin() as conn:
            values = _endpoint_values(endpoint)
            await conn.execute(
                endpoints.insert().values(
                    id=endpoint.id,
                    created_at=endpoint.created_at,
                    updated_at=endpoint.created_at,
                    **values,
                )
            )
            await self._write_topics(conn, endpoint)
            await self._sync_gate(conn, endpoint)

    async def _sync_gate(self, conn: AsyncConnection, endpoint: Endpoint) -> None:
        """Keep the health row's `gated` flag true to the endpoint's limits and state."""
        h = endpoint_health.c
        row = (
            await conn.execute(endpoint_health.select().where(h.endpoint_id == endpoint.id))
        ).first()
        health = Health() if row is None else _health_from_row(row)
        gated = is_gated(
            health,
            enabled=endpoint.enabled,
            rate_limit_per_s=endpoint.rate_limit_per_s,
            max_in_flight=endpoint.max_in_flight,
        )
        if row is None and not gated:
            return
        await self._save_health(conn, endpoint.id, health, gated=gated, exists=row is not None)

    async def _write_topics(self, conn: AsyncConnection, endpoint: Endpoint) -> None:
        await conn.execute(
            endpoint_topics.delete().where(endpoint_topics.c.endpoint_id == endpoint.id)
        )
        rows = [{"endpoint_id": endpoint.id, "topic": t} for t in sorted(set(endpoint.topics))]
        if rows:
            await conn.execute(endpoint_topics.insert(), rows)

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        async with self.reader.connect() as conn:
            row = (
                await conn.execute(endpoints.select().where(endpoints.c.id == endpoint_id))
            ).first()
        if row is None:
            raise NotFound(f"no endpoint with id {endpoint_id!r}")
        return _endpoint_from_row(row)

    async def list_endpoints(self) -> list[Endpoint]:
        query = endpoints.select().order_by(endpoints.c.created_at, endpoints.c.id)
        async with self.reader.connect() as conn:
            return [_endpoint_from_row(row) for row in await conn.execute(query)]

    async def replace_endpoint(self, endpoint: Endpoint, now: float) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                endpoints.update()
                .where(endpoints.c.id == endpoint.id)
                .values(updated_at=now, **_endpoint_values(endpoint))
            )
            if result.rowcount == 0:
                raise NotFound(f"no endpoint with id {endpoint.id!r}")
            await self._write_topics(conn, endpoint)
            await self._sync_gate(conn, endpoint)

    async def remove_endpoint(self, endpoint_id: str, now: float) -> int:
        async with self.engine.begin() as conn:
            await conn.execute(
                endpoint_topics.delete().where(endpoint_topics.c.endpoint_id == endpoint_id)
            )
            await conn.execute(
                endpoint_health.delete().where(endpoint_health.c.endpoint_id == endpoint_id)
            )
            result = await conn.execute(endpoints.delete().where(endpoints.c.id == endpoint_id))
            if result.rowcount == 0:
                raise NotFound(f"no endpoint with id {endpoint_id!r}")
            cancelled = await conn.execute(
                deliveries.update()
                .where(deliveries.c.endpoint_id == endpoint_id, deliveries.c.status.in_(_LIVE))
                .values(
                    status=DeliveryStatus.CANCELLED.value,
                    next_attempt_at=None,
                    lease_owner=None,
                    updated_at=now,
                )
                .returning(deliveries.c.notification_id)
            )
            touched = {row.notification_id for row in cancelled}
            await self._refresh_status(conn, touched)
            return len(touched)

    # notifications ---------------------------------------------------------------------

    async def add_notification(self, new: NewNotification, now: float) -> tuple[Notification, bool]:
        # Group commit: concurrent callers share one transaction, which on SQLite (one
        # writer) and on PostgreSQL (one round trip per statement) is most of the cost.
        done: asyncio.Future[tuple[Notification, bool]] = asyncio.get_running_loop().create_future()
        self._inbox.append((new, now, done))
        if self._inbox_task is None or self._inbox_task.done():
            self._inbox_task = asyncio.create_task(
                self._drain_inbox(), name="tidings-notification-writer"
            )
        return await asyncio.shield(done)

    async def _drain_inbox(self) -> None:
        while self._inbox:
            batch = self._inbox[:_INBOX_BATCH]
            del self._inbox[:_INBOX_BATCH]
            try:
                results = await self._insert_batch([(new, now) for new, now, _ in batch])
            except Exception:
                # One bad notification must not fail the others: retry them one by one.
                log.debug("batch insert failed; inserting one by one", exc_info=True)
                for new, now, done in batch:
                    try:
                        result = await self._add_one(new, now)
                    except Exception as exc:
                        done.set_exception(exc)
                    else:
                        done.set_result(result)
                continue
            for (_, _, done), result in zip(batch, results, strict=True):
                done.set_result(result)

    async def _insert_batch(
        self, items: Sequence[tuple[NewNotification, float]]
    ) -> list[tuple[Notification, bool]]:
        """Insert many notifications and their deliveries in one transaction."""
        n = notifications.c
        keys = sorted({new.idempotency_key for new, _ in items if new.idempotency_key})
        async with self.engine.begin() as conn:
            known: dict[str, str] = {}
            if keys:
                found = await conn.execute(
                    sa.select(n.idempotency_key, n.id).where(n.idempotency_key.in_(keys))
                )
                known = {row.idempotency_key: row.id for row in found}
            routes = await self._routes(conn, {new.topic for new, _ in items})
            plan: list[str | int] = []  # an earlier id, or an index into `fresh`
            fresh: list[tuple[NewNotification, float, dict[str, float]]] = []
            claimed_keys: dict[str, int] = {}
            for new, now in items:
                key = new.idempotency_key
                if key is not None and key in known:
                    plan.append(known[key])
                elif key is not None and key in claimed_keys:
                    plan.append(claimed_keys[key])
                else:
                    targets = {**routes.get("*", {}), **routes.get(new.topic, {})}
                    if key is not None:
                        claimed_keys[key] = len(fresh)
                    plan.append(len(fresh))
                    fresh.append((new, now, targets))
            made = await self._insert_fresh(conn, fresh)
        results: list[tuple[Notification, bool]] = []
        first_use: set[int] = set()
        for step in plan:
            if isinstance(step, str):
                results.append((await self.get_notification(step), False))
            elif step in first_use:
                results.append((await self.get_notification(made[step].id), False))
            else:
                first_use.add(step)
                results.append((made[step], True))
        return results

    async def _insert_fresh(
        self,
        conn: AsyncConnection,
        fresh: Sequence[tuple[NewNotification, float, dict[str, float]]],
    ) -> list[Notification]:
        if not fresh:
            return []
        ids = [new_id("msg_") for _ in fresh]
        statuses = [
            NotificationStatus.PENDING if targets else NotificationStatus.UNROUTED
            for _, _, targets in fresh
        ]
        rows = [
            {
                "id": notification_id,
                "topic": new.topic,
                "key": new.key,
                "idempotency_key": new.idempotency_key,
                "content_type": new.content_type,
                "body": new.body,
                "status": status.value,
                "created_at": now,
            }
            for notification_id, (new, now, _), status in zip(ids, fresh, statuses, strict=True)
        ]
        returned = await conn.execute(
            notifications.insert().returning(
                notifications.c.id, notifications.c.seq, sort_by_parameter_order=True
            ),
            rows,
        )
        seqs = {row.id: row.seq for row in returned}
        made: list[Notification] = []
        delivery_rows: list[dict[str, Any]] = []
        for notification_id, (new, now, targets), status in zip(ids, fresh, statuses, strict=True):
            found = tuple(
                Delivery(
                    id=new_id("dlv_"),
                    notification_id=notification_id,
                    endpoint_id=endpoint_id,
                    status=DeliveryStatus.PENDING,
                    attempt_count=0,
                    next_attempt_at=now,
                    deadline_at=now + window_s,
                    created_at=now,
                    updated_at=now,
                )
                for endpoint_id, window_s in targets.items()
            )
            delivery_rows.extend(
                {
                    "id": d.id,
                    "notification_id": d.notification_id,
                    "endpoint_id": d.endpoint_id,
                    "status": d.status.value,
                    "attempt_count": 0,
                    "next_attempt_at": d.next_attempt_at,
                    "deadline_at": d.deadline_at,
                    "reclaimed": False,
                    "crashes": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for d in found
            )
            made.append(
                Notification(
                    id=notification_id,
                    seq=seqs[notification_id],
                    topic=new.topic,
                    key=new.key,
                    idempotency_key=new.idempotency_key,
                    content_type=new.content_type,
                    body=new.body,
                    status=status,
                    created_at=now,
                    deliveries=found,
                )
            )
        if delivery_rows:
            await conn.execute(deliveries.insert(), delivery_rows)
        return made

    async def _add_one(self, new: NewNotification, now: float) -> tuple[Notification, bool]:
        if new.idempotency_key is not None:
            earlier = await self._by_idempotency_key(new.idempotency_key)
            if earlier is not None:
                return earlier, False
        try:
            return await self._insert_notification(new, now), True
        except IntegrityError:
            # A concurrent request with the same idempotency key won the race.
            if new.idempotency_key is None:
                raise
            earlier = await self._by_idempotency_key(new.idempotency_key)
            if earlier is None:
                raise
            return earlier, False

    async def _by_idempotency_key(self, idempotency_key: str) -> Notification | None:
        async with self.reader.connect() as conn:
            found = (
                await conn.execute(
                    sa.select(notifications.c.id).where(
                        notifications.c.idempotency_key == idempotency_key
                    )
                )
            ).scalar()
        return None if found is None else await self.get_notification(found)

    async def _insert_notification(self, new: NewNotification, now: float) -> Notification:
        async with self.engine.begin() as conn:
            routes = await self._routes(conn, {new.topic})
            targets = {**routes.get("*", {}), **routes.get(new.topic, {})}
            [made] = await self._insert_fresh(conn, [(new, now, targets)])
        return made

    async def _routes(self, conn: AsyncConnection, topics: set[str]) -> dict[str, dict[str, float]]:
        """Enabled endpoints (id -> window) by topic, for `topics` and the wildcard."""
        t = endpoint_topics.c
        routes: dict[str, dict[str, float]] = {}
        for row in await conn.execute(
            sa.select(t.topic, endpoints.c.id, endpoints.c.window_s)
            .join(endpoints, endpoints.c.id == t.endpoint_id)
            .where(t.topic.in_(sorted(topics | {"*"})), endpoints.c.enabled.is_(True))
        ):
            routes.setdefault(row.topic, {})[row.id] = row.window_s
        return routes

    async def _one_snapshot(self, conn: AsyncConnection) -> None:
        """Make the reads on `conn` see one snapshot, so a record is never read half-written.

        PostgreSQL's default READ COMMITTED takes a new snapshot per statement; SQLite's
        read transaction already keeps one.
        """
        if not self.is_sqlite:
            await conn.execution_options(isolation_level="REPEATABLE READ")

    async def get_notification(self, notification_id: str) -> Notification:
        async with self.reader.connect() as conn:
            await self._one_snapshot(conn)
            row = (
                await conn.execute(
                    notifications.select().where(notifications.c.id == notification_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no notification with id {notification_id!r}")
            delivery_rows = (
                await conn.execute(
                    deliveries.select()
                    .where(deliveries.c.notification_id == notification_id)
                    .order_by(deliveries.c.created_at, deliveries.c.id)
                )
            ).all()
            by_delivery: dict[str, list[Attempt]] = {d.id: [] for d in delivery_rows}
            if by_delivery:
                attempt_rows = await conn.execute(
                    attempts.select()
                    .where(attempts.c.delivery_id.in_(list(by_delivery)))
                    .order_by(attempts.c.delivery_id, attempts.c.number)
                )
                for attempt_row in attempt_rows:
                    by_delivery[attempt_row.delivery_id].append(_attempt_from_row(attempt_row))
        found = [_delivery_from_row(d, by_delivery[d.id]) for d in delivery_rows]
        return _notification_from_row(row, found)

    async def list_notifications(self, query: NotificationQuery) -> Page:
        n = notifications.c
        select = notifications.select().where(n.seq > query.after_seq)
        if query.topic is not None:
            select = select.where(n.topic == query.topic)
        if query.key is not None:
            select = select.where(n.key == query.key)
        if query.status is not None:
            select = select.where(n.status == query.status.value)
        if query.created_after is not None:
            select = select.where(n.created_at > query.created_after)
        if query.endpoint_ids is not None:
            routed = sa.exists().where(
                deliveries.c.notification_id == n.id,
                deliveries.c.endpoint_id.in_(sorted(query.endpoint_ids)),
            )
            select = select.where(routed)
        select = select.order_by(n.seq).limit(query.limit + 1)
        async with self.reader.connect() as conn:
            await self._one_snapshot(conn)
            rows = (await conn.execute(select)).all()
            page = rows[: query.limit]
            by_notification: dict[str, list[Delivery]] = {row.id: [] for row in page}
            if page:
                for d in await conn.execute(
                    deliveries.select()
                    .where(deliveries.c.notification_id.in_(list(by_notification)))
                    .order_by(deliveries.c.created_at, deliveries.c.id)
                ):
                    by_notification[d.notification_id].append(_delivery_from_row(d))
        items = [_notification_from_row(row, by_notification[row.id]) for row in page]
        next_seq = page[-1].seq if len(rows) > query.limit else None
        return Page(items=items, next_seq=next_seq)

    async def redeliver(
        self, notification_id: str, now: float, endpoint_ids: frozenset[str] | None = None
    ) -> list[str]:
        async with self.engine.begin() as conn:
            exists = (
                await conn.execute(
                    sa.select(n_id := notifications.c.id).where(n_id == notification_id)
                )
            ).first()
            if exists is None:
                raise NotFound(f"no notification with id {notification_id!r}")
            d = deliveries.c
            where = [
                d.notification_id == notification_id,
                # A leased delivery is being attempted right now; a second one would overlap.
                d.status.in_(
                    (
                        DeliveryStatus.PENDING.value,
                        # Not cancelled ones: their endpoint is gone, a final state stays.
                        DeliveryStatus.EXHAUSTED.value,
                    )
                ),
            ]
            if endpoint_ids is not None:
                where.append(d.endpoint_id.in_(sorted(endpoint_ids)))
            touched = await conn.execute(
                deliveries.update()
                .where(*where)
                .values(
                    status=DeliveryStatus.PENDING.value,
                    next_attempt_at=now,
                    # A manual redelivery gets an attempt even after the window closed.
                    deadline_at=sa.func.max(d.deadline_at, now + REDELIVERY_GRACE_S)
                    if self.is_sqlite
                    else sa.func.greatest(d.deadline_at, now + REDELIVERY_GRACE_S),
                    crashes=0,
                    updated_at=now,
                )
                .returning(d.id)
            )
            ids = [row.id for row in touched]
            await self._refresh_status(conn, {notification_id})
            return ids

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
        async with self.engine.begin() as conn:
            # Read in the claim's own transaction: one snapshot, and no second connection.
            gated = await self._gated(conn, now)
            excluded = [*exclude_endpoints, *gated]
            statement = _claim_statement(
                excluding=bool(excluded), only_ids=delivery_ids is not None, one_endpoint=False
            )
            params: dict[str, Any] = {"b_limit": limit}
            if excluded:
                params["b_excluded"] = excluded
            if delivery_ids is not None:
                params["b_ids"] = list(delivery_ids)
            claims = await self._lease(conn, statement, params, now, lease_s, owner, max_crashes)
        for endpoint_id, has_due in gated.items():
            room = limit - len(claims)
            if room <= 0:
                break
            if has_due and endpoint_id not in exclude_endpoints:
                claims += await self._claim_gated(
                    endpoint_id, now, room, lease_s, owner, max_crashes
                )
        return claims

    async def _gated(self, conn: AsyncConnection, now: float) -> dict[str, bool]:
        """Every endpoint whose claims go through the gate, and whether it has work due.

        All of them are kept out of the plain claim, not only those with work due now:
        a delivery may fall due between this read and that claim.
        """
        rows = await conn.execute(_GATED, {"b_now": now})
        return {row.endpoint_id: bool(row.has_due) for row in rows}

    async def _claim_gated(
        self,
        endpoint_id: str,
        now: float,
        limit: int,
        lease_s: float,
        owner: str,
        max_crashes: int,
    ) -> list[Claim]:
        """Claim for one gated endpoint under its circuit breaker and limits."""
        d, h, e = deliveries.c, endpoint_health.c, endpoints.c
        async with self.engine.begin() as conn:
            # The row lock makes dispatchers take turns at this endpoint's gate.
            row = (
                await conn.execute(
                    sa.select(endpoint_health, e.rate_limit_per_s, e.max_in_flight, e.enabled)
                    .join(endpoints, e.id == h.endpoint_id)
                    .where(h.endpoint_id == endpoint_id)
                    .with_for_update(of=endpoint_health)
                )
            ).first()
            if row is None:
                return []
            await self._expire_held(conn, endpoint_id, now)
            if not row.enabled:
                return []
            health = _health_from_row(row)
            in_flight = (
                await conn.execute(
                    sa.select(sa.func.count()).where(
                        d.endpoint_id == endpoint_id,
                        d.status == DeliveryStatus.DELIVERING.value,
                        d.next_attempt_at > now,
                    )
                )
            ).scalar_one()
            room = min(
                limit,
                admissible(
                    health,
                    now=now,
                    in_flight=in_flight,
                    rate_limit_per_s=row.rate_limit_per_s,
                    max_in_flight=row.max_in_flight,
                ),
            )
            if room <= 0:
                return []
            statement = _claim_statement(excluding=False, only_ids=False, one_endpoint=True)
            params = {"b_limit": room, "b_endpoint": endpoint_id}
            claims = await self._lease(conn, statement, params, now, lease_s, owner, max_crashes)
            spent = spend(
                health, now=now, started=len(claims), rate_limit_per_s=row.rate_limit_per_s
            )
            if spent.next_slot_at != health.next_slot_at:
                await conn.execute(
                    endpoint_health.update()
                    .where(h.endpoint_id == endpoint_id)
                    .values(next_slot_at=spent.next_slot_at)
                )
            return claims

    async def _expire_held(self, conn: AsyncConnection, endpoint_id: str, now: float) -> None:
        """Deliveries held back at the gate past their window are exhausted, unattempted."""
        d = deliveries.c
        expired = await conn.execute(
            deliveries.update()
            .where(
                d.endpoint_id == endpoint_id,
                d.status == DeliveryStatus.PENDING.value,
                d.next_attempt_at <= now,
                d.deadline_at < now,
            )
            .values(status=DeliveryStatus.EXHAUSTED.value, next_attempt_at=None, updated_at=now)
            .returning(d.id, d.notification_id, d.endpoint_id, d.attempt_count)
        )
        rows = expired.all()
        await self._refresh_status(conn, {row.notification_id for row in rows})
        await self._announce_unattempted(conn, rows, now, "held back until the window closed")

    async def _announce_unattempted(
        self, conn: AsyncConnection, rows: Sequence[Any], now: float, why: str
    ) -> None:
        """Tell `tidings.delivery.exhausted` subscribers, in the same transaction."""
        if not rows:
            return
        n = notifications.c
        topics = {
            row.id: row.topic
            for row in await conn.execute(
                sa.select(n.id, n.topic).where(n.id.in_(sorted({r.notification_id for r in rows})))
            )
        }
        notices = [
            exhausted_notice(
                notification_id=row.notification_id,
                delivery_id=row.id,
                endpoint_id=row.endpoint_id,
                topic=topics.get(row.notification_id, ""),
                attempts=row.attempt_count,
                last_status_code=None,
                last_error=why,
            )
            for row in rows
        ]
        wanted = [notice for notice in notices if notice is not None]
        if not wanted:
            return
        found = await self._routes(conn, {DELIVERY_EXHAUSTED})
        routes = {**found.get("*", {}), **found.get(DELIVERY_EXHAUSTED, {})}
        keys = [notice.idempotency_key for notice in wanted]
        seen = {
            row.idempotency_key
            for row in await conn.execute(
                sa.select(n.idempotency_key).where(n.idempotency_key.in_(keys))
            )
        }
        fresh = [(notice, now, routes) for notice in wanted if notice.idempotency_key not in seen]
        await self._insert_fresh(conn, fresh)

    async def _lease(
        self,
        conn: AsyncConnection,
        statement: sa.Update,
        params: dict[str, Any],
        now: float,
        lease_s: float,
        owner: str,
        max_crashes: int,
    ) -> list[Claim]:
        """Lease what `statement` (a `_claim_statement`) selects; record lost attempts;
        refuse late ones."""
        d = deliveries.c
        params = {**params, "b_now": now, "b_until": now + lease_s, "b_owner": owner}
        leased = (await conn.execute(statement, params)).all()
        if not leased:
            return []
        taken_back = {row.id for row in leased if row.lease_owner == _TAKEN_BACK}
        if taken_back:
            await conn.execute(
                deliveries.update().where(d.id.in_(sorted(taken_back))).values(lease_owner=owner)
            )
        lost = [row for row in leased if row.reclaimed]
        if lost:
            await self._record_lost_attempts(conn, lost, now, timed_out=taken_back)
        # No attempt after the window: a delivery found due too late (the dispatchers were
        # down, say) is exhausted without one.
        doomed = {
            row.id
            for row in leased
            if now > row.deadline_at
            or (row.reclaimed and row.id not in taken_back and row.crashes >= max_crashes)
        }
        if doomed:
            await conn.execute(
                deliveries.update()
                .where(d.id.in_(sorted(doomed)))
                .values(
                    status=DeliveryStatus.EXHAUSTED.value,
                    attempt_count=d.attempt_count - 1,
                    next_attempt_at=None,
                    lease_owner=None,
                    updated_at=now,
                )
            )
            await self._refresh_status(
                conn, {row.notification_id for row in leased if row.id in doomed}
            )
            await self._announce_unattempted(
                conn,
                [
                    _Unattempted(
                        row.id, row.notification_id, row.endpoint_id, row.attempt_count - 1
                    )
                    for row in leased
                    if row.id in doomed
                ],
                now,
                "window closed or dispatcher died mid-attempt",
            )
            log.error(
                "gave up on %d deliveries: window closed or dispatcher died mid-attempt",
                len(doomed),
                extra={"action": "exhausted_unattempted", "delivery_ids": sorted(doomed)},
            )
        live = [row for row in leased if row.id not in doomed]
        bodies = await self._bodies(conn, {row.notification_id for row in live})
        return [
            Claim(
                delivery_id=row.id,
                notification_id=row.notification_id,
                endpoint_id=row.endpoint_id,
                attempt_number=row.attempt_count,
                body=bodies[row.notification_id].body,
                content_type=bodies[row.notification_id].content_type,
                topic=bodies[row.notification_id].topic,
                created_at=bodies[row.notification_id].created_at,
                deadline_at=row.deadline_at,
                suspect=row.crashes > 0,
            )
            for row in live
        ]

    async def _record_lost_attempts(
        self,
        conn: AsyncConnection,
        lost: Sequence[Row[Any]],
        now: float,
        timed_out: Collection[str] = (),
    ) -> None:
        # The lost attempt is the one numbered just before this claim's.
        lost_attempts = [
            _attempt_values(
                lost_attempt(row.id, row.attempt_count - 1, now, timed_out=row.id in timed_out)
            )
            for row in lost
            if row.attempt_count > 1
        ]
        known = set()
        if lost_attempts:
            keys = [(a["delivery_id"], a["number"]) for a in lost_attempts]
            existing = await conn.execute(
                sa.select(attempts.c.delivery_id, attempts.c.number).where(
                    sa.tuple_(attempts.c.delivery_id, attempts.c.number).in_(keys)
                )
            )
            known = {(row.delivery_id, row.number) for row in existing}
        fresh = [a for a in lost_attempts if (a["delivery_id"], a["number"]) not in known]
        if fresh:
            await conn.execute(attempts.insert(), fresh)

    async def _bodies(self, conn: AsyncConnection, ids: set[str]) -> dict[str, Any]:
        if not ids:
            return {}
        rows = await conn.execute(_BODIES, {"b_ids": sorted(ids)})
        return {row.id: row for row in rows}

    async def renew_leases(self, *, owner: str, now: float, lease_s: float) -> int:
        d = deliveries.c
        async with self.engine.begin() as conn:
            result = await conn.execute(
                deliveries.update()
                .where(d.lease_owner == owner, d.status == DeliveryStatus.DELIVERING.value)
                .values(next_attempt_at=now + lease_s)
            )
            return int(result.rowcount)

    async def release(self, claims: Sequence[Claim], now: float) -> None:
        if not claims:
            return
        d = deliveries.c
        async with self.engine.begin() as conn:
            for claim in claims:
                await conn.execute(
                    deliveries.update()
                    .where(
                        d.id == claim.delivery_id,
                        d.attempt_count == claim.attempt_number,
                        d.status == DeliveryStatus.DELIVERING.value,
                    )
                    .values(
                        status=DeliveryStatus.PENDING.value,
                        attempt_count=d.attempt_count - 1,
                        next_attempt_at=now,
                        lease_owner=None,
                        updated_at=now,
                    )
                )

    async def hand_over(self, claim: Claim, until: float, owner: str) -> bool:
        d = deliveries.c
        async with self.engine.begin() as conn:
            result = await conn.execute(
                deliveries.update()
                .where(
                    d.id == claim.delivery_id,
                    d.attempt_count == claim.attempt_number,
                    d.status == DeliveryStatus.DELIVERING.value,
                )
                .values(lease_owner=owner, next_attempt_at=until)
            )
            return bool(result.rowcount == 1)

    async def get_claim(self, delivery_id: str, attempt_number: int) -> Claim | None:
        d, n = deliveries.c, notifications.c
        async with self.reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(d.id, d.notification_id, d.endpoint_id, d.deadline_at)
                    .add_columns(n.body, n.content_type, n.topic, n.created_at)
                    .join(notifications, n.id == d.notification_id)
                    .where(
                        d.id == delivery_id,
                        d.attempt_count == attempt_number,
                        d.status == DeliveryStatus.DELIVERING.value,
                    )
                )
            ).first()
        if row is None:
            return None
        return Claim(
            delivery_id=row.id,
            notification_id=row.notification_id,
            endpoint_id=row.endpoint_id,
            attempt_number=attempt_number,
            body=row.body,
            content_type=row.content_type,
            topic=row.topic,
            created_at=row.created_at,
            deadline_at=row.deadline_at,
        )

    async def record_outcomes(
        self, outcomes: Sequence[Outcome], now: float, policy: HealthPolicy | None = None
    ) -> list[str]:
        if not outcomes:
            return []
        async with self.engine.begin() as conn:
            if not await self._record_all_current(conn, outcomes, now):
                for outcome in outcomes:
                    await self._record_one(conn, outcome, now)
            await self._refresh_status(conn, {o.claim.notification_id for o in outcomes})
            return await self._update_health(conn, outcomes, now, policy or HealthPolicy())

    async def _record_all_current(
        self, conn: AsyncConnection, outcomes: Sequence[Outcome], now: float
    ) -> bool:
        """The fast path: every lease is still ours, so two executemany calls record all.

        Returns False, having changed nothing, when some lease was taken over meanwhile.
        """
        if len(outcomes) == 1 or not conn.dialect.supports_sane_multi_rowcount:
            return False
        nested = await conn.begin_nested()
        result = await conn.execute(
            _MOVE_ON,
            [
                {
                    "b_id": o.claim.delivery_id,
                    "b_number": o.claim.attempt_number,
                    "b_status": _STATUS_AFTER[o.kind],
                    "b_next": o.next_attempt_at,
                    "b_now": now,
                }
                for o in outcomes
            ],
        )
        if result.rowcount != len(outcomes):
            await nested.rollback()
            return False
        await conn.execute(attempts.insert(), [_attempt_values(o.attempt) for o in outcomes])
        await nested.commit()
        return True

    async def _record_one(self, conn: AsyncConnection, outcome: Outcome, now: float) -> None:
        claim = outcome.claim
        result = await conn.execute(
            _MOVE_ON,
            {
                "b_id": claim.delivery_id,
                "b_number": claim.attempt_number,
                "b_status": _STATUS_AFTER[outcome.kind],
                "b_next": outcome.next_attempt_at,
                "b_now": now,
            },
        )
        if result.rowcount == 1:
            await conn.execute(attempts.insert(), [_attempt_values(outcome.attempt)])
        else:
            await self._record_late(conn, outcome, now)

    async def _update_health(
        self, conn: AsyncConnection, outcomes: Sequence[Outcome], now: float, policy: HealthPolicy
    ) -> list[str]:
        """Feed the circuit breakers; returns endpoints disabled for failing too long."""
        # An attempt the dispatcher cut short itself (its store went away, it stopped) says
        # nothing about the receiver: it must not open the endpoint's circuit.
        outcomes = [o for o in outcomes if o.attempt.error_class is not ErrorClass.INTERRUPTED]
        if not outcomes:
            return []
        e = endpoints.c
        involved = sorted({o.claim.endpoint_id for o in outcomes})
        rows = await conn.execute(_HEALTH_OF, {"b_ids": involved})
        known = {row.endpoint_id: row for row in rows}
        failing = {o.claim.endpoint_id for o in outcomes if not o.attempt.succeeded}
        disabled: list[str] = []
        for endpoint_id in involved:
            row = known.get(endpoint_id)
            if row is None and endpoint_id not in failing:
                continue  # healthy and never failed: nothing to write on the hot path
            health = _health_from_row(row) if row is not None else Health()
            for outcome in outcomes:
                if outcome.claim.endpoint_id != endpoint_id:
                    continue
                if outcome.attempt.succeeded:
                    health = health.after_success()
                else:
                    health = health.after_failure(
                        at=outcome.attempt.started_at,
                        now=now,
                        policy=policy,
                        retry_after_s=outcome.attempt.retry_after_s,
                    )
            enabled = True if row is None else bool(row.enabled)
            if enabled and health.should_disable(now, policy):
                enabled = False
                disabled.append(endpoint_id)
                await conn.execute(
                    endpoints.update()
                    .where(e.id == endpoint_id)
                    .values(enabled=False, updated_at=now)
                )
            limits = await self._limits(conn, endpoint_id) if row is None else row
            if limits is None:
                continue  # removed meanwhile
            await self._save_health(
                conn,
                endpoint_id,
                health,
                gated=is_gated(
                    health,
                    enabled=enabled,
                    rate_limit_per_s=limits.rate_limit_per_s,
                    max_in_flight=limits.max_in_flight,
                ),
                exists=row is not None,
            )
        return disabled

    async def _limits(self, conn: AsyncConnection, endpoint_id: str) -> Any:
        e = endpoints.c
        return (
            await conn.execute(
                sa.select(e.rate_limit_per_s, e.max_in_flight).where(e.id == endpoint_id)
            )
        ).first()

    async def _save_health(
        self, conn: AsyncConnection, endpoint_id: str, health: Health, *, gated: bool, exists: bool
    ) -> None:
        values = {
            "gated": gated,
            "consecutive_failures": health.consecutive_failures,
            "failing_since": health.failing_since,
            "circuit_open_until": health.circuit_open_until,
            "circuit_opens": health.circuit_opens,
        }
        if exists:
            # Only the gate moves the rate limiter's slot, under its row lock; writing back
            # the value read here could undo a claim made meanwhile by another dispatcher.
            # Limitation: two dispatchers recording failures for one endpoint at the same
            # moment may each count from the same old value (one failure goes uncounted).
            await conn.execute(
                endpoint_health.update()
                .where(endpoint_health.c.endpoint_id == endpoint_id)
                .values(**values)
            )
            return
        try:
            async with conn.begin_nested():
                await conn.execute(
                    endpoint_health.insert().values(endpoint_id=endpoint_id, **values)
                )
        except IntegrityError:
            # Another dispatcher made the row first; ours is the later news.
            await conn.execute(
                endpoint_health.update()
                .where(endpoint_health.c.endpoint_id == endpoint_id)
                .values(**values)
            )

    async def endpoint_health(self, endpoint_id: str) -> Health:
        """The breaker and limiter state of one endpoint (a fresh Health when none)."""
        async with self.reader.connect() as conn:
            row = (
                await conn.execute(
                    endpoint_health.select().where(endpoint_health.c.endpoint_id == endpoint_id)
                )
            ).first()
        return Health() if row is None else _health_from_row(row)

    async def _record_late(self, conn: AsyncConnection, outcome: Outcome, now: float) -> None:
        """An attempt finished after its lease was taken over: keep what it learned."""
        a = attempts.c
        values = _attempt_values(outcome.attempt)
        replaced = await conn.execute(
            attempts.update()
            .where(
                a.delivery_id == outcome.attempt.delivery_id,
                a.number == outcome.attempt.number,
                a.error_class == ErrorClass.INTERRUPTED.value,
            )
            .values(**values)
        )
        if replaced.rowcount == 0:
            try:
                async with conn.begin_nested():
                    await conn.execute(attempts.insert(), [values])
            except IntegrityError:
                log.warning(
                    "attempt %s of %s was already recorded",
                    outcome.attempt.number,
                    outcome.attempt.delivery_id,
                )
        if outcome.kind is OutcomeKind.DELIVERED:
            d = deliveries.c
            await conn.execute(
                deliveries.update()
                .where(d.id == outcome.claim.delivery_id, d.status.in_(_LIVE))
                .values(
                    status=DeliveryStatus.DELIVERED.value,
                    next_attempt_at=None,
                    lease_owner=None,
                    updated_at=now,
                )
            )

    async def _refresh_status(self, conn: AsyncConnection, notification_ids: set[str]) -> None:
        if not notification_ids:
            return
        await conn.execute(_REFRESH_STATUS, {"b_ids": sorted(notification_ids)})

    async def next_due_at(self) -> float | None:
        async with self.reader.connect() as conn:
            value = (
                await conn.execute(sa.select(sa.func.min(deliveries.c.next_attempt_at)))
            ).scalar()
        return None if value is None else float(value)

    # API keys --------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id=key.id,
                    key_hash=key.key_hash,
                    scope=key.scope.value,
                    name=key.name,
                    topics=list(key.topics),
                    endpoint_ids=list(key.endpoint_ids),
                    created_at=key.created_at,
                    revoked_at=key.revoked_at,
                )
            )

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        async with self.reader.connect() as conn:
            row = (
                await conn.execute(api_keys.select().where(api_keys.c.key_hash == key_hash))
            ).first()
        return None if row is None else _key_from_row(row)

    async def list_keys(self) -> list[ApiKey]:
        query = api_keys.select().order_by(api_keys.c.created_at, api_keys.c.id)
        async with self.reader.connect() as conn:
            return [_key_from_row(row) for row in await conn.execute(query)]

    async def revoke_key(self, key_id: str, now: float) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            if result.rowcount == 0:
                exists = (
                    await conn.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id))
                ).first()
                if exists is None:
                    raise NotFound(f"no API key with id {key_id!r}")

    async def stats(self) -> dict[str, Any]:
        async with self.reader.connect() as conn:
            rows = await conn.execute(
                sa.select(deliveries.c.status, sa.func.count()).group_by(deliveries.c.status)
            )
            counts = {row[0]: int(row[1]) for row in rows}
        return {"deliveries": counts}
