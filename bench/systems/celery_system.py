"""System (b): Celery 5 on RabbitMQ, a worker subprocess with a thread pool."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from bench.celery_app import make_app
from bench.config import BACKLOG_DELAY_S, ladder_seconds
from bench.harness import RunContext, SubmitResult, drive_threads
from bench.payloads import Item
from bench.procs import VENV_BIN, Child
from bench.systems.base import System

_BACKLOG_TARGET = "http://127.0.0.1:9/never"  # never reached: the countdown is hours away


class CelerySystem(System):
    """`task.delay` from a thread pool; a worker with `--pool threads`, `acks_late`."""

    name = "celery"
    label = "Celery 5 + RabbitMQ"
    needs_rabbitmq = True

    def __init__(self) -> None:
        super().__init__()
        self._worker: Child | None = None
        self._app: Any = None
        self._queue = ""
        self._ctx: RunContext | None = None
        self._peak_mb: float | None = None

    async def start(self, ctx: RunContext) -> None:
        if ctx.rabbit is None:
            raise RuntimeError("Celery needs RabbitMQ on 127.0.0.1:5672")
        self._ctx = ctx
        self._queue = f"bench.celery.{ctx.tag}"
        self._app = make_app(
            ctx.rabbit.url,
            self._queue,
            ladder_s=ladder_seconds(ctx.scenario.ladder),
            timeout_s=ctx.config.timeout_s,
            pool_limit=ctx.config.producers,
        )
        self._start_worker(ctx)

    def _start_worker(self, ctx: RunContext) -> None:
        if ctx.rabbit is None:
            raise RuntimeError("Celery needs RabbitMQ on 127.0.0.1:5672")
        number = 0 if self._worker is None else 1
        self._worker = Child(
            "celery worker",
            [
                str(VENV_BIN / "celery"),
                "-A",
                "bench.celery_worker",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(ctx.config.concurrency),
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"bench-{ctx.tag}-{number}@%h",
            ],
            log_path=ctx.run_dir / f"celery-worker-{number}.log",
            cwd=ctx.run_dir,
            env={
                "BENCH_CELERY_BROKER": ctx.rabbit.url,
                "BENCH_CELERY_QUEUE": self._queue,
                "BENCH_CELERY_LADDER_S": ",".join(
                    f"{step:g}" for step in ladder_seconds(ctx.scenario.ladder)
                ),
                "BENCH_CELERY_TIMEOUT_S": f"{ctx.config.timeout_s:g}",
            },
        )

    async def load_backlog(self, ctx: RunContext, count: int) -> float:
        """Publish `count` tasks with a countdown hours away while no worker runs."""
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop, 10.0)
        task = self._app.tasks["bench.deliver"]

        def publish(item: Item) -> str:
            task.apply_async((_BACKLOG_TARGET, "{}", item.bench_id), countdown=BACKLOG_DELAY_S)
            return item.bench_id

        backlog = [Item(i, f"bk-{i}", 0, {}, b"") for i in range(count)]
        result = await asyncio.to_thread(
            drive_threads, backlog, ctx.config.producers, None, ctx.deadline, publish
        )
        self.notes.append(
            f"{self.label}, S4 backlog: {count:,} tasks published with "
            f"countdown={BACKLOG_DELAY_S:g}s "
            f"({count / max(result.t_end - result.t0, 1e-9):,.0f}/s); the worker then takes "
            "them all into memory as ETA tasks"
        )
        self._start_worker(ctx)
        return result.t_end - result.t0

    async def submit(
        self, ctx: RunContext, items: Sequence[Item], rate: float | None
    ) -> SubmitResult:
        task = self._app.tasks["bench.deliver"]
        urls = ctx.receiver_urls

        def submit_one(item: Item) -> str:
            task.delay(urls[item.endpoint], item.body.decode("utf-8"), item.bench_id)
            return item.bench_id

        return await asyncio.to_thread(
            drive_threads, items, ctx.config.producers, rate, ctx.deadline, submit_one
        )

    def watched(self) -> list[Child]:
        return [self._worker] if self._worker is not None else []

    def peak_rss_mb(self) -> float | None:
        if self._worker is None:
            return self._peak_mb
        return self._worker.peak_rss_mb()

    async def stop(self) -> None:
        self._peak_mb = self.peak_rss_mb()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop, 10.0)
            self._worker = None
        if self._app is not None:
            self._app.close()  # the producer connections
            self._app = None
        if self._ctx is not None and self._ctx.rabbit is not None:
            await asyncio.to_thread(self._ctx.rabbit.forget_queues, [self._queue])
