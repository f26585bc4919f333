"""System (a): the raw HTTP limit, run in a process of its own."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence

from bench.config import Scenario, ladder_seconds
from bench.harness import RunContext, SubmitResult
from bench.payloads import Item
from bench.procs import Child, ChildFailed
from bench.systems.base import System


class RawSystem(System):
    """aiohttp posting the bodies, retrying in memory; no persistence, no broker."""

    name = "raw"
    label = "raw aiohttp (no persistence)"

    def __init__(self) -> None:
        super().__init__()
        self._senders: list[Child] = []
        self._peak_mb: float | None = None

    def supports(self, scenario: Scenario) -> bool:
        return scenario.backlog == 0  # nothing is stored, so there is no backlog to carry

    async def start(self, ctx: RunContext) -> None:
        return None

    async def submit(
        self, ctx: RunContext, items: Sequence[Item], rate: float | None
    ) -> SubmitResult:
        config = ctx.config
        tag = items[0].bench_id.rsplit("-", 1)[0] if items else ctx.tag
        job = {
            "tag": tag,
            "count": len(items),
            "endpoints": config.endpoints,
            "payload_bytes": config.payload_bytes,
            "urls": ctx.receiver_urls,
            "ladder_s": ladder_seconds(ctx.scenario.ladder),
            "timeout_s": config.timeout_s,
            "concurrency": config.concurrency,
            "endpoint_concurrency": config.endpoint_concurrency,
            "rate": rate,
        }
        number = len(self._senders)
        job_path = ctx.run_dir / f"raw-job-{number}.json"
        out_path = ctx.run_dir / f"raw-submitted-{number}.json"
        job_path.write_text(json.dumps(job))
        sender = Child(
            f"raw sender {number}",
            [sys.executable, "-m", "bench.raw_sender", str(job_path), str(out_path)],
            log_path=ctx.run_dir / f"raw-sender-{number}.log",
        )
        self._senders.append(sender)
        while not out_path.exists():
            sender.check_alive()
            if time.monotonic() > ctx.deadline:
                raise ChildFailed("the raw sender did not finish submitting in time")
            await asyncio.sleep(0.05)
        done = json.loads(out_path.read_text())
        result = SubmitResult(t0=done["t0"], t_end=done["t_end"])
        result.accepted = {key: (value[0], value[1]) for key, value in done["accepted"].items()}
        return result

    def watched(self) -> list[Child]:
        return list(self._senders)

    def peak_rss_mb(self) -> float | None:
        peaks = [mb for mb in (s.peak_rss_mb() for s in self._senders) if mb is not None]
        return max(peaks) if peaks else self._peak_mb

    async def stop(self) -> None:
        self._peak_mb = self.peak_rss_mb()
        for sender in self._senders:
            await asyncio.to_thread(sender.stop, 5.0)
        self._senders = []
