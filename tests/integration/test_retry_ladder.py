"""Retries follow the endpoint's ladder and stop when the window closes (on a fake clock)."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.integration.harness import Receiver, ReceiverFactory, Reply, Tidings, attempts_of
from tidings.clock import Clock, FakeClock

BODY = b'{"recharge_id":"r-1","amount":100}'


@pytest.fixture
def clock() -> Clock:
    """Time moves only when a test advances it, so a ladder of seconds takes no seconds."""
    return FakeClock(time.time())


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def _hook(receiver: ReceiverFactory, *replies: Reply) -> Receiver:
    rx = await receiver()
    rx.script("/hook", *replies)
    return rx


async def test_a_receiver_answering_500_500_200_gets_three_identical_posts_and_ends_delivered(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await _hook(receiver, Reply(500), Reply(500), Reply(200))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"])
    sent = await tidings.send({"recharge_id": "r-1", "amount": 100})

    first = await tidings.wait_for_attempts(sent["id"], 1)
    # No jitter in these tests (TIDINGS_JITTER=0): the retry is due exactly 1s later.
    waited = _epoch(first["deliveries"][0]["next_attempt_at"]) - _epoch(first["created_at"])
    assert waited == pytest.approx(1.0, abs=0.002)
    tidings.clock.advance(0.9)
    await tidings.settle()
    assert len(rx.requests("/hook")) == 1, "0.9s after a failure is too early for a 1s step"
    tidings.clock.advance(0.2)
    await tidings.wait_for_attempts(sent["id"], 2)
    tidings.clock.advance(1.1)
    done = await tidings.wait_for_status(sent["id"], "delivered")

    posts = rx.requests("/hook")
    assert len(posts) == 3
    assert [p.webhook_id for p in posts] == [sent["id"]] * 3
    assert [p.body for p in posts] == [BODY] * 3
    assert [p.headers["tidings-attempt"] for p in posts] == ["1", "2", "3"]
    assert [(a["number"], a["status_code"], a["succeeded"]) for a in attempts_of(done)] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    [delivery] = done["deliveries"]
    assert (delivery["status"], delivery["attempt_count"]) == ("delivered", 3)
    assert delivery["next_attempt_at"] is None

    tidings.clock.advance(3600.0)
    await tidings.settle()
    assert len(rx.requests("/hook")) == 3, "a delivered notification is never posted again"


async def test_a_receiver_always_answering_403_is_exhausted_when_the_window_closes(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await _hook(receiver, Reply(403, "forbidden"))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"], window="2.5s")
    sent = await tidings.send({"recharge_id": "r-1", "amount": 100})

    # Attempts at 0s, 1.1s and 2.2s; the next would be at 3.2s, after the 2.5s window.
    await tidings.wait_for_attempts(sent["id"], 1)
    tidings.clock.advance(1.1)
    await tidings.wait_for_attempts(sent["id"], 2)
    tidings.clock.advance(1.1)
    done = await tidings.wait_for_status(sent["id"], "exhausted")

    attempts = attempts_of(done)
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [403, 403, 403]
    assert [a["response"] for a in attempts] == ["forbidden"] * 3
    assert not any(a["succeeded"] for a in attempts)
    [delivery] = done["deliveries"]
    assert (delivery["status"], delivery["next_attempt_at"]) == ("exhausted", None)

    tidings.clock.advance(3600.0)
    await tidings.settle()
    assert len(rx.requests("/hook")) == 3, "no POST after the delivery is exhausted"
    assert len(attempts_of(await tidings.get(sent["id"]))) == 3


async def test_an_exhausted_notification_redelivered_gets_one_more_attempt_numbered_after_the_last(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await _hook(receiver, Reply(503), Reply(200))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"], window="0.5s")
    sent = await tidings.send({"recharge_id": "r-1", "amount": 100})
    await tidings.wait_for_status(sent["id"], "exhausted")

    answer = await tidings.client.post(f"/v1/notifications/{sent['id']}/redeliver")

    assert answer.status_code == 200, answer.text
    assert answer.json()["deliveries"] == [sent["deliveries"][0]["id"]]
    done = await tidings.wait_for_status(sent["id"], "delivered")
    assert [(a["number"], a["status_code"]) for a in attempts_of(done)] == [(1, 503), (2, 200)]
    assert [p.webhook_id for p in rx.requests("/hook")] == [sent["id"]] * 2
    assert [p.body for p in rx.requests("/hook")] == [BODY] * 2
