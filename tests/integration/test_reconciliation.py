"""The receiver's side: idempotent sends, lookups, listing with a cursor, redelivery on demand."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from tests.integration.harness import TOPIC, ReceiverFactory, Reply, Tidings, attempts_of
from tidings.clock import Clock, FakeClock


@pytest.fixture
def clock() -> Clock:
    """Time moves only when a test advances it."""
    return FakeClock(time.time())


async def test_a_repeated_idempotency_key_answers_200_with_the_first_and_409_for_other_content(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/hook"))
    first = await tidings.send({"amount": 100}, key="r-1", idempotency_key="pay-1")
    await tidings.wait_for_status(first["id"], "delivered")

    again = await tidings.client.post(
        "/v1/notifications",
        json={"topic": TOPIC, "payload": {"amount": 100}, "key": "r-1", "idempotency_key": "pay-1"},
    )
    other = await tidings.client.post(
        "/v1/notifications",
        json={"topic": TOPIC, "payload": {"amount": 999}, "idempotency_key": "pay-1"},
    )
    elsewhere = await tidings.client.post(
        "/v1/notifications",
        json={"topic": "other.topic", "payload": {"amount": 100}, "idempotency_key": "pay-1"},
    )

    assert again.status_code == 200, again.text
    repeated = again.json()
    assert repeated["id"] == first["id"]
    assert (repeated["payload"], repeated["key"]) == ({"amount": 100}, "r-1")
    assert [d["id"] for d in repeated["deliveries"]] == [d["id"] for d in first["deliveries"]]
    assert repeated["status"] == "delivered"
    # The same key for other content is refused: neither a silent loss nor a data leak.
    for refused in (other, elsewhere):
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "conflict"
        assert refused.json()["message"].startswith("idempotency_key: ")
        assert "100" not in refused.text and "r-1" not in refused.text
    await tidings.settle()
    assert len(rx.requests("/hook")) == 1
    assert len((await tidings.client.get("/v1/notifications")).json()["items"]) == 1


async def test_concurrent_sends_with_one_idempotency_key_make_one_notification(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/hook"))
    body = {"topic": TOPIC, "payload": {"amount": 100}, "idempotency_key": "pay-1"}

    answers = await asyncio.gather(
        *(tidings.client.post("/v1/notifications", json=body) for _ in range(8))
    )

    assert sorted(a.status_code for a in answers) == [200] * 7 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    await tidings.wait_for_status(answers[0].json()["id"], "delivered")
    await tidings.settle()
    assert len(rx.requests("/hook")) == 1


async def test_a_notification_fans_out_to_every_endpoint_of_its_topic_and_only_those(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/a"), topics=[TOPIC])
    await tidings.add_endpoint(rx.url("/all"), topics=["*"])
    await tidings.add_endpoint(rx.url("/other"), topics=["refund.succeeded"])

    sent = await tidings.send({"amount": 100})
    done = await tidings.wait_for_status(sent["id"], "delivered")
    elsewhere = await tidings.send({"amount": 1}, topic="nobody.else.listens")
    await tidings.wait_for_status(elsewhere["id"], "delivered")
    await tidings.settle()

    assert [d["status"] for d in done["deliveries"]] == ["delivered", "delivered"]
    assert len(elsewhere["deliveries"]) == 1
    assert [len(rx.requests(p)) for p in ("/a", "/all", "/other")] == [1, 2, 0]
    assert [p.webhook_id for p in rx.requests("/all")] == [sent["id"], elsewhere["id"]]


async def test_the_list_pages_oldest_first_with_a_cursor_and_filters(tidings: Tidings) -> None:
    early = [(await tidings.send({"n": n}, key=f"r-{n}"))["id"] for n in range(3)]
    await tidings.send({"n": "other"}, topic="refund.succeeded")
    tidings.clock.advance(10.0)
    middle = datetime.fromtimestamp(tidings.clock.now() - 5.0, UTC).isoformat()
    late = [(await tidings.send({"n": n}, key=f"r-{n}"))["id"] for n in range(3, 5)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"topic": TOPIC, "limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        page = (await tidings.client.get("/v1/notifications", params=params)).json()
        pages += 1
        seen.extend(item["id"] for item in page["items"])
        if pages == 1:
            # Inserted while paging: it shows up at the end, nothing is skipped or repeated.
            late.append((await tidings.send({"n": "meanwhile"}))["id"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == early + late
    assert pages == 3
    by_key = (await tidings.client.get("/v1/notifications", params={"key": "r-4"})).json()
    assert [item["id"] for item in by_key["items"]] == [late[1]]
    after = (
        await tidings.client.get(
            "/v1/notifications", params={"created_after": middle, "topic": TOPIC}
        )
    ).json()
    assert [item["id"] for item in after["items"]] == late
    unrouted = await tidings.client.get("/v1/notifications", params={"status": "unrouted"})
    assert len(unrouted.json()["items"]) == 7


async def test_redelivery_never_overlaps_an_attempt_and_attempt_numbers_keep_increasing(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    # The first answer takes a second, so the redeliveries below come while it is in flight.
    rx.script("/hook", Reply(500, delay_s=1.0), Reply(500), Reply(200))
    await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1h"])
    sent = await tidings.send({"amount": 100})
    [delivery_id] = [d["id"] for d in sent["deliveries"]]

    async def redeliver_thrice() -> list[list[str]]:
        answers = await asyncio.gather(
            *(tidings.client.post(f"/v1/notifications/{sent['id']}/redeliver") for _ in range(3))
        )
        assert [a.status_code for a in answers] == [200] * 3
        return [a.json()["deliveries"] for a in answers]

    await rx.wait_for(1, "/hook")
    assert await redeliver_thrice() == [[], [], []], "an attempt in flight is not doubled"
    first = await tidings.wait_for_attempts(sent["id"], 1)
    assert first["deliveries"][0]["status"] == "pending"

    assert [delivery_id] in await redeliver_thrice()
    await tidings.wait_for_attempts(sent["id"], 2)
    await tidings.settle()
    assert len(rx.requests("/hook")) == 2, "three redeliveries at once make one attempt"

    answer = await tidings.client.post(f"/v1/notifications/{sent['id']}/redeliver")
    assert answer.json()["deliveries"] == [delivery_id]
    done = await tidings.wait_for_status(sent["id"], "delivered")
    after = await tidings.client.post(f"/v1/notifications/{sent['id']}/redeliver")
    await tidings.settle()

    assert after.json()["deliveries"] == [], "a delivered delivery is not redelivered"
    assert [(a["number"], a["status_code"]) for a in attempts_of(done)] == [
        (1, 500),
        (2, 500),
        (3, 200),
    ]
    posts = rx.requests("/hook")
    assert [p.headers["tidings-attempt"] for p in posts] == ["1", "2", "3"]
    assert [p.webhook_id for p in posts] == [sent["id"]] * 3
    assert rx.max_in_flight["/hook"] == 1
