"""Containing bad endpoints: circuit breaker, rate limit, in-flight cap, Retry-After,
disabling after long failure, operational notifications. Real receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.integration.harness import ReceiverFactory, Reply, TidingsFactory, attempts_of


@dataclass
class Phased:
    """A receiver whose answer depends on the time since it started."""

    answer: Callable[[float], web.Response]
    arrivals: list[tuple[float, str, int]] = field(default_factory=list)  # (t, id, status)
    port: int = 0
    started: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        elapsed = time.monotonic() - self.started
        response = self.answer(elapsed)
        self.arrivals.append((elapsed, request.headers["webhook-id"], response.status))
        return response


async def _serve(receiver: Phased) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    receiver.started = time.monotonic()
    return runner


async def test_an_open_circuit_holds_deliveries_back_instead_of_burning_their_retries(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    tidings = await tidings_factory(breaker_threshold=3, breaker_cooldown_s=1.5)
    down = await receiver()
    down.script("/hook", Reply(status=500))
    await tidings.add_endpoint(down.url(), retry_schedule=["0.2s"], window="1m", max_in_flight=1)

    sent = [await tidings.send({"n": n}) for n in range(20)]
    await down.wait_for(3)
    await asyncio.sleep(1.0)  # inside the 1.5 s pause

    # Three failures opened the circuit; without it, 20 deliveries retrying every 0.2 s
    # would have made dozens of POSTs by now.
    assert len(down.requests()) == 3
    await down.wait_for(4, timeout_s=3.0)  # the probe after the pause
    await asyncio.sleep(0.3)
    assert len(down.requests()) == 4  # the probe failed: the circuit reopened (3 s now)
    statuses = {(await tidings.get(n["id"]))["status"] for n in sent}
    assert statuses == {"pending"}


async def test_a_rate_limit_spaces_deliveries_to_the_endpoint(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    tidings = await tidings_factory()
    target = await receiver()
    await tidings.add_endpoint(target.url(), rate_limit=10)

    for n in range(30):
        await tidings.send({"n": n})
    got = await target.wait_for(30, timeout_s=10.0)

    times = [r.arrived_at for r in got]
    span_s = times[-1] - times[0]
    # 10/s, with bursts of at most half a second's worth (see tidings.health): 5 at
    # once, then 25 more take 2.5 s. Unlimited, all 30 arrive within a fraction of that.
    assert span_s >= 2.0, span_s
    # Arrival times at the receiver also carry the machine's scheduling jitter, so the
    # bound on any one second is looser than the gate's own (15).
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 20, busiest


async def test_the_in_flight_cap_holds_across_two_dispatchers(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    first = await tidings_factory()
    second = await tidings_factory()
    slow = await receiver()
    slow.script("/hook", Reply(status=200, delay_s=0.3))
    await first.add_endpoint(slow.url(), max_in_flight=2)

    for n in range(12):
        await first.send({"n": n})
    await slow.wait_for(12, timeout_s=15.0)

    assert slow.max_in_flight["/hook"] == 2
    owners = {first.service.dispatcher.owner, second.service.dispatcher.owner}  # type: ignore[union-attr]
    assert len(owners) == 2


async def test_retry_after_holds_back_the_endpoint_and_spares_the_others(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    tidings = await tidings_factory(breaker_threshold=3, breaker_cooldown_s=0.5)

    def answer(elapsed_s: float) -> web.Response:
        if elapsed_s < 2.0:
            return web.Response(status=503)  # down
        if elapsed_s < 3.0:
            return web.Response(status=429, headers={"Retry-After": "2"})
        return web.Response(status=200)

    flaky = Phased(answer)
    runner = await _serve(flaky)
    healthy = await receiver()
    try:
        await tidings.add_endpoint(
            f"http://127.0.0.1:{flaky.port}/hook",
            topics=["flaky"],
            retry_schedule=["0.5s", "1s"],
            window="1m",
        )
        await tidings.add_endpoint(healthy.url(), topics=["healthy"])
        flaky_sent = [await tidings.send({"n": n}, topic="flaky") for n in range(200)]
        sent_at: dict[str, float] = {}
        for n in range(200):
            before = time.monotonic()
            sent_at[(await tidings.send({"n": n}, topic="healthy"))["id"]] = before
        await healthy.wait_for(200, timeout_s=10.0)
        waits_s = sorted(r.arrived_at - sent_at[r.webhook_id] for r in healthy.requests())

        for sent in flaky_sent:
            await tidings.wait_for_status(sent["id"], "delivered", timeout_s=20.0)
    finally:
        await runner.cleanup()

    # Not held up by the failing neighbour: each healthy delivery arrived soon after it
    # was sent (loose bound: the machine may be busy; the failing one waits seconds).
    assert len(waits_s) == 200
    assert waits_s[-1] < 1.0, waits_s[-10:]
    ok = {notification_id for _, notification_id, status in flaky.arrivals if status == 200}
    assert len(ok) == 200
    # After a 429 with Retry-After: 2 at t, the endpoint saw nothing before t + 2.
    for at, _, status in flaky.arrivals:
        if status == 429:
            later = [t for t, _, _ in flaky.arrivals if at < t < at + 2.0 - 0.05]
            assert later == [], (at, later[:5])
    # The breaker kept the outage from burning through every delivery's retries.
    assert len(flaky.arrivals) < 200 * 2


async def test_an_endpoint_failing_too_long_is_disabled_and_operators_are_told(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    tidings = await tidings_factory(disable_after_s=1.0, breaker_threshold=1000)
    broken, ops = await receiver(), await receiver()
    broken.script("/hook", Reply(status=500))
    endpoint = await tidings.add_endpoint(broken.url(), retry_schedule=["0.3s"], window="2.5s")
    await tidings.add_endpoint(
        ops.url("/ops"), topics=["tidings.endpoint.disabled", "tidings.delivery.exhausted"]
    )

    sent = await tidings.send({"recharge": "r-1"})
    done = await tidings.wait_for_status(sent["id"], "exhausted", timeout_s=10.0)
    got = await ops.wait_for(2, "/ops", timeout_s=10.0)

    bodies = [r.body for r in got]
    assert any(b'"endpoint_id":"' + endpoint["id"].encode() in b for b in bodies)
    assert any(sent["id"].encode() in b and b"delivery_id" in b for b in bodies)
    shown = (await tidings.client.get(f"/v1/endpoints/{endpoint['id']}")).json()
    assert shown["enabled"] is False
    assert len(attempts_of(done)) >= 2
