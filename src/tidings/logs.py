"""Log lines for operators: the message, then the structured fields as key=value."""

from __future__ import annotations

import logging

_FIELDS = (
    "action",
    "notification_id",
    "delivery_id",
    "endpoint",
    "attempt",
    "status_code",
    "error_class",
)


class FieldsFormatter(logging.Formatter):
    """Appends the stable structured fields a record carries."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{name}={getattr(record, name)}"
            for name in _FIELDS
            if getattr(record, name, None) is not None
        ]
        return f"{line} [{' '.join(extras)}]" if extras else line


def configure(level: str = "INFO") -> None:
    """Send Tidings' logs to stderr at `level`."""
    handler = logging.StreamHandler()
    handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tidings")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # aiosqlite logs every statement with its parameters at DEBUG: secrets and payloads.
    # Limitation: an application embedding Tidings that sets the root logger to DEBUG must
    # keep the "aiosqlite" logger at INFO itself.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
