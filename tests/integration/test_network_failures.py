"""Failures below HTTP: each attempt records its own error class and the delivery is retried."""

from __future__ import annotations

import pytest

from tests.integration.harness import (
    RESET,
    ReceiverFactory,
    Reply,
    Tidings,
    attempts_of,
    closed_port,
)

BODY = b'{"recharge_id":"r-1","amount":100}'


async def test_a_receiver_answering_after_the_timeout_is_recorded_as_timeout_and_retried(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    # The receiver does its work (the request arrives) but answers only after the timeout.
    rx.script("/hook", Reply(200, "done", delay_s=1.6), Reply(200, "done"))
    await tidings.add_endpoint(rx.url("/hook"), timeout="1s", retry_schedule=["1s"])
    sent = await tidings.send({"recharge_id": "r-1", "amount": 100})

    done = await tidings.wait_for_status(sent["id"], "delivered")

    first, second = attempts_of(done)
    assert (first["number"], first["error"], first["status_code"]) == (1, "timeout", None)
    assert first["succeeded"] is False
    assert first["duration_ms"] >= 900, "the attempt waited for the 1s timeout"
    assert (second["number"], second["status_code"], second["succeeded"]) == (2, 200, True)
    posts = rx.requests("/hook")
    assert [p.webhook_id for p in posts] == [sent["id"]] * 2
    assert [p.body for p in posts] == [BODY] * 2


@pytest.mark.parametrize(
    ("url", "error"),
    [
        pytest.param(
            f"http://127.0.0.1:{closed_port()}/hook", "connect_refused", id="connection refused"
        ),
        pytest.param("http://receiver.tidings.invalid/hook", "dns", id="host under .invalid"),
    ],
)
async def test_an_unreachable_receiver_fails_each_attempt_with_its_error_class_and_is_retried(
    tidings: Tidings, url: str, error: str
) -> None:
    await tidings.add_endpoint(url, retry_schedule=["1s"])
    sent = await tidings.send({"recharge_id": "r-1", "amount": 100})

    found = await tidings.wait_for_attempts(sent["id"], 2)

    attempts = attempts_of(found)[:2]
    assert [a["number"] for a in attempts] == [1, 2]
    assert [a["error"] for a in attempts] == [error, error]
    assert [a["status_code"] for a in attempts] == [None, None]
    assert all(a["error_detail"] for a in attempts)
    assert not any(a["succeeded"] for a in attempts)
    assert found["status"] == "pending"


async def test_a_connection_reset_mid_response_is_recorded_and_retried(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    rx.script("/hook", RESET, Reply(200))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"])
    sent = await tidings.send({"recharge_id": "r-1", "amount": 100})

    done = await tidings.wait_for_status(sent["id"], "delivered")

    first, second = attempts_of(done)
    assert (first["number"], first["error"], first["status_code"]) == (
        1,
        "connection_reset",
        None,
    )
    assert first["error_detail"]
    assert (second["number"], second["status_code"], second["succeeded"]) == (2, 200, True)
    posts = rx.requests("/hook")
    assert [p.webhook_id for p in posts] == [sent["id"]] * 2
    assert [p.body for p in posts] == [BODY] * 2
