"""System (a), the raw limit: an aiohttp client posting the bodies, with nothing persisted.

Run as `python -m bench.raw_sender JOB.json OUT.json`. It makes the same items as every
other system, "submits" each by starting its delivery (paced if the job says so), writes
OUT.json once all are submitted, and keeps delivering (retrying in memory on the same ladder)
until it is stopped.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.payloads import Item, make_items


async def _post(session: aiohttp.ClientSession, url: str, item: Item, timeout_s: float) -> bool:
    headers = {"content-type": "application/json", "webhook-id": item.bench_id}
    try:
        async with session.post(
            url,
            data=item.body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            await response.read()
            return 200 <= response.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def send(job: dict[str, Any], out: Path) -> None:
    """Deliver the job's items; write the submit times to `out` once all are started."""
    items = make_items(job["tag"], job["count"], job["endpoints"], job["payload_bytes"])
    urls: list[str] = job["urls"]
    ladder_s: list[float] = job["ladder_s"]
    timeout_s: float = job["timeout_s"]
    rate: float | None = job.get("rate")
    everyone = asyncio.Semaphore(job["concurrency"])
    per_endpoint = [asyncio.Semaphore(job["endpoint_concurrency"]) for _ in urls]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def deliver(item: Item) -> None:
        for attempt in range(len(ladder_s) + 1):
            # The endpoint's slot first: a task queued for a slow endpoint holds no shared slot.
            async with per_endpoint[item.endpoint], everyone:
                if await _post(session, urls[item.endpoint], item, timeout_s):
                    return
            if attempt < len(ladder_s):
                await asyncio.sleep(ladder_s[attempt])

    tasks: set[asyncio.Task[None]] = set()
    submitted: dict[str, tuple[int, float]] = {}
    t0 = time.time()
    for item in items:
        if rate:
            wait_s = t0 + item.index / rate - time.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
        task = asyncio.create_task(deliver(item))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        submitted[item.bench_id] = (item.endpoint, time.time())
        if not rate and item.index % 1000 == 999:
            await asyncio.sleep(0)  # let deliveries start while the rest are queued
    t_end = time.time()
    partial = out.with_suffix(".tmp")
    partial.write_text(json.dumps({"t0": t0, "t_end": t_end, "accepted": submitted}))
    partial.rename(out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()


def main() -> None:
    """Entry point of the raw sender process."""
    job = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(send(job, Path(sys.argv[2])))


if __name__ == "__main__":
    main()
