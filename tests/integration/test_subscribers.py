"""Queue subscribers against a real RabbitMQ: acks, the ladder, the window, timeouts, the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import pytest

from tests.conftest import CI
from tests.integration.harness import TOPIC, Tidings, TidingsFactory, attempts_of, serve
from tests.integration.test_rabbitmq_broker import (
    RABBITMQ_NAME,
    RABBITMQ_URL,
    delete_queues,
    messages_in,
    on_rabbitmq,
    rabbitmq_reachable,
)
from tidings.api.app import create_app
from tidings.dispatch.queue import dead_letter_queue, results_queue, subscriber_queue
from tidings.receiver.verify import verify
from tidings.subscriber import Message, Subscriber

GROUPS: Final = ("accounts", "cli")
BODY: Final = b'{"recharge":"r-1","amount":100}'

# fixtures ------------------------------------------------------------------------------------


@pytest.fixture
async def prefix(ci: type[CI]) -> AsyncIterator[str]:
    """A queue prefix of this test's own; every queue under it is deleted afterwards.

    Asked for before the service, so that it is torn down after it.
    """
    ci.require_server(RABBITMQ_NAME, rabbitmq_reachable())
    made = f"tidings-test-{secrets.token_hex(4)}"
    yield made
    await delete_queues(made)
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        await channel.queue_delete(results_queue(made))
        for group in GROUPS:
            await channel.queue_delete(subscriber_queue(made, group))
            await channel.queue_delete(dead_letter_queue(made, group))
    finally:
        await connection.close()


@pytest.fixture
async def service(
    prefix: str, tidings_factory: TidingsFactory, request: pytest.FixtureRequest
) -> Tidings:
    """A service (API and dispatcher) whose broker is this test's RabbitMQ queues.

    The store is polled every 30 s: whatever happens sooner came through RabbitMQ. A test
    marked `no_jitter` gets retries exactly on the ladder.
    """
    jitter = 0.0 if request.node.get_closest_marker("no_jitter") else 0.1
    return await tidings_factory(**on_rabbitmq(prefix, jitter=jitter))


@pytest.fixture
async def api_url(service: Tidings) -> AsyncIterator[str]:
    """The service's API on a real port of 127.0.0.1: subscribers talk HTTP to it."""
    async with serve(create_app(service.service, manage_lifecycle=False)) as url:
        yield url


@dataclass
class Handler:
    """A handler that records every call and raises for the first `failures` of them."""

    failures: int = 0
    calls: list[tuple[Message, float]] = field(default_factory=list)

    async def __call__(self, message: Message) -> None:
        self.calls.append((message, time.monotonic()))
        if len(self.calls) <= self.failures:
            raise RuntimeError(f"not yet (call {len(self.calls)})")

    @property
    def messages(self) -> list[Message]:
        """Every message handled, in order."""
        return [message for message, _ in self.calls]

    def gaps_s(self) -> list[float]:
        """Seconds between one call and the next."""
        times = [at for _, at in self.calls]
        return [later - earlier for earlier, later in itertools.pairwise(times)]


def subscriber_for(api_url: str, prefix: str, **options: Any) -> Subscriber:
    """A subscriber of group `accounts` to TOPIC, with a 1 s ladder unless told otherwise."""
    return Subscriber(
        RABBITMQ_URL,
        topic=TOPIC,
        group="accounts",
        tidings_url=api_url,
        prefix=prefix,
        **{"retry_schedule": ["1s"], **options},
    )


@asynccontextmanager
async def running(subscriber: Subscriber, handler: Handler) -> AsyncIterator[None]:
    """Run the subscriber until the block ends, then stop it as an operator would."""
    stop = asyncio.Event()
    task = asyncio.create_task(subscriber.run(handler, stop), name="test-subscriber")
    ready = asyncio.create_task(subscriber.ready.wait())
    await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # it failed to start: show why
    assert subscriber.ready.is_set(), "the subscriber did not start consuming in 15 s"
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def wait_for(done: Callable[[], bool], what: str, *, timeout_s: float = 10.0) -> None:
    """Poll `done` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen in {timeout_s}s")
        await asyncio.sleep(0.02)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float) -> None:
    """Poll an async `check` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen in {timeout_s}s")
        await asyncio.sleep(0.05)


def summary(notification: dict[str, Any]) -> list[tuple[int, bool, str | None]]:
    """(number, succeeded, error class) of every attempt."""
    return [(a["number"], a["succeeded"], a["error"]) for a in attempts_of(notification)]


# registering a subscriber group --------------------------------------------------------------


async def test_a_queue_endpoint_is_refused_with_the_embedded_broker(tidings: Tidings) -> None:
    response = await tidings.client.post(
        "/v1/endpoints", json={"kind": "queue", "url": "queue://accounts", "topics": [TOPIC]}
    )

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_input"
    message = response.json()["message"]
    assert "queue endpoints need RabbitMQ" in message
    assert "TIDINGS_BROKER_URL" in message


async def test_a_queue_endpoint_names_one_group_once(service: Tidings) -> None:
    bad = await service.client.post(
        "/v1/endpoints", json={"kind": "queue", "url": "https://x.example/", "topics": [TOPIC]}
    )
    dotted = await service.client.post(
        "/v1/endpoints", json={"kind": "queue", "url": "queue://a.dead", "topics": [TOPIC]}
    )
    made = await service.add_endpoint("queue://accounts", kind="queue", timeout="2m")
    again = await service.client.post(
        "/v1/endpoints", json={"kind": "queue", "url": "queue://accounts", "topics": ["*"]}
    )

    assert (bad.status_code, dotted.status_code, again.status_code) == (422, 422, 409)
    assert "queue://<group>" in bad.json()["message"]
    assert "letters, digits" in dotted.json()["message"]
    assert made["id"] in again.json()["message"]
    # A subscriber's timeout is not bounded by the dispatcher's lease (20 s here).
    assert (made["kind"], made["url"], made["timeout"]) == ("queue", "queue://accounts", "2m")


# the Python subscriber -----------------------------------------------------------------------


async def test_a_handler_that_returns_acks_the_first_attempt_and_the_api_shows_it_delivered(
    service: Tidings, api_url: str, prefix: str
) -> None:
    subscriber = subscriber_for(api_url, prefix)
    endpoint = await subscriber.ensure_endpoint()
    handler = Handler()

    async with running(subscriber, handler):
        sent = await service.send({"recharge": "r-1", "amount": 100})
        done = await service.wait_for_status(sent["id"], "delivered", timeout_s=5)
        await service.settle(0.5)

    [message] = handler.messages
    assert (message.id, message.body, message.attempt) == (sent["id"], BODY, 1)
    assert (message.topic, message.content_type) == (TOPIC, "application/json")
    assert message.json() == {"recharge": "r-1", "amount": 100}
    assert verify(message.body, message.headers, endpoint["secret"]).id == sent["id"]
    [delivery] = done["deliveries"]
    assert (delivery["endpoint_id"], delivery["status"]) == (endpoint["id"], "delivered")
    assert (delivery["attempt_count"], delivery["next_attempt_at"]) == (1, None)
    assert summary(done) == [(1, True, None)]
    assert await messages_in(subscriber_queue(prefix, "accounts")) == 0
    assert await messages_in(results_queue(prefix)) == 0


async def test_a_handler_that_raises_twice_gets_the_same_message_three_times_on_the_ladder(
    service: Tidings, api_url: str, prefix: str
) -> None:
    subscriber = subscriber_for(api_url, prefix)
    handler = Handler(failures=2)

    async with running(subscriber, handler):
        sent = await service.send({"recharge": "r-1", "amount": 100})
        done = await service.wait_for_status(sent["id"], "delivered", timeout_s=8)
        await service.settle(0.5)

    messages = handler.messages
    assert [m.attempt for m in messages] == [1, 2, 3]
    assert [m.headers["tidings-attempt"] for m in messages] == ["1", "2", "3"]
    assert {m.id for m in messages} == {sent["id"]}
    assert {m.body for m in messages} == {BODY}
    # The "1s" ladder less its 10 % jitter at the earliest, and not much later.
    assert all(0.9 <= gap < 2.5 for gap in handler.gaps_s()), handler.gaps_s()
    [delivery] = done["deliveries"]
    assert (delivery["status"], delivery["attempt_count"]) == ("delivered", 3)
    assert summary(done) == [
        (1, False, "handler_error"),
        (2, False, "handler_error"),
        (3, True, None),
    ]
    details = [a["error_detail"] for a in attempts_of(done)]
    assert details[:2] == ["RuntimeError: not yet (call 1)", "RuntimeError: not yet (call 2)"]


@pytest.mark.no_jitter
async def test_a_handler_that_always_raises_is_exhausted_when_the_window_closes_and_dead_lettered(
    service: Tidings, api_url: str, prefix: str
) -> None:
    # Without jitter the third attempt is due at 2 s and a fourth would be at 3 s: a 2.7 s
    # window holds exactly three even when a busy machine delays each a little.
    subscriber = subscriber_for(api_url, prefix, window="2.7s")
    handler = Handler(failures=1000)

    async with running(subscriber, handler):
        sent = await service.send({"recharge": "r-1", "amount": 100})
        done = await service.wait_for_status(sent["id"], "exhausted", timeout_s=8)
        await service.settle(1.5)  # past the window: nothing more comes

    # Attempts at 0 s, 1 s and 2 s; the next would fall after the 2.7 s window.
    assert [m.attempt for m in handler.messages] == [1, 2, 3]
    [delivery] = done["deliveries"]
    assert (delivery["status"], delivery["attempt_count"]) == ("exhausted", 3)
    assert summary(done) == [(n, False, "handler_error") for n in (1, 2, 3)]
    dead = dead_letter_queue(prefix, "accounts")
    assert await messages_in(dead) == 1
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        queue = await (await connection.channel()).declare_queue(dead, passive=True)
        copy = await queue.get(no_ack=True, timeout=5)
        assert copy is not None
        assert (copy.body, copy.message_id) == (BODY, sent["id"])
        assert copy.headers["tidings-error"] == "RuntimeError: not yet (call 3)"
        assert copy.headers["tidings-attempt"] == "3"
    finally:
        await connection.close()
    assert await messages_in(subscriber_queue(prefix, "accounts")) == 0


async def test_a_subscriber_away_longer_than_its_timeout_gets_a_timeout_then_the_next_attempt(
    service: Tidings, api_url: str, prefix: str
) -> None:
    subscriber = subscriber_for(api_url, prefix, timeout="1s")
    await subscriber.ensure_endpoint()
    sent = await service.send({"recharge": "r-1", "amount": 100})

    # 1 s to answer, then the 1 s ladder step: the hand-over comes back after 2 s.
    timed_out = await service.wait_until(
        sent["id"], lambda n: bool(attempts_of(n)), "a timed-out attempt", timeout_s=5
    )
    assert summary(timed_out) == [(1, False, "timeout")]
    assert timed_out["deliveries"][0]["attempt_count"] == 2  # the next one is on the queue
    handler = Handler()
    async with running(subscriber, handler):
        done = await service.wait_for_status(sent["id"], "delivered", timeout_s=5)
        await service.settle(0.5)

    # The first attempt's message expired with its hand-over: the subscriber sees one.
    assert [(m.id, m.attempt, m.body) for m in handler.messages] == [(sent["id"], 2, BODY)]
    assert summary(done) == [(1, False, "timeout"), (2, True, None)]
    assert done["deliveries"][0]["attempt_count"] == 2


# the CLI -------------------------------------------------------------------------------------

# Logs each call (env, stdin) as a JSON line; fails the first call of each notification.
COMMAND_SCRIPT: Final = textwrap.dedent(
    """
    import json, os, sys
    log_path = sys.argv[1]
    body = sys.stdin.buffer.read().decode()
    with open(log_path, "a") as log:
        log.write(json.dumps({
            "id": os.environ["TIDINGS_NOTIFICATION_ID"],
            "attempt": os.environ["TIDINGS_ATTEMPT"],
            "topic": os.environ["TIDINGS_TOPIC"],
            "body": body,
        }) + "\\n")
    if json.loads(body).get("flaky") and os.environ["TIDINGS_ATTEMPT"] == "1":
        print("busy, try later", file=sys.stderr)
        sys.exit(1)
    """
)


async def test_tidings_subscribe_runs_the_command_per_message_exit_0_acks_and_exit_1_retries(
    service: Tidings, api_url: str, prefix: str, tmp_path: Path
) -> None:
    script, log_path = tmp_path / "handle.py", tmp_path / "calls.jsonl"
    script.write_text(COMMAND_SCRIPT)
    tidings_cli = Path(sys.executable).parent / "tidings"
    process = await asyncio.create_subprocess_exec(
        str(tidings_cli),
        "subscribe",
        TOPIC,
        "--group",
        "cli",
        "--exec",
        f"{sys.executable} {script} {log_path}",
        "--broker-url",
        RABBITMQ_URL,
        "--prefix",
        prefix,
        "--url",
        api_url,
        "--schedule",
        "1s",
        "--log-level",
        "warning",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    async def group_registered() -> bool:
        found = (await service.client.get("/v1/endpoints")).json()["items"]
        return any(e["url"] == "queue://cli" and e["kind"] == "queue" for e in found)

    try:
        await until(group_registered, "the CLI registering group cli", timeout_s=20)
        steady = await service.send({"recharge": "r-1"})
        flaky = await service.send({"recharge": "r-2", "flaky": True})
        steady_done = await service.wait_for_status(steady["id"], "delivered", timeout_s=10)
        flaky_done = await service.wait_for_status(flaky["id"], "delivered", timeout_s=10)
        await service.settle(0.5)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)

    assert process.returncode == 0, stderr.decode()
    calls = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert sorted((c["id"], c["attempt"]) for c in calls) == sorted(
        [(steady["id"], "1"), (flaky["id"], "1"), (flaky["id"], "2")]
    )
    assert {c["topic"] for c in calls} == {TOPIC}
    assert {c["body"] for c in calls if c["id"] == steady["id"]} == {'{"recharge":"r-1"}'}
    assert {c["body"] for c in calls if c["id"] == flaky["id"]} == {
        '{"recharge":"r-2","flaky":true}'
    }
    assert summary(steady_done) == [(1, True, None)]
    assert summary(flaky_done) == [(1, False, "handler_error"), (2, True, None)]
    assert attempts_of(flaky_done)[0]["error_detail"] == "CommandFailed: exit 1: busy, try later"
