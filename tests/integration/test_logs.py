"""Logs never carry a secret, an API key or a payload, even at DEBUG and on failures."""

from __future__ import annotations

import logging

import pytest

from tests.integration.harness import ReceiverFactory, Reply, TidingsFactory
from tidings.auth import Scope

MARKER = "payload-marker-7f3a9c"


async def test_a_delivery_with_failures_logs_no_secret_key_or_payload(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Tidings' own loggers at DEBUG, everything else as an application would leave it
    # (see tidings.logs about aiosqlite, which logs statement parameters at DEBUG).
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="tidings")
    tidings = await tidings_factory()
    key = (await tidings.service.create_key(Scope.ADMIN)).plain
    rx = await receiver()
    rx.script("/hook", Reply(500, "no"), Reply(200))
    endpoint = await tidings.add_endpoint(rx.url(), retry_schedule=["0.2s"])

    sent = await tidings.send({"secret_business_value": MARKER})
    await tidings.wait_for_status(sent["id"], "delivered")
    await tidings.service.rotate_secret(endpoint["id"], None, "1h")

    assert any(sent["id"] in record.getMessage() for record in caplog.records)  # logs exist
    everything = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert MARKER not in everything
    assert endpoint["secret"] not in everything
    assert key not in everything
