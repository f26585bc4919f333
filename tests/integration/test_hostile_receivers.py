"""Hostile receivers: huge, slow or malformed answers end within the timeout, read bounded."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import pytest
import sqlalchemy as sa
from aiohttp import web

from tests.integration.harness import Tidings, TidingsFactory, attempts_of
from tidings.stores.sql import SqlStore
from tidings.stores.tables import attempts

MB: Final = 1024 * 1024
BIG_BODY_BYTES: Final = 50 * MB
CHUNK: Final = b"x" * (64 * 1024)
EXCERPT_BYTES: Final = 1024  # Settings.response_excerpt_bytes, the default
HEADER_COUNT: Final = 5000
HUGE_HEADER_BYTES: Final = 1 * MB
TIMEOUT_S: Final = 2.0
# A timer fires a little late, and the attempt's record is written after it fires.
SLACK_MS: Final = 500.0
MEMORY_BOUND_BYTES: Final = 50 * MB


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: what is under test is the HTTP sender, which no store changes."""
    return f"sqlite+aiosqlite:///{tmp_path / 'tidings.db'}"


# receivers ---------------------------------------------------------------------------------


class StreamingReceiver:
    """A real aiohttp server whose answers are large: a 50 MB body, or thousands of headers.

    The body is written chunk by chunk, so the test never holds 50 MB either.
    """

    def __init__(self) -> None:
        self.body_bytes_sent: list[int] = []
        self.bodies_finished = 0
        self.bodies_open = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application()
        app.router.add_post("/big", self._big)
        app.router.add_post("/big-chunked", self._big)
        app.router.add_post("/headers", self._headers)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and cut off what is still being sent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str) -> str:
        """The full URL of `path`."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Wait until no big body is being written (the client hung up on every one)."""
        deadline = time.monotonic() + timeout_s
        while self.bodies_open:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.bodies_open} big answers still being written after {timeout_s}s"
                )
            await asyncio.sleep(0.01)

    async def _big(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        if request.path == "/big-chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = BIG_BODY_BYTES
        sent = 0
        self.bodies_open += 1
        try:
            await response.prepare(request)
            while sent < BIG_BODY_BYTES:
                await response.write(CHUNK)
                sent += len(CHUNK)
            await response.write_eof()
            self.bodies_finished += 1
        except ConnectionError:
            pass  # the client hung up: what a bounded reader does
        finally:
            self.body_bytes_sent.append(sent)
            self.bodies_open -= 1
        return response

    async def _headers(self, request: web.Request) -> web.Response:
        await request.read()
        junk = {f"X-Junk-{index}": "v" for index in range(HEADER_COUNT)}
        return web.Response(status=200, text="ok", headers=junk)


Answer = Callable[[asyncio.StreamWriter, asyncio.Event], Awaitable[None]]


class RawReceiver:
    """A bare TCP server on 127.0.0.1: it reads one HTTP request, then runs `answer`.

    For answers no HTTP server library would send: trickled bytes, a megabyte-long header.
    """

    def __init__(self, answer: Answer) -> None:
        self.requests = 0
        self._answer = answer
        self._stopping = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "/hook") -> str:
        """The full URL of `path`."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def close(self) -> None:
        """Stop the answers in progress and stop listening."""
        self._stopping.set()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            self.requests += 1
            await self._answer(writer, self._stopping)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: what a client with a timeout does
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)


async def _pause(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep, cut short by the receiver closing; True when it is closing."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def trickle_everything(writer: asyncio.StreamWriter, stopping: asyncio.Event) -> None:
    """The whole answer, status line included, one byte a second."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsuccess":
        writer.write(bytes([byte]))
        await writer.drain()
        if await _pause(stopping, 1.0):
            return


async def trickle_body(writer: asyncio.StreamWriter, stopping: asyncio.Event) -> None:
    """The head at once, then a 7-byte body one byte a second."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n")
    await writer.drain()
    for byte in b"success":
        if await _pause(stopping, 1.0):
            return
        writer.write(bytes([byte]))
        await writer.drain()


async def huge_header_line(writer: asyncio.StreamWriter, stopping: asyncio.Event) -> None:
    """One header whose value is a megabyte long, then a normal end."""
    writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
    for _ in range(HUGE_HEADER_BYTES // len(CHUNK)):
        if stopping.is_set():
            return
        writer.write(CHUNK)
        await writer.drain()
    writer.write(b"\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


@pytest.fixture
async def streaming() -> AsyncIterator[StreamingReceiver]:
    """An aiohttp receiver of large answers."""
    made = StreamingReceiver()
    await made.start()
    yield made
    await made.close()


RawFactory = Callable[[Answer], Awaitable[RawReceiver]]


@pytest.fixture
async def raw() -> AsyncIterator[RawFactory]:
    """Start raw-socket receivers on demand; each is closed after the test."""
    started: list[RawReceiver] = []

    async def start(answer: Answer) -> RawReceiver:
        made = RawReceiver(answer)
        await made.start()
        started.append(made)
        return made

    yield start
    for made in reversed(started):
        await made.close()


@pytest.fixture
async def tidings(
    streaming: StreamingReceiver, raw: RawFactory, tidings_factory: TidingsFactory
) -> Tidings:
    """A running service; set up after the receivers, so it stops before they close."""
    return await tidings_factory()


# one hostile answer at a time ---------------------------------------------------------------


async def _one_attempt(tidings: Tidings, url: str, endpoint_timeout: str) -> dict[str, Any]:
    await tidings.add_endpoint(url, timeout=endpoint_timeout, retry_schedule=["1h"])
    sent = await tidings.send({"recharge_id": "r-1"})
    found = await tidings.wait_for_attempts(sent["id"], 1, timeout_s=TIMEOUT_S + 5)
    [attempt] = attempts_of(found)
    return attempt


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_a_50_mb_answer_is_cut_off_after_the_excerpt_and_the_rest_is_never_read(
    tidings: Tidings, streaming: StreamingReceiver, path: str
) -> None:
    attempt = await _one_attempt(tidings, streaming.url(path), "5s")

    # The status decides (any 2xx), so the first kilobyte is all that is needed or kept.
    assert (attempt["status_code"], attempt["succeeded"], attempt["error"]) == (200, True, None)
    assert attempt["response"] == "x" * EXCERPT_BYTES
    assert attempt["duration_ms"] < 5000
    await streaming.wait_idle()
    assert streaming.bodies_finished == 0
    [sent] = streaming.body_bytes_sent
    # What the sockets' buffers took before the client hung up, nowhere near 50 MB.
    assert sent < BIG_BODY_BYTES // 4


@pytest.mark.parametrize("answer", [trickle_everything, trickle_body])
async def test_an_answer_trickled_one_byte_a_second_ends_at_the_endpoint_timeout(
    tidings: Tidings, raw: RawFactory, answer: Answer
) -> None:
    rx = await raw(answer)

    attempt = await _one_attempt(tidings, rx.url(), f"{TIMEOUT_S:g}s")

    assert (attempt["status_code"], attempt["succeeded"], attempt["error"]) == (
        None,
        False,
        "timeout",
    )
    assert attempt["error_detail"] == (
        "TimeoutError: no complete answer within the endpoint timeout (2s)"
    )
    assert attempt["response"] == ""
    assert TIMEOUT_S * 1000 <= attempt["duration_ms"] < TIMEOUT_S * 1000 + SLACK_MS
    assert rx.requests == 1


async def test_thousands_of_headers_end_the_attempt_at_once_as_an_invalid_response(
    tidings: Tidings, streaming: StreamingReceiver
) -> None:
    attempt = await _one_attempt(tidings, streaming.url("/headers"), f"{TIMEOUT_S:g}s")

    assert (attempt["status_code"], attempt["succeeded"], attempt["error"]) == (
        None,
        False,
        "invalid_response",
    )
    assert attempt["error_detail"] == (
        "the answer is not valid HTTP or its head is too large: Too many headers received"
    )
    assert attempt["response"] == ""
    assert attempt["duration_ms"] < TIMEOUT_S * 1000


async def test_a_megabyte_long_header_line_ends_the_attempt_at_once_as_an_invalid_response(
    tidings: Tidings, raw: RawFactory
) -> None:
    rx = await raw(huge_header_line)

    attempt = await _one_attempt(tidings, rx.url(), f"{TIMEOUT_S:g}s")

    assert (attempt["status_code"], attempt["succeeded"], attempt["error"]) == (
        None,
        False,
        "invalid_response",
    )
    detail = attempt["error_detail"]
    assert detail.startswith(
        "the answer is not valid HTTP or its head is too large: Got more than 8190 bytes"
    )
    assert len(detail) <= 500
    assert attempt["response"] == ""
    assert attempt["duration_ms"] < TIMEOUT_S * 1000


# many hostile answers ----------------------------------------------------------------------


def _rss_bytes() -> int:
    """The resident set size of this process now (pages in /proc/self/statm)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """The highest resident set size this process has had (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def _attempt_rows(tidings: Tidings) -> list[Any]:
    store = tidings.service.store
    assert isinstance(store, SqlStore)
    async with store.reader.connect() as conn:
        query = sa.select(
            attempts.c.error_class,
            attempts.c.status_code,
            sa.func.length(attempts.c.response_excerpt).label("excerpt_bytes"),
        )
        return list((await conn.execute(query)).all())


async def _wait_for_attempt_count(tidings: Tidings, count: int, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await _attempt_rows(tidings)
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"{len(rows)} attempts recorded in {timeout_s}s; expected {count}")
        await asyncio.sleep(0.05)


async def test_hundreds_of_hostile_answers_leave_the_dispatchers_memory_flat(
    tidings: Tidings, streaming: StreamingReceiver, raw: RawFactory
) -> None:
    kinds = {
        "big": (streaming.url("/big"), "5s"),
        "chunked": (streaming.url("/big-chunked"), "5s"),
        "headers": (streaming.url("/headers"), "5s"),
        "huge-header": ((await raw(huge_header_line)).url(), "5s"),
        "trickle": ((await raw(trickle_everything)).url(), "1s"),
        "trickle-body": ((await raw(trickle_body)).url(), "1s"),
    }
    # Many endpoints with few attempts each: the memory is under test, not the circuit
    # breaker, which would hold back an endpoint's deliveries after a run of failures.
    endpoints_per_kind, posts_per_endpoint = 20, 2
    for kind, (url, timeout) in kinds.items():
        for index in range(endpoints_per_kind + 1):
            topic = f"{kind}.{index}"
            await tidings.add_endpoint(url, topics=[topic], timeout=timeout, retry_schedule=["1h"])

    # Endpoint 0 of each kind warms up the caches, pools and parsers kept for the process' life.
    for kind in kinds:
        await tidings.send({"recharge_id": "r-1"}, topic=f"{kind}.0")
    await _wait_for_attempt_count(tidings, len(kinds), timeout_s=20)
    await streaming.wait_idle()
    rss_before, peak_before = _rss_bytes(), _peak_rss_bytes()

    for _ in range(posts_per_endpoint):
        for kind in kinds:
            for index in range(1, endpoints_per_kind + 1):
                await tidings.send({"recharge_id": "r-1"}, topic=f"{kind}.{index}")
    per_kind = 1 + endpoints_per_kind * posts_per_endpoint
    rows = await _wait_for_attempt_count(tidings, per_kind * len(kinds), timeout_s=60)
    await streaming.wait_idle()

    rss_growth, peak_growth = _rss_bytes() - rss_before, _peak_rss_bytes() - peak_before
    # Reading even one 50 MB answer whole would add 50 MB; 16 at a time, 800 MB.
    assert rss_growth < MEMORY_BOUND_BYTES, f"RSS grew by {rss_growth / MB:.1f} MB"
    assert peak_growth < MEMORY_BOUND_BYTES, f"peak RSS grew by {peak_growth / MB:.1f} MB"
    assert len(rows) == per_kind * len(kinds)
    by_class: dict[str | None, int] = {}
    for row in rows:
        by_class[row.error_class] = by_class.get(row.error_class, 0) + 1
    assert by_class == {
        None: 2 * per_kind,  # the two kinds of 50 MB answer: 200, delivered
        "invalid_response": 2 * per_kind,
        "timeout": 2 * per_kind,
    }
    assert max(row.excerpt_bytes or 0 for row in rows) == EXCERPT_BYTES
    assert streaming.bodies_finished == 0
