"""The pieces every system shares: the receiver process, the producers, and the wait."""

from __future__ import annotations

import asyncio
import json
import select
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.config import BenchConfig, Scenario
from bench.payloads import Item
from bench.procs import Child, ChildFailed
from bench.rabbit import RabbitVhost

POLL_INTERVAL_S = 0.1


@dataclass
class SubmitResult:
    """What the producer did: when it started and ended, and what was accepted when."""

    t0: float
    t_end: float = 0.0
    # receiver-visible id (the `webhook-id`) -> (endpoint index, time the submit returned)
    accepted: dict[str, tuple[int, float]] = field(default_factory=dict)
    failures: int = 0
    first_error: str | None = None
    stopped_early: bool = False

    def note_failure(self, error: str) -> None:
        """Count a submit that was refused or failed."""
        self.failures += 1
        if self.first_error is None:
            self.first_error = error[:300]


@dataclass
class RunContext:
    """What one run of one system in one scenario works with."""

    config: BenchConfig
    scenario: Scenario
    tag: str
    run_dir: Path
    receiver_urls: list[str]
    rabbit: RabbitVhost | None
    deadline: float  # time.monotonic() after which producers stop and waits give up


class ReceiverPool:
    """The receiver process and its control port."""

    def __init__(self, log_dir: Path, endpoints: int) -> None:
        self.child = Child(
            "receivers",
            [sys.executable, "-m", "bench.receivers", "--endpoints", str(endpoints)],
            log_path=log_dir / "receivers.log",
            stdout_pipe=True,
        )
        ports = self._read_ports(timeout_s=20.0)
        self.control = f"http://127.0.0.1:{ports['control']}/control"
        self.urls = [
            f"http://127.0.0.1:{port}/ep/{index}" for index, port in enumerate(ports["endpoints"])
        ]
        self._session: aiohttp.ClientSession | None = None

    def _read_ports(self, timeout_s: float) -> dict[str, Any]:
        stdout = self.child.process.stdout
        if stdout is None:
            raise ChildFailed("the receiver process has no stdout")
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready:
            self.child.check_alive()
            raise ChildFailed(f"the receivers did not start; see {self.child.log_path}")
        line = stdout.readline()
        if not line:
            raise ChildFailed(f"the receivers exited; see {self.child.log_path}")
        ports: dict[str, Any] = json.loads(line)
        return ports

    async def _call(self, method: str, route: str, body: Any = None) -> dict[str, Any]:
        self.child.check_alive()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        async with self._session.request(method, f"{self.control}/{route}", json=body) as reply:
            reply.raise_for_status()
            answer: dict[str, Any] = await reply.json()
            return answer

    async def reset(self, behaviour: dict[str, object] | None = None) -> None:
        """Forget every count and answer as `behaviour` says from now on."""
        await self._call("POST", "reset", behaviour or {})

    async def progress(self) -> dict[str, Any]:
        """Counts since the last reset."""
        return await self._call("GET", "progress")

    async def report(self) -> dict[str, Any]:
        """Counts and, per notification id, [POSTs, first success time, endpoint]."""
        return await self._call("GET", "report")

    async def wait_delivered(
        self, target: int, deadline: float, watch: Sequence[Child] = ()
    ) -> tuple[dict[str, Any], bool]:
        """Poll until `target` ids were delivered or `deadline`; returns (progress, timed out)."""
        while True:
            progress = await self.progress()
            if progress["delivered"] >= target:
                return progress, False
            if time.monotonic() >= deadline:
                return progress, True
            for child in watch:
                child.check_alive()
            await asyncio.sleep(POLL_INTERVAL_S)

    async def close(self) -> None:
        """Close the control session and stop the process."""
        if self._session is not None:
            await self._session.close()
        self.child.stop(grace_s=5.0)


def _pause_until(started: float, index: int, rate: float | None) -> float:
    """Seconds to wait before submitting item `index` at `rate` per second from `started`."""
    if not rate:
        return 0.0
    return started + index / rate - time.time()


async def drive_async(
    items: Sequence[Item],
    producers: int,
    rate: float | None,
    deadline: float,
    submit_one: Callable[[Item], Awaitable[str]],
) -> SubmitResult:
    """Submit `items` from `producers` concurrent coroutines, paced at `rate` if given."""
    result = SubmitResult(t0=time.time())
    cursor = iter(range(len(items)))

    async def producer() -> None:
        for index in cursor:
            if time.monotonic() >= deadline:
                result.stopped_early = True
                return
            wait_s = _pause_until(result.t0, index, rate)
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            item = items[index]
            try:
                receiver_id = await submit_one(item)
            except Exception as exc:
                result.note_failure(f"{type(exc).__name__}: {exc}")
                continue
            result.accepted[receiver_id] = (item.endpoint, time.time())

    await asyncio.gather(*(producer() for _ in range(producers)))
    result.t_end = time.time()
    return result


def drive_threads(
    items: Sequence[Item],
    producers: int,
    rate: float | None,
    deadline: float,
    submit_one: Callable[[Item], str],
) -> SubmitResult:
    """Submit `items` from a pool of `producers` threads, paced at `rate` if given."""
    result = SubmitResult(t0=time.time())
    lock = threading.Lock()
    cursor = iter(range(len(items)))

    def producer() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            if time.monotonic() >= deadline:
                result.stopped_early = True
                return
            wait_s = _pause_until(result.t0, index, rate)
            if wait_s > 0:
                time.sleep(wait_s)
            item = items[index]
            try:
                receiver_id = submit_one(item)
            except Exception as exc:
                with lock:
                    result.note_failure(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                result.accepted[receiver_id] = (item.endpoint, time.time())

    with ThreadPoolExecutor(producers, thread_name_prefix="bench-producer") as pool:
        for future in [pool.submit(producer) for _ in range(producers)]:
            future.result()
    result.t_end = time.time()
    return result
