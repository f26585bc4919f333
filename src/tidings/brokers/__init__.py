"""Brokers: how dispatchers learn that work is due."""

from __future__ import annotations

from tidings.brokers.base import Broker
from tidings.brokers.embedded import EmbeddedBroker
from tidings.clock import Clock
from tidings.errors import ConfigurationError

__all__ = ["Broker", "EmbeddedBroker", "open_broker"]

_RABBITMQ_SCHEMES = ("amqp://", "amqps://")


def open_broker(
    url: str | None,
    *,
    prefix: str = "tidings",
    clock: Clock | None = None,
    store_poll_interval_s: float = 2.0,
) -> Broker:
    """The broker for a URL: none means the embedded one, `amqp://` means RabbitMQ."""
    if not url:
        return EmbeddedBroker()
    if not url.startswith(_RABBITMQ_SCHEMES):
        raise ConfigurationError(
            f"unsupported broker URL {url.split(':', 1)[0]!r}: use "
            "'amqp://user:password@host:5672/' for RabbitMQ (TIDINGS_BROKER_URL), "
            "or leave it unset for the embedded broker"
        )
    try:
        from tidings.brokers.rabbitmq import RabbitBroker
    except ImportError as exc:
        raise ConfigurationError(
            "TIDINGS_BROKER_URL names RabbitMQ but aio-pika is not installed: "
            "pip install 'tidings[rabbitmq]'"
        ) from exc
    return RabbitBroker(
        url, prefix=prefix, clock=clock, store_poll_interval_s=store_poll_interval_s
    )
