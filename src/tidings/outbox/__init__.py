"""The transactional outbox: record notifications in the notifier's own transaction, relay
them to Tidings after commit."""

from __future__ import annotations

from tidings.outbox.record import record, record_async
from tidings.outbox.relay import OutboxRow, RelayReport, relay_once, run_relay
from tidings.outbox.table import (
    DEFAULT_TABLE_NAME,
    OUTBOX,
    create_all,
    downgrade_outbox,
    outbox_table,
    upgrade_outbox,
)

__all__ = [
    "DEFAULT_TABLE_NAME",
    "OUTBOX",
    "OutboxRow",
    "RelayReport",
    "create_all",
    "downgrade_outbox",
    "outbox_table",
    "record",
    "record_async",
    "relay_once",
    "run_relay",
    "upgrade_outbox",
]
