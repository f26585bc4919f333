"""Brokers: how dispatchers learn that work is due."""

from __future__ import annotations

from tidings.brokers.base import Broker
from tidings.brokers.embedded import EmbeddedBroker

__all__ = ["Broker", "EmbeddedBroker"]
