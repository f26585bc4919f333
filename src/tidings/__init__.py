"""Tidings: best-effort notification with retries on a ladder and reconciliation."""

from __future__ import annotations

__version__ = "0.1.0"
