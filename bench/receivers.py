"""The receivers: one aiohttp process serving every endpoint, each on its own loopback port.

Run as `python -m bench.receivers --endpoints 20`; it prints one JSON line with its ports,
then serves until SIGTERM. Each endpoint counts POSTs per notification id (the `webhook-id`
header) and records when the first successful one arrived. A control port resets the
counters with a scenario's behaviour and reports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"
# Long enough that every client's 5 s timeout fires first, short enough to end by itself.
DEFAULT_HANG_S = 30.0


@dataclass
class Behaviour:
    """How the endpoints answer during one run."""

    hang: frozenset[int] = frozenset()
    hang_s: float = DEFAULT_HANG_S
    flaky_percent: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Behaviour:
        """The behaviour a control request asks for."""
        return cls(
            hang=frozenset(int(i) for i in data.get("hang", ())),
            hang_s=float(data.get("hang_s", DEFAULT_HANG_S)),
            flaky_percent=int(data.get("flaky_percent", 0)),
        )


def fails_first(notification_id: str, flaky_percent: int) -> bool:
    """Whether the first attempt of this id is answered 500 (the same in every process)."""
    return zlib.crc32(notification_id.encode()) % 100 < flaky_percent


@dataclass
class Tally:
    """What the endpoints saw since the last reset."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    # id -> [POSTs, first success time or None, endpoint index]
    seen: dict[str, list[Any]] = field(default_factory=dict)
    posts: int = 0
    # Hanging endpoints never count a success, so this is the healthy endpoints' count.
    delivered: int = 0
    first_post_at: float | None = None
    last_success_at: float | None = None
    generation: int = 0

    def progress(self) -> dict[str, Any]:
        """Counts, cheap enough to poll often."""
        return {
            "generation": self.generation,
            "posts": self.posts,
            "distinct": len(self.seen),
            "delivered": self.delivered,
            "first_post_at": self.first_post_at,
            "last_success_at": self.last_success_at,
        }


def build_app(tally: Tally) -> web.Application:
    """The endpoints at /ep/<index> and the control routes under /control."""

    async def receive(request: web.Request) -> web.StreamResponse:
        arrived_at = time.time()
        index = int(request.match_info["index"])
        notification_id = request.headers.get("webhook-id", "")
        await request.read()
        generation = tally.generation
        tally.posts += 1
        if tally.first_post_at is None:
            tally.first_post_at = arrived_at
        entry = tally.seen.get(notification_id)
        if entry is None:
            entry = tally.seen[notification_id] = [0, None, index]
        entry[0] += 1
        behaviour = tally.behaviour
        if index in behaviour.hang:
            await asyncio.sleep(behaviour.hang_s)
            return web.Response(status=204)
        if entry[0] == 1 and fails_first(notification_id, behaviour.flaky_percent):
            return web.Response(status=500, text="try again")
        if entry[1] is None and generation == tally.generation:
            entry[1] = arrived_at
            tally.delivered += 1
            tally.last_success_at = arrived_at
        return web.Response(status=204)

    async def reset(request: web.Request) -> web.Response:
        data = await request.json() if request.can_read_body else {}
        tally.behaviour = Behaviour.from_json(data)
        tally.seen = {}
        tally.posts = tally.delivered = 0
        tally.first_post_at = tally.last_success_at = None
        tally.generation += 1
        return web.json_response(tally.progress())

    async def progress(_: web.Request) -> web.Response:
        return web.json_response(tally.progress())

    async def report(_: web.Request) -> web.Response:
        return web.json_response({**tally.progress(), "seen": tally.seen})

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/ep/{index:\\d+}", receive)
    app.router.add_post("/control/reset", reset)
    app.router.add_get("/control/progress", progress)
    app.router.add_get("/control/report", report)
    return app


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(endpoint_count: int) -> None:
    """Serve the endpoints and the control port until SIGTERM or SIGINT."""
    app = build_app(Tally())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sockets = [_bound_socket() for _ in range(endpoint_count + 1)]
    for sock in sockets:
        await web.SockSite(runner, sock, backlog=1024).start()
    ports = [sock.getsockname()[1] for sock in sockets]
    print(json.dumps({"control": ports[0], "endpoints": ports[1:]}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the receiver process."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoints", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.endpoints))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
