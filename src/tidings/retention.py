"""Retention: notifications that reached a final state long ago are purged in small batches.

A delivered notification is kept for `retention_delivered_s` after its last delivery
settled; an exhausted, cancelled or unrouted one for `retention_exhausted_s`, so an
operator has longer to look into what failed. A notification with a live (pending or
delivering) delivery is never touched, however old.

The purge works on the SQL store's engine directly (SQLAlchemy Core), so the `Store`
interface and the in-memory fake need no method for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tidings.clock import Clock
from tidings.durations import format_duration
from tidings.models import DeliveryStatus, NotificationStatus
from tidings.settings import Settings
from tidings.stores.base import Store
from tidings.stores.sql import SqlStore
from tidings.stores.tables import attempts, deliveries, notifications

log = logging.getLogger(__name__)

_LIVE = frozenset({DeliveryStatus.PENDING.value, DeliveryStatus.DELIVERING.value})
_KEPT_LONGER = (
    NotificationStatus.EXHAUSTED.value,
    NotificationStatus.CANCELLED.value,
    NotificationStatus.UNROUTED.value,
)
# The first delivery status present decides the notification's summary, as in the store.
_SUMMARY_ORDER = (
    (DeliveryStatus.EXHAUSTED.value, NotificationStatus.EXHAUSTED.value),
    (DeliveryStatus.DELIVERED.value, NotificationStatus.DELIVERED.value),
    (DeliveryStatus.CANCELLED.value, NotificationStatus.CANCELLED.value),
)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long final notifications are kept, counted from when they became final."""

    delivered_s: float = 30 * 86400.0
    exhausted_s: float = 90 * 86400.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """The policy an operator configured."""
        return cls(settings.retention_delivered_s, settings.retention_exhausted_s)

    def keep_s(self, status: str) -> float:
        """How long a notification with summary `status` is kept once final."""
        if status == NotificationStatus.DELIVERED.value:
            return self.delivered_s
        return self.exhausted_s

    def describe(self) -> str:
        """The policy in one line, with the settings that change it."""
        return (
            f"delivered kept {format_duration(self.delivered_s)} "
            f"(TIDINGS_RETENTION_DELIVERED_S), exhausted, cancelled and unrouted kept "
            f"{format_duration(self.exhausted_s)} (TIDINGS_RETENTION_EXHAUSTED_S)"
        )


@dataclass(frozen=True)
class PurgeReport:
    """What a purge removed, or with a dry run what it would remove."""

    notifications: int = 0
    deliveries: int = 0
    attempts: int = 0
    batches: int = 0
    by_status: Mapping[str, int] = field(default_factory=dict)

    def plus(self, other: PurgeReport) -> PurgeReport:
        """The sum of two reports."""
        return PurgeReport(
            notifications=self.notifications + other.notifications,
            deliveries=self.deliveries + other.deliveries,
            attempts=self.attempts + other.attempts,
            batches=self.batches + other.batches,
            by_status=dict(Counter(self.by_status) + Counter(other.by_status)),
        )

    def describe(self) -> str:
        """One line for operators, e.g. `3 notifications (3 delivered), 3 deliveries, ...`."""
        statuses = ", ".join(f"{count} {name}" for name, count in sorted(self.by_status.items()))
        return (
            f"{self.notifications} notifications"
            + (f" ({statuses})" if statuses else "")
            + f", {self.deliveries} deliveries, {self.attempts} attempts"
        )


@dataclass(frozen=True)
class _Candidate:
    seq: int
    id: str
    created_at: float


def _expired_query(
    now: float, policy: RetentionPolicy, limit: int, after_seq: int
) -> sa.Select[Any]:
    """Notifications past retention, oldest first; the caller re-checks them under lock."""
    n, d = notifications.c, deliveries.c
    settled_at = sa.func.coalesce(
        sa.select(sa.func.max(d.updated_at)).where(d.notification_id == n.id).scalar_subquery(),
        n.created_at,
    )
    delivered_cutoff = now - policy.delivered_s
    kept_cutoff = now - policy.exhausted_s
    expired = sa.or_(
        sa.and_(
            n.status == NotificationStatus.DELIVERED.value,
            # A plain column test before the correlated maximum: settling follows creation.
            n.created_at < delivered_cutoff,
            settled_at < delivered_cutoff,
        ),
        sa.and_(
            n.status.in_(_KEPT_LONGER),
            n.created_at < kept_cutoff,
            settled_at < kept_cutoff,
        ),
    )
    live = sa.exists().where(d.notification_id == n.id, d.status.in_(sorted(_LIVE)))
    return (
        sa.select(n.seq, n.id, n.created_at)
        .where(n.seq > after_seq, expired, ~live)
        .order_by(n.seq)
        .limit(limit)
    )


def _summary(statuses: set[str]) -> str | None:
    """The notification's summary status from its deliveries; None while one is live."""
    if statuses & _LIVE:
        return None
    for delivery_status, summary in _SUMMARY_ORDER:
        if delivery_status in statuses:
            return summary
    return NotificationStatus.UNROUTED.value


async def _confirm(
    conn: AsyncConnection,
    candidates: Sequence[_Candidate],
    now: float,
    policy: RetentionPolicy,
    *,
    lock: bool,
) -> dict[str, str]:
    """The candidates still past retention, by id, with their summary status.

    With `lock`, their deliveries are locked first (in id order, so two purgers cannot
    deadlock each other): a redelivery that made one live again meanwhile either
    committed before, and is seen here, or waits until the purge has committed.
    """
    d = deliveries.c
    query = (
        sa.select(d.notification_id, d.status, d.updated_at)
        .where(d.notification_id.in_([c.id for c in candidates]))
        .order_by(d.id)
    )
    if lock:
        query = query.with_for_update()
    statuses: dict[str, set[str]] = {c.id: set() for c in candidates}
    settled_at = {c.id: c.created_at for c in candidates}
    for row in await conn.execute(query):
        statuses[row.notification_id].add(row.status)
        settled_at[row.notification_id] = max(settled_at[row.notification_id], row.updated_at)
    confirmed: dict[str, str] = {}
    for candidate in candidates:
        summary = _summary(statuses[candidate.id])
        if summary is not None and settled_at[candidate.id] < now - policy.keep_s(summary):
            confirmed[candidate.id] = summary
    return confirmed


async def _count_children(conn: AsyncConnection, ids: list[str]) -> tuple[int, int]:
    d = deliveries.c
    mine = sa.select(d.id).where(d.notification_id.in_(ids))
    delivery_count = (
        await conn.execute(sa.select(sa.func.count()).where(d.notification_id.in_(ids)))
    ).scalar_one()
    attempt_count = (
        await conn.execute(sa.select(sa.func.count()).where(attempts.c.delivery_id.in_(mine)))
    ).scalar_one()
    return int(delivery_count), int(attempt_count)


async def _delete(conn: AsyncConnection, ids: list[str]) -> tuple[list[str], int, int]:
    """Delete the notifications and what hangs off them; returns the ids really deleted."""
    d, n = deliveries.c, notifications.c
    mine = sa.select(d.id).where(d.notification_id.in_(ids))
    gone_attempts = await conn.execute(attempts.delete().where(attempts.c.delivery_id.in_(mine)))
    gone_deliveries = await conn.execute(deliveries.delete().where(d.notification_id.in_(ids)))
    # Another purger may have taken an unrouted one (no delivery rows to lock) first.
    gone = await conn.execute(notifications.delete().where(n.id.in_(ids)).returning(n.id))
    return [row.id for row in gone], int(gone_deliveries.rowcount), int(gone_attempts.rowcount)


async def purge_batch(
    engine: AsyncEngine,
    *,
    now: float,
    policy: RetentionPolicy,
    limit: int,
    dry_run: bool = False,
    after_seq: int = 0,
) -> tuple[PurgeReport, int | None]:
    """Purge (or with `dry_run` count) up to `limit` expired notifications in one transaction.

    Returns the report and the seq to continue after, or None when nothing is left.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    async with engine.begin() as conn:
        rows = (await conn.execute(_expired_query(now, policy, limit, after_seq))).all()
        if not rows:
            return PurgeReport(), None
        candidates = [_Candidate(row.seq, row.id, row.created_at) for row in rows]
        confirmed = await _confirm(conn, candidates, now, policy, lock=not dry_run)
        ids = sorted(confirmed)
        if not ids:
            gone: tuple[list[str], int, int] = ([], 0, 0)
        elif dry_run:
            gone = (ids, *await _count_children(conn, ids))
        else:
            gone = await _delete(conn, ids)
    report = PurgeReport(
        notifications=len(gone[0]),
        deliveries=gone[1],
        attempts=gone[2],
        batches=1,
        by_status=dict(Counter(confirmed[i] for i in gone[0])),
    )
    return report, (candidates[-1].seq if len(rows) == limit else None)


async def purge(
    engine: AsyncEngine,
    *,
    now: float,
    policy: RetentionPolicy,
    batch: int,
    dry_run: bool = False,
    should_stop: asyncio.Event | None = None,
) -> PurgeReport:
    """Purge every expired notification, `batch` at a time, each batch its own transaction.

    A dry run walks the same batches and deletes nothing.
    """
    total = PurgeReport()
    after_seq: int | None = 0
    while after_seq is not None:
        if should_stop is not None and should_stop.is_set():
            break
        report, next_seq = await purge_batch(
            engine, now=now, policy=policy, limit=batch, dry_run=dry_run, after_seq=after_seq
        )
        total = total.plus(report)
        # A real purge deleted what it walked past, except what it had to keep (seen again
        # from the start would loop forever), so both continue after the last seq seen.
        after_seq = next_seq
        # Let the dispatcher's writes in between batches.
        await asyncio.sleep(0)
    return total


class Purger:
    """The service's background purge: every `interval_s`, all expired notifications go."""

    def __init__(
        self,
        store: SqlStore,
        clock: Clock,
        policy: RetentionPolicy,
        *,
        interval_s: float,
        batch: int,
    ) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy
        self.interval_s = interval_s
        self.batch = batch
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_store(cls, store: Store, settings: Settings, clock: Clock) -> Purger | None:
        """A purger over `store` as configured, or None for a store that is not SQL."""
        if not isinstance(store, SqlStore):
            # Limitation: the in-memory store is never purged; it lives only as long as
            # its process does.
            return None
        return cls(
            store,
            clock,
            RetentionPolicy.from_settings(settings),
            interval_s=settings.purge_interval_s,
            batch=settings.purge_batch,
        )

    def start(self) -> None:
        """Start purging in the background."""
        self._task = asyncio.create_task(self._run(), name="tidings-purger")
        self._task.add_done_callback(_report_crash)

    async def stop(self) -> None:
        """Stop after the batch in progress (a batch is one transaction, never half done)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.run_once()
            # Wall-clock pauses even under a fake clock: a fake clock's sleep returns at
            # once and would spin this loop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def run_once(self) -> PurgeReport:
        """One pass over everything expired now; failures are logged and retried next pass."""
        try:
            report = await purge(
                self.store.engine,
                now=self.clock.now(),
                policy=self.policy,
                batch=self.batch,
                should_stop=self._stop,
            )
        except Exception:
            log.warning(
                "could not purge expired notifications; trying again in %.0fs",
                self.interval_s,
                exc_info=True,
                extra={"action": "purge_failed"},
            )
            return PurgeReport()
        if report.notifications:
            log.info(
                "purged %s",
                report.describe(),
                extra={"action": "purged", "notifications": report.notifications},
            )
        return report


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "the purger stopped on an error; expired notifications are kept until restart",
            exc_info=task.exception(),
            extra={"action": "purger_crashed"},
        )
