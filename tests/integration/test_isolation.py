"""A slow endpoint holds only its own slots: healthy endpoints are served as if it were absent."""

from __future__ import annotations

import time

from tests.integration.harness import Receiver, ReceiverFactory, Reply, Tidings
from tidings.dispatch.dispatcher import START_CAP

QUEUED = 50
SLOW_ANSWER_S = 5.0
MAX_DELAY_S = 1.0


async def test_a_slow_endpoint_with_50_queued_does_not_delay_50_deliveries_to_a_healthy_one(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    slow_rx = await receiver()
    await _check_isolation(tidings, slow_rx, await receiver())


async def test_a_slow_endpoint_does_not_delay_a_healthy_endpoint_on_the_same_host(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    shared = await receiver()
    await _check_isolation(tidings, shared, shared)


async def _check_isolation(tidings: Tidings, slow_rx: Receiver, healthy_rx: Receiver) -> None:
    slow_rx.script("/slow", Reply(200, delay_s=SLOW_ANSWER_S))
    await tidings.add_endpoint(
        slow_rx.url("/slow"), topics=["slow.topic"], timeout="10s", retry_schedule=["1h"]
    )
    await tidings.add_endpoint(healthy_rx.url("/healthy"), topics=["healthy.topic"])
    for n in range(QUEUED):
        await tidings.send({"n": n}, topic="slow.topic")
    await slow_rx.wait_for(START_CAP, "/slow")

    sent_at: dict[str, float] = {}
    for n in range(QUEUED):
        before = time.monotonic()
        sent = await tidings.send({"n": n}, topic="healthy.topic")
        sent_at[sent["id"]] = before
    posts = await healthy_rx.wait_for(QUEUED, "/healthy", timeout_s=SLOW_ANSWER_S)

    delays_s = sorted(p.arrived_at - sent_at[p.webhook_id] for p in posts)
    assert sorted(p.webhook_id for p in posts) == sorted(sent_at)
    assert delays_s[-1] < MAX_DELAY_S, f"slowest healthy delivery took {delays_s[-1]:.2f}s"
    # The slow endpoint stayed full throughout: its later deliveries queue behind its cap
    # for several rounds of 5s each. Its answers never came quickly, so slow start never
    # let it hold more than its first few slots.
    assert len(slow_rx.requests("/slow")) < QUEUED
    assert slow_rx.max_in_flight["/slow"] == START_CAP


async def test_an_endpoint_answering_quickly_is_opened_up_to_the_concurrency_cap_and_no_further(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    rx.script("/hook", Reply(200, delay_s=0.3))  # quick enough to open the cap
    await tidings.add_endpoint(rx.url("/hook"))
    for n in range(QUEUED * 2):
        await tidings.send({"n": n})

    await rx.wait_for(QUEUED * 2, "/hook", timeout_s=20)

    cap = tidings.service.settings.endpoint_concurrency
    assert cap > START_CAP
    assert rx.max_in_flight["/hook"] == cap
