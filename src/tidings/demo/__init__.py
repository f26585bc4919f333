"""Worked examples played on 127.0.0.1, starting with `tidings demo recharge`."""

from __future__ import annotations
