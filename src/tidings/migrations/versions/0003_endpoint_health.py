"""Endpoint health (circuit breaker, rate limiter) and per-endpoint limits.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "endpoint_health",
        sa.Column("endpoint_id", sa.String(length=40), nullable=False),
        sa.Column("gated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failing_since", sa.Float(precision=53), nullable=True),
        sa.Column("circuit_open_until", sa.Float(precision=53), nullable=True),
        sa.Column("circuit_opens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_slot_at", sa.Float(precision=53), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("endpoint_id"),
    )
    with op.batch_alter_table("endpoint_health", schema=None) as batch_op:
        batch_op.create_index("ix_endpoint_health_gated", ["gated"], unique=False)

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_endpoint_next_attempt_at",
            ["endpoint_id", "next_attempt_at"],
            unique=False,
        )

    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_per_s", sa.Float(precision=53), nullable=True))
        batch_op.add_column(sa.Column("max_in_flight", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.drop_column("max_in_flight")
        batch_op.drop_column("rate_limit_per_s")

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_endpoint_next_attempt_at")

    with op.batch_alter_table("endpoint_health", schema=None) as batch_op:
        batch_op.drop_index("ix_endpoint_health_gated")

    op.drop_table("endpoint_health")
