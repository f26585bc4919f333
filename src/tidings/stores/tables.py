"""The schema, in SQLAlchemy Core; valid on SQLite and PostgreSQL.

Times are epoch seconds in double precision: one representation on every backend, cheap to
compare in the claim query. Migrations under `tidings/migrations` must match this module.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

_epoch = sa.Float(precision=53)
_big_int = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

endpoints = sa.Table(
    "endpoints",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, server_default="http"),
    sa.Column("topics", sa.JSON, nullable=False),
    sa.Column("secrets", sa.JSON, nullable=False),
    sa.Column("retry_schedule", sa.JSON, nullable=False),
    sa.Column("window_s", _epoch, nullable=False),
    sa.Column("success", sa.JSON, nullable=False),
    sa.Column("timeout_s", _epoch, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", _epoch, nullable=False),
    sa.Column("updated_at", _epoch, nullable=False),
    sa.Column("rate_limit_per_s", _epoch),
    sa.Column("max_in_flight", sa.Integer),
)

# How an endpoint is faring: the circuit breaker, the rate limiter's next free slot, and
# whether claims for it must go through the gate (limits set, circuit open, disabled).
endpoint_health = sa.Table(
    "endpoint_health",
    metadata,
    sa.Column("endpoint_id", sa.String(40), primary_key=True),
    sa.Column("gated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failing_since", _epoch),
    sa.Column("circuit_open_until", _epoch),
    sa.Column("circuit_opens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_slot_at", _epoch, nullable=False, server_default="0"),
    sa.Index("ix_endpoint_health_gated", "gated"),
)

# One row per (endpoint, topic) so fan-out is an index lookup, not a scan of endpoints.
endpoint_topics = sa.Table(
    "endpoint_topics",
    metadata,
    sa.Column("endpoint_id", sa.String(40), sa.ForeignKey("endpoints.id", ondelete="CASCADE")),
    sa.Column("topic", sa.String(200), nullable=False),
    sa.PrimaryKeyConstraint("topic", "endpoint_id"),
)

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("seq", _big_int, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("topic", sa.String(200), nullable=False),
    sa.Column("key", sa.String(200)),
    sa.Column("idempotency_key", sa.String(200), unique=True),
    sa.Column("content_type", sa.String(200), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", _epoch, nullable=False),
    sa.Index("ix_notifications_topic_seq", "topic", "seq"),
    sa.Index("ix_notifications_key", "key"),
    sa.Index("ix_notifications_status_seq", "status", "seq"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("notification_id", sa.String(40), nullable=False),
    sa.Column("endpoint_id", sa.String(40), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt_count", sa.Integer, nullable=False, server_default="0"),
    # Set while the delivery waits for an attempt or is leased; NULL once final, so the
    # claim query walks only live rows of this index.
    sa.Column("next_attempt_at", _epoch),
    sa.Column("deadline_at", _epoch, nullable=False),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("reclaimed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("crashes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", _epoch, nullable=False),
    sa.Column("updated_at", _epoch, nullable=False),
    sa.Index("ix_deliveries_next_attempt_at", "next_attempt_at"),
    sa.Index("ix_deliveries_notification_id", "notification_id"),
    sa.Index("ix_deliveries_endpoint_status", "endpoint_id", "status"),
    sa.Index("ix_deliveries_endpoint_next_attempt_at", "endpoint_id", "next_attempt_at"),
    sa.Index("ix_deliveries_lease_owner", "lease_owner"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("delivery_id", sa.String(40), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("started_at", _epoch, nullable=False),
    sa.Column("duration_ms", _epoch, nullable=False),
    sa.Column("succeeded", sa.Boolean, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error_class", sa.String(32)),
    sa.Column("error_detail", sa.Text),
    sa.Column("response_excerpt", sa.LargeBinary),
    sa.Column("location", sa.Text),
    sa.Column("retry_after_s", _epoch),
    sa.PrimaryKeyConstraint("delivery_id", "number"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("topics", sa.JSON, nullable=False),
    sa.Column("endpoint_ids", sa.JSON, nullable=False),
    sa.Column("created_at", _epoch, nullable=False),
    sa.Column("revoked_at", _epoch),
)
