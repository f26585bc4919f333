"""S4's backlog, written straight into Tidings' tables: far quicker than a million API calls.

Each backlog notification has one delivery that failed its first attempt (a recorded
timeout) and waits for a retry hours away, as if its receiver had been down.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from bench.config import BACKLOG_DELAY_S
from bench.payloads import encode, make_payload, topic_of
from tidings.stores.tables import attempts, deliveries, notifications

BATCH_ROWS = 10_000
WINDOW_S = 24 * 3600.0


def sync_url(async_url: str) -> str:
    """The synchronous twin of a Tidings database URL."""
    return async_url.replace("sqlite+aiosqlite", "sqlite", 1)


def _rows(
    tag: str, start: int, stop: int, endpoint_ids: Sequence[str], payload_bytes: int, now: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    made_at = now - 60.0
    notes, dels, tries = [], [], []
    for index in range(start, stop):
        endpoint = index % len(endpoint_ids)
        notification_id = f"msg_bk{tag}{index:010d}"
        delivery_id = f"dlv_bk{tag}{index:010d}"
        notes.append(
            {
                "id": notification_id,
                "topic": topic_of(endpoint),
                "key": None,
                "idempotency_key": None,
                "content_type": "application/json",
                "body": encode(make_payload(f"bk{tag}", index, payload_bytes)),
                "status": "pending",
                "created_at": made_at,
            }
        )
        dels.append(
            {
                "id": delivery_id,
                "notification_id": notification_id,
                "endpoint_id": endpoint_ids[endpoint],
                "status": "pending",
                "attempt_count": 1,
                "next_attempt_at": now + BACKLOG_DELAY_S,
                "deadline_at": made_at + WINDOW_S,
                "lease_owner": None,
                "reclaimed": False,
                "crashes": 0,
                "created_at": made_at,
                "updated_at": made_at,
            }
        )
        tries.append(
            {
                "delivery_id": delivery_id,
                "number": 1,
                "started_at": made_at,
                "duration_ms": 5000.0,
                "succeeded": False,
                "status_code": None,
                "error_class": "timeout",
                "error_detail": "TimeoutError: the receiver did not answer in 5s",
                "response_excerpt": b"",
                "location": None,
                "retry_after_s": None,
            }
        )
    return notes, dels, tries


def insert_backlog(
    database_url: str,
    endpoint_ids: Sequence[str],
    count: int,
    *,
    tag: str,
    payload_bytes: int,
) -> float:
    """Insert `count` waiting deliveries spread over the endpoints; returns seconds taken."""
    started = time.monotonic()
    now = time.time()
    engine = sa.create_engine(sync_url(database_url))
    try:
        for start in range(0, count, BATCH_ROWS):
            stop = min(start + BATCH_ROWS, count)
            notes, dels, tries = _rows(tag, start, stop, endpoint_ids, payload_bytes, now)
            with engine.begin() as conn:
                conn.execute(notifications.insert(), notes)
                conn.execute(deliveries.insert(), dels)
                conn.execute(attempts.insert(), tries)
        if engine.dialect.name == "postgresql":
            # What autovacuum would do on its own after a load this size.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("ANALYZE"))
    finally:
        engine.dispose()
    return time.monotonic() - started
