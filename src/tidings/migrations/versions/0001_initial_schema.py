"""Initial schema: endpoints, topics, notifications, deliveries, attempts.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "attempts",
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(precision=53), nullable=False),
        sa.Column("duration_ms", sa.Float(precision=53), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error_class", sa.String(length=32), nullable=True),
        sa.Column("error_detail", sa.Text(), nullable=True),
        sa.Column("response_excerpt", sa.LargeBinary(), nullable=True),
        sa.Column("location", sa.Text(), nullable=True),
        sa.Column("retry_after_s", sa.Float(precision=53), nullable=True),
        sa.PrimaryKeyConstraint("delivery_id", "number"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("notification_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempt_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.Float(precision=53), nullable=True),
        sa.Column("deadline_at", sa.Float(precision=53), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("reclaimed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("crashes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("updated_at", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_endpoint_status", ["endpoint_id", "status"], unique=False
        )
        batch_op.create_index("ix_deliveries_lease_owner", ["lease_owner"], unique=False)
        batch_op.create_index("ix_deliveries_next_attempt_at", ["next_attempt_at"], unique=False)
        batch_op.create_index("ix_deliveries_notification_id", ["notification_id"], unique=False)

    op.create_table(
        "endpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=16), server_default="http", nullable=False),
        sa.Column("topics", sa.JSON(), nullable=False),
        sa.Column("secrets", sa.JSON(), nullable=False),
        sa.Column("retry_schedule", sa.JSON(), nullable=False),
        sa.Column("window_s", sa.Float(precision=53), nullable=False),
        sa.Column("success", sa.JSON(), nullable=False),
        sa.Column("timeout_s", sa.Float(precision=53), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("updated_at", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "notifications",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("content_type", sa.String(length=200), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index("ix_notifications_key", ["key"], unique=False)
        batch_op.create_index("ix_notifications_status_seq", ["status", "seq"], unique=False)
        batch_op.create_index("ix_notifications_topic_seq", ["topic", "seq"], unique=False)

    op.create_table(
        "endpoint_topics",
        sa.Column("endpoint_id", sa.String(length=40), nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["endpoint_id"], ["endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("topic", "endpoint_id"),
    )


def downgrade() -> None:

    op.drop_table("endpoint_topics")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_topic_seq")
        batch_op.drop_index("ix_notifications_status_seq")
        batch_op.drop_index("ix_notifications_key")

    op.drop_table("notifications")
    op.drop_table("endpoints")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_notification_id")
        batch_op.drop_index("ix_deliveries_next_attempt_at")
        batch_op.drop_index("ix_deliveries_lease_owner")
        batch_op.drop_index("ix_deliveries_endpoint_status")

    op.drop_table("deliveries")
    op.drop_table("attempts")
