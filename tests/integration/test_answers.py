"""Which answers acknowledge a delivery: any 2xx, a body token when asked, never a redirect."""

from __future__ import annotations

import time

import pytest

from tests.integration.harness import ReceiverFactory, Reply, Tidings, attempts_of
from tidings.clock import Clock, FakeClock


@pytest.fixture
def clock() -> Clock:
    """Time moves only when a test advances it."""
    return FakeClock(time.time())


@pytest.mark.parametrize("status", [301, 302, 307])
async def test_a_redirect_is_not_followed_and_fails_the_attempt_with_its_code_and_location(
    tidings: Tidings, receiver: ReceiverFactory, status: int
) -> None:
    rx = await receiver()
    elsewhere = rx.url("/elsewhere")
    rx.script("/hook", Reply(status, headers={"Location": elsewhere}))
    rx.script("/elsewhere", Reply(200))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1h"])
    sent = await tidings.send({"recharge_id": "r-1"})

    found = await tidings.wait_for_attempts(sent["id"], 1)
    await tidings.settle()

    [attempt] = attempts_of(found)
    assert attempt["status_code"] == status
    assert attempt["location"] == elsewhere
    assert attempt["succeeded"] is False
    assert attempt["error"] is None
    assert found["status"] == "pending"
    assert found["deliveries"][0]["status"] == "pending"
    assert len(rx.requests("/hook")) == 1
    assert rx.requests("/elsewhere") == [], "the redirect must not be followed"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(201, "created"), id="201"),
        pytest.param(Reply(202), id="202"),
        pytest.param(Reply(204), id="204 with an empty body"),
        pytest.param(Reply(299, "odd but 2xx"), id="299"),
    ],
)
async def test_any_2xx_answer_delivers_after_exactly_one_post(
    tidings: Tidings, receiver: ReceiverFactory, reply: Reply
) -> None:
    rx = await receiver()
    rx.script("/hook", reply)
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"])
    sent = await tidings.send({"recharge_id": "r-1"})

    done = await tidings.wait_for_status(sent["id"], "delivered")
    tidings.clock.advance(60.0)
    await tidings.settle()

    [attempt] = attempts_of(done)
    assert (attempt["number"], attempt["status_code"], attempt["succeeded"]) == (
        1,
        reply.status,
        True,
    )
    assert len(rx.requests("/hook")) == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"  success\n", id="surrounded by whitespace"),
        pytest.param(b"\xef\xbb\xbfsuccess", id="after a UTF-8 BOM"),
    ],
)
async def test_the_success_token_delivers_after_trimming_whitespace_and_a_bom(
    tidings: Tidings, receiver: ReceiverFactory, body: bytes
) -> None:
    rx = await receiver()
    rx.script("/hook", Reply(200, body))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"], success={"token": "success"})
    sent = await tidings.send({"recharge_id": "r-1"})

    done = await tidings.wait_for_status(sent["id"], "delivered")

    [attempt] = attempts_of(done)
    assert (attempt["status_code"], attempt["succeeded"]) == (200, True)
    assert len(rx.requests("/hook")) == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"?success", id="a character before the token"),
        pytest.param(b'{"ok":false}', id="a JSON answer"),
        pytest.param(b"", id="an empty body"),
    ],
)
async def test_a_2xx_without_the_success_token_is_retried(
    tidings: Tidings, receiver: ReceiverFactory, body: bytes
) -> None:
    rx = await receiver()
    rx.script("/hook", Reply(200, body), Reply(200, "success"))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"], success={"token": "success"})
    sent = await tidings.send({"recharge_id": "r-1"})

    first = await tidings.wait_for_attempts(sent["id"], 1)
    assert first["status"] == "pending"
    tidings.clock.advance(1.1)
    done = await tidings.wait_for_status(sent["id"], "delivered")

    attempts = attempts_of(done)
    assert [(a["status_code"], a["succeeded"]) for a in attempts] == [(200, False), (200, True)]
    assert attempts[0]["response"] == body.decode()
    assert [p.webhook_id for p in rx.requests("/hook")] == [sent["id"]] * 2
