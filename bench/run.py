"""`make bench`: run every scenario on every system, then write bench/results/latest.*.

Loopback only; every run is bounded in count and in time; every process started here is
stopped here, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import rabbit as rabbit_mod
from bench.config import SCENARIOS, SYSTEMS, BenchConfig, Scenario, scenario
from bench.harness import ReceiverPool, RunContext
from bench.machine import describe
from bench.measure import RunResult, charge_cpu, figures, fill, sample_cpu
from bench.payloads import make_items
from bench.procs import REPO, stop_all
from bench.profile import Profiler, write_profile_report
from bench.rabbit import RabbitVhost
from bench.report import write_chart, write_markdown
from bench.systems.base import System
from bench.systems.celery_system import CelerySystem
from bench.systems.raw import RawSystem
from bench.systems.tidings_system import TidingsSystem, postgres_reachable

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_TIMEOUT_S = 120.0
RUN_TRIES = 3
RETRY_PAUSE_S = 20.0
FALLBACK_S5_RATE = 100.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; sizes default to the issue's, `--quick` to minutes on two cores."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 notifications, 1 run")
    parser.add_argument("--notifications", type=int, help="per run (default 20,000)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3)")
    parser.add_argument("--backlog", type=int, help="S4 waiting deliveries (default 1,000,000)")
    parser.add_argument("--celery-backlog", type=int, help="S4 backlog for Celery only")
    parser.add_argument("--concurrency", type=int, help="deliveries in flight (default 64)")
    parser.add_argument("--producers", type=int, help="concurrent submitters (default 64)")
    parser.add_argument("--payload-bytes", type=int, help="payload size (default 256)")
    parser.add_argument("--s5-seconds", type=float, help="how long S5 submits for")
    parser.add_argument("--s5-rate", type=float, help="S5 rate when S1 was not run")
    parser.add_argument("--run-timeout-s", type=float, help="time limit of one run")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--broker",
        choices=("auto", "rabbitmq", "none"),
        default="auto",
        help="(d)'s broker: RabbitMQ when Tidings has one and it answers (auto), or none",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where latest.* go (default: bench/results, or bench/results/quick with --quick, "
        "which git ignores so a quick run leaves the committed figures alone)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy on Tidings embedded during its first S1 run: profile.svg, profile.md",
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = RESULTS / "quick" if args.quick else RESULTS
    args.output = args.output.resolve()  # the systems' processes run in other folders
    args.output.mkdir(parents=True, exist_ok=True)
    return args


def make_config(args: argparse.Namespace) -> BenchConfig:
    """The sizes: the issue's (or --quick), with any flag given on top."""
    base = BenchConfig.quick() if args.quick else BenchConfig()
    return base.with_overrides(
        notifications=args.notifications,
        runs=args.runs,
        backlog=args.backlog,
        celery_backlog=args.celery_backlog,
        concurrency=args.concurrency,
        producers=args.producers,
        payload_bytes=args.payload_bytes,
        s5_seconds=args.s5_seconds,
        s5_rate=args.s5_rate,
        run_timeout_s=args.run_timeout_s,
    )


def _tidings_has_rabbitmq() -> bool:
    try:
        import tidings.brokers.rabbitmq  # noqa: F401
    except ImportError:
        return False
    return True


class Bench:
    """One invocation: the receivers, the systems, the runs and their results."""

    def __init__(self, args: argparse.Namespace, config: BenchConfig, raw_dir: Path) -> None:
        self.args = args
        self.config = config
        self.raw_dir = raw_dir
        self.results: list[RunResult] = []
        self.notes: list[str] = []
        self.rabbit: RabbitVhost | None = None
        self.broker_for_d = False
        self.scenarios = [scenario(name.strip(), config) for name in args.scenarios.split(",")]
        self.wanted = [name.strip() for name in args.systems.split(",") if name.strip()]

    # setting up ------------------------------------------------------------------------

    def prepare_servers(self) -> None:
        """RabbitMQ vhost and PostgreSQL checks; decide (d)'s broker."""
        needs_rabbit = "celery" in self.wanted or any(
            s.startswith("tidings-pg") for s in self.wanted
        )
        if needs_rabbit and rabbit_mod.wait_reachable():
            self.rabbit = RabbitVhost()
            self.rabbit.create()
            if not self.rabbit.own_vhost:
                self.notes.append("RabbitMQ: no vhost of our own; used '/' with unique queues")
        elif needs_rabbit:
            self.notes.append(
                "RabbitMQ did not answer on 127.0.0.1:5672 within 30 s: Celery skipped"
            )
        if "celery" in self.wanted and self.rabbit is None:
            self.wanted.remove("celery")
        if any(s.startswith("tidings-pg") for s in self.wanted) and not postgres_reachable():
            self.notes.append("PostgreSQL is not reachable on 127.0.0.1:5432: (d) skipped")
            self.wanted = [s for s in self.wanted if not s.startswith("tidings-pg")]
        choice = self.args.broker
        has_broker = _tidings_has_rabbitmq() and self.rabbit is not None
        if choice == "rabbitmq" and not has_broker:
            raise SystemExit("--broker rabbitmq: Tidings' RabbitMQ broker or server is missing")
        self.broker_for_d = choice == "rabbitmq" or (choice == "auto" and has_broker)
        if any(s.startswith("tidings-pg") for s in self.wanted) and not self.broker_for_d:
            self.notes.append(
                "(d) ran on PostgreSQL WITHOUT a broker URL: the dispatchers poll the store "
                "(every 0.25 s) instead of being told by RabbitMQ"
            )

    def systems(self) -> list[System]:
        """The systems asked for, in the table's order."""
        d_label = "PostgreSQL + RabbitMQ" if self.broker_for_d else "PostgreSQL, no broker"
        made: dict[str, System] = {
            "raw": RawSystem(),
            "celery": CelerySystem(),
            "tidings": TidingsSystem(
                "tidings", "Tidings embedded (SQLite)", postgres=False, dispatchers=1, broker=False
            ),
            "tidings-pg-1": TidingsSystem(
                "tidings-pg-1",
                f"Tidings {d_label}, 1 dispatcher",
                postgres=True,
                dispatchers=1,
                broker=self.broker_for_d,
            ),
            "tidings-pg-2": TidingsSystem(
                "tidings-pg-2",
                f"Tidings {d_label}, 2 dispatchers",
                postgres=True,
                dispatchers=2,
                broker=self.broker_for_d,
            ),
        }
        unknown = [name for name in self.wanted if name not in made]
        if unknown:
            raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
        return [made[name] for name in SYSTEMS if name in self.wanted]

    # running ---------------------------------------------------------------------------

    def s5_rate(self, system: str) -> float:
        """Half the system's median S1 delivery rate from this invocation."""
        rates = sorted(
            r.delivery_rate
            for r in self.results
            if r.system == system and r.scenario == "S1" and r.delivery_rate and not r.error
        )
        if rates:
            return rates[len(rates) // 2] / 2
        return self.config.s5_rate or FALLBACK_S5_RATE

    async def run_all(self) -> None:
        """Every scenario, every run, every system (systems interleaved within a run)."""
        systems = self.systems()
        receivers = ReceiverPool(self.raw_dir, self.config.endpoints)
        try:
            for sc in self.scenarios:
                for run in range(self.config.runs):
                    for system in systems:
                        if not system.supports(sc):
                            continue
                        result = await self.run_with_retry(receivers, system, sc, run)
                        self.results.append(result)
                        self._save()
        finally:
            await receivers.close()
            for system in systems:
                self.notes.extend(system.notes)

    async def run_with_retry(
        self, receivers: ReceiverPool, system: System, sc: Scenario, run: int
    ) -> RunResult:
        """A run, tried once more if it failed (the shared RabbitMQ may have been restarting)."""
        for attempt in range(1, RUN_TRIES + 1):
            if system.needs_rabbitmq and self.rabbit is not None:
                ready = await asyncio.to_thread(self.rabbit.ensure)
                if not ready:
                    log.warning("RabbitMQ is not answering; %s may fail", system.name)
            result = await self.run_once(receivers, system, sc, run)
            result.tries = attempt
            if result.error is None:
                break
            if attempt < RUN_TRIES:
                await asyncio.sleep(RETRY_PAUSE_S)  # a restart or a redeploy may be passing
        return result

    async def run_once(
        self, receivers: ReceiverPool, system: System, sc: Scenario, run: int
    ) -> RunResult:
        """One run: fresh system, backlog if any, warm-up, the measured submit, the wait."""
        config = self.config
        tag = f"{sc.name}-{system.name}-r{run}-{secrets.token_hex(2)}".lower()
        count = config.notifications
        rate: float | None = None
        if sc.paced:
            rate = self.s5_rate(system.name)
            count = max(config.endpoints, min(count, int(rate * config.s5_seconds)))
        result = RunResult(system.name, sc.name, run, count, rate=rate)
        result.load_before = os.getloadavg()[0]
        ctx = RunContext(
            config=config,
            scenario=sc,
            tag=tag,
            run_dir=self.raw_dir / tag,
            receiver_urls=receivers.urls,
            rabbit=self.rabbit,
            deadline=time.monotonic() + WARMUP_TIMEOUT_S,
        )
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        items = make_items(tag, count, config.endpoints, config.payload_bytes)
        try:
            await receivers.reset()
            await system.start(ctx)
            if sc.backlog:
                size = config.celery_backlog_size if system.name == "celery" else sc.backlog
                result.backlog = size
                ctx.deadline = time.monotonic() + config.run_timeout_s
                await system.load_backlog(ctx, size)
            warm_started = time.monotonic()
            ctx.deadline = warm_started + max(WARMUP_TIMEOUT_S, config.run_timeout_s)
            warm = make_items(f"{tag}-w", config.endpoints, config.endpoints, config.payload_bytes)
            await system.submit(ctx, warm, None)
            _, late = await receivers.wait_delivered(
                config.endpoints, ctx.deadline, system.watched()
            )
            if late:
                raise RuntimeError("the warm-up notifications did not all arrive")
            result.warmup_s = time.monotonic() - warm_started
            await receivers.reset(sc.behaviour)
            ctx.deadline = time.monotonic() + config.run_timeout_s
            profiler = self._profiler(system, sc, run, ctx)
            try:
                cpu_before = sample_cpu(receivers.child, system.watched())
                submitted = await system.submit(ctx, items, rate)
                target = sum(1 for ep, _ in submitted.accepted.values() if ep not in sc.hang)
                _, result.timed_out = await receivers.wait_delivered(
                    target, ctx.deadline, system.watched()
                )
                cpu_after = sample_cpu(receivers.child, system.watched())
            finally:
                if profiler is not None:
                    await asyncio.to_thread(profiler.finish)
                    self._write_profile(profiler, result)
            if sc.flaky_percent:
                await asyncio.sleep(0.5)  # let stray repeats arrive before counting POSTs
            report = await receivers.report()
            fill(result, sc, submitted, report)
            charge_cpu(result, cpu_before, cpu_after)
            result.peak_rss_mb = system.peak_rss_mb()
            await self._explain(ctx, system, sc, submitted.accepted, report)
        except Exception as exc:
            log.exception("%s on %s, run %d failed", sc.name, system.name, run + 1)
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            await system.stop()
        result.load_after = os.getloadavg()[0]
        log.info(
            "%s %-13s run %d: %s deliveries/s, submit %s/s, %d/%d delivered in %ss, "
            "p50 %s ms, p99 %s ms, posts/notification %s, RSS %s MiB, "
            "CPU ms/notification %s (producers %s, system %s, receivers %s), "
            "load %.1f->%.1f%s%s",
            sc.name,
            system.name,
            run + 1,
            _num(result.delivery_rate),
            _num(result.submit_rate),
            result.delivered,
            result.target,
            _num(result.duration_s, 2),
            _num(result.p50_ms, 1),
            _num(result.p99_ms, 1),
            _num(result.posts_per_notification, 3),
            _num(result.peak_rss_mb),
            _num(result.cpu_total_ms, 3),
            _num(result.cpu_producers_ms, 3),
            _num(result.cpu_system_ms, 3),
            _num(result.cpu_receivers_ms, 3),
            result.load_before,
            result.load_after,
            " TIMED OUT" if result.timed_out else "",
            f" ERROR {result.error}" if result.error else "",
        )
        return result

    def _profiler(self, system: System, sc: Scenario, run: int, ctx: RunContext) -> Profiler | None:
        if not (self.args.profile and system.name == "tidings" and sc.name == "S1" and run == 0):
            return None
        pids = system.delivering_pids()
        if not pids:
            return None
        self.args.output.mkdir(parents=True, exist_ok=True)
        return Profiler(
            pids[0], self.args.output / "profile.svg", ctx.run_dir / "profile.txt", ctx.run_dir
        )

    def _write_profile(self, profiler: Profiler, result: RunResult) -> None:
        try:
            by_self = write_profile_report(
                self.args.output / "profile.md",
                profiler.collapsed,
                profiler.svg.name,
                [
                    f"`tidings serve` (API and dispatcher in one process, SQLite) sampled by "
                    f"py-spy during S1: {result.count:,} notifications, "
                    f"{self.config.producers} concurrent producers, "
                    f"{self.config.concurrency} deliveries in flight; machine load "
                    f"{result.load_before:.1f} at the start. Sampling covers the submit "
                    "and the delivery of every notification.",
                ],
                sampled_s=profiler.sampled_s,
            )
        except OSError as exc:
            log.warning("py-spy wrote no profile: %s", exc)
            return
        for spot in by_self[:10]:
            log.info(
                "hot spot: %5.1f%% self, %5.1f%% incl. %s",
                spot.self_percent,
                spot.total_percent,
                spot.function,
            )

    async def _explain(
        self,
        ctx: RunContext,
        system: System,
        sc: Scenario,
        accepted: dict[str, tuple[int, float]],
        report: dict[str, Any],
    ) -> None:
        """Keep the ids that never arrived and the slowest ones, and the system's record."""
        seen = report["seen"]
        healthy = {nid: at for nid, (endpoint, at) in accepted.items() if endpoint not in sc.hang}
        missing = [nid for nid in healthy if nid not in seen or seen[nid][1] is None]
        slowest = sorted(
            (nid for nid in healthy if nid in seen and seen[nid][1] is not None),
            key=lambda nid: healthy[nid] - seen[nid][1],
        )[:10]
        late = {nid: round(seen[nid][1] - healthy[nid], 3) for nid in slowest}
        (ctx.run_dir / "slowest-ids.json").write_text(json.dumps(late, indent=1))
        try:
            await system.explain(ctx, slowest, "slowest.json")
            if missing:
                posts = {nid: seen[nid][0] if nid in seen else 0 for nid in missing}
                (ctx.run_dir / "missing-ids.json").write_text(json.dumps(posts, indent=1))
                log.warning(
                    "%d notifications never arrived; see %s",
                    len(missing),
                    ctx.run_dir / "missing*.json",
                )
                await system.explain(ctx, missing, "missing.json")
        except Exception:
            log.exception("could not ask %s about late or missing notifications", system.name)

    def _save(self) -> None:
        path = self.raw_dir / "results.json"
        path.write_text(json.dumps([r.to_json() for r in self.results], indent=1))

    # reporting -------------------------------------------------------------------------

    def write(self, machine: dict[str, str], command: str) -> tuple[Path, Path]:
        """latest.md and latest.png in the output folder."""
        config = self.config
        self.args.output.mkdir(parents=True, exist_ok=True)
        found = figures(self.results)
        labels = [(s.name, s.label) for s in self.systems()]
        setup = [
            "Loopback only. Receivers: one aiohttp process serving the "
            f"{config.endpoints} endpoints on {config.endpoints} ports, answering 204 at once "
            "(S2: the hanging ones sleep 30 s; S3: a fixed 30% of ids, by CRC32, get 500 on "
            "their first POST), counting POSTs per notification id (`webhook-id`).",
            f"Same for every system: {config.payload_bytes}-byte JSON bodies, "
            f"{config.concurrency} deliveries in flight, at most {config.endpoint_concurrency} "
            f"per endpoint (raw, Tidings; Celery's threads are not capped per endpoint), "
            f"{config.timeout_s:g}s timeout, ladder 1m,5m,... (S3: 1s,2s,4s), "
            f"{config.producers} concurrent producers.",
            "Deliveries/s = notifications received (first success per id, at the receivers) "
            "/ (last receipt - first submit). Submit/s = accepted / submit time. Latency = "
            "receipt - the moment the submit returned. POSTs per notification = POSTs counted "
            "by the receivers / notifications sent; in S2 it is below 1 because the hanging "
            "endpoints' POSTs never finish and are not counted.",
            "(a) raw: a separate process creating one asyncio task per notification, aiohttp "
            "POST, in-memory retries; no persistence. Its 'submit' is an in-memory hand-off "
            "of the whole run at once, so its latency (mostly queueing behind that hand-off) "
            "does not compare with the others'.",
            "(b) Celery: `task.delay` from a pool of producer threads; the task POSTs with "
            "httpx, `self.retry(countdown=ladder[n])`, acks_late, no result backend, json, "
            f"worker `--pool threads --concurrency {config.concurrency}` in its own process, "
            "default prefetch; publishes are not confirmed by RabbitMQ (Celery's default) "
            "while Tidings answers after its commit.",
            "(c) Tidings embedded: `tidings serve` (API + dispatcher, one process) on SQLite; "
            "producers POST /v1/notifications concurrently.",
            f"(d) Tidings: `tidings api` + 1 or 2 `tidings dispatcher` on PostgreSQL, broker "
            f"{'RabbitMQ (TIDINGS_BROKER_URL)' if self.broker_for_d else 'none (store polling)'}"
            ".",
            "Each run starts from an empty store/queue, sends one warm-up notification per "
            "endpoint, resets the receivers, then measures. Peak RSS is VmHWM of the "
            "delivering process (Tidings embedded: the serve process, API included; (d): "
            "the largest dispatcher; Celery: the worker; raw: the sender).",
            "CPU ms per notification = user + system CPU from just before the submit to the "
            "last delivery awaited, divided by the notifications delivered, for the producers "
            "(this harness process; raw hands over inside its own sender, so its producers are "
            "near 0), the system's own processes (those it started in the window count from "
            "0, so raw's figure includes its sender's interpreter start, about 0.2 s of CPU) "
            "and the receivers process; the PostgreSQL and RabbitMQ servers are not counted; "
            "CPU ceiling/s = usable cores x 1000 / total ms, the deliveries/s the machine "
            "could reach if CPU were the only limit.",
        ]
        md = self.args.output / "latest.md"
        png = self.args.output / "latest.png"
        write_markdown(
            md,
            title_line=time.strftime("%Y-%m-%d %H:%M %Z")
            + (" (quick mode)" if self.args.quick else ""),
            command=command,
            config=config,
            machine=machine,
            setup=setup,
            scenarios=self.scenarios,
            systems=labels,
            found=found,
            notes=self.notes,
            usable_cores=len(os.sched_getaffinity(0)),
        )
        write_chart(png, self.scenarios, labels, found)
        return md, png


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _raise_on_term(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; every child process is stopped before this returns."""
    args = parse_args(argv)
    config = make_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("kombu", "amqp", "celery"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    raw_dir = args.output / "raw" / time.strftime("%Y%m%dT%H%M%S")
    raw_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_on_term)
    bench = Bench(args, config, raw_dir)
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    machine: dict[str, str] = {}
    try:
        bench.prepare_servers()
        machine = describe(bench.rabbit.server_version() if bench.rabbit else "not used")
        asyncio.run(bench.run_all())
    except KeyboardInterrupt:
        log.warning("interrupted; writing what was measured")
    finally:
        stop_all()
        if bench.rabbit is not None:
            with contextlib.suppress(Exception):
                bench.rabbit.delete()
    if not bench.results:
        log.error("nothing was measured")
        return 1
    if not machine:
        machine = describe("see an earlier run")
    shown_dir = raw_dir.relative_to(REPO) if raw_dir.is_relative_to(REPO) else raw_dir
    bench.notes.append(
        f"The whole invocation took {time.monotonic() - started:.0f}s; per-run figures and "
        f"process logs in {shown_dir} (not committed)"
    )
    md, png = bench.write(machine, command)
    log.info("wrote %s and %s", md, png)
    print(md.read_text())
    failed = [r for r in bench.results if r.error]
    return 1 if failed and len(failed) == len(bench.results) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
