"""The receiver's toolkit: verify signatures, handle each notification once, reconcile.

The Starlette/FastAPI and WSGI adapters live in `tidings.receiver.adapters`.
"""

from __future__ import annotations

from tidings.receiver.dedup import (
    PROCESSED,
    AsyncDeduplicator,
    Deduplicator,
    Handled,
    processed_table,
)
from tidings.receiver.verify import (
    BadTimestamp,
    MissingHeader,
    NoMatchingSignature,
    TimestampOutOfTolerance,
    TimestampTooNew,
    TimestampTooOld,
    Verified,
    verify,
)

__all__ = [
    "PROCESSED",
    "AsyncDeduplicator",
    "BadTimestamp",
    "Deduplicator",
    "Handled",
    "MissingHeader",
    "NoMatchingSignature",
    "TimestampOutOfTolerance",
    "TimestampTooNew",
    "TimestampTooOld",
    "Verified",
    "processed_table",
    "verify",
]
