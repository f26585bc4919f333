"""From what the producer and receivers saw to figures: rates, latencies, medians."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.config import Scenario
from bench.harness import SubmitResult
from bench.procs import Child, own_cpu_s


@dataclass
class RunResult:
    """One run of one system in one scenario."""

    system: str
    scenario: str
    run: int
    count: int
    rate: float | None = None
    accepted: int = 0
    submit_failures: int = 0
    first_submit_error: str | None = None
    target: int = 0
    delivered: int = 0
    posts: int = 0
    posts_per_notification: float | None = None
    submit_rate: float | None = None
    delivery_rate: float | None = None
    duration_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: float | None = None
    # CPU ms per delivered notification, from the first submit to the last delivery awaited.
    cpu_producers_ms: float | None = None
    cpu_system_ms: float | None = None
    cpu_receivers_ms: float | None = None
    cpu_total_ms: float | None = None
    warmup_s: float | None = None
    backlog: int = 0
    # The machine's 1-minute load average as the run began and ended (others' work shows).
    load_before: float | None = None
    load_after: float | None = None
    tries: int = 1
    timed_out: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the raw results file."""
        return asdict(self)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of `values` (fraction 0.99 for p99)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def fill(
    result: RunResult,
    scenario: Scenario,
    submitted: SubmitResult,
    report: dict[str, Any],
) -> None:
    """Work out the figures of a run from the producer's record and the receivers' report."""
    seen: dict[str, list[Any]] = report["seen"]
    result.accepted = len(submitted.accepted)
    result.submit_failures = submitted.failures
    result.first_submit_error = submitted.first_error
    healthy = {
        nid: returned_at
        for nid, (endpoint, returned_at) in submitted.accepted.items()
        if endpoint not in scenario.hang
    }
    result.target = len(healthy)
    arrivals = {nid: seen[nid][1] for nid in healthy if nid in seen and seen[nid][1] is not None}
    result.delivered = len(arrivals)
    result.posts = sum(seen[nid][0] for nid in submitted.accepted if nid in seen)
    if result.accepted:
        result.posts_per_notification = result.posts / result.accepted
    spent_s = submitted.t_end - submitted.t0
    if spent_s > 0:
        result.submit_rate = result.accepted / spent_s
    if arrivals:
        result.duration_s = max(arrivals.values()) - submitted.t0
        if result.duration_s > 0:
            result.delivery_rate = result.delivered / result.duration_s
        latencies_ms = [(arrivals[nid] - healthy[nid]) * 1000 for nid in arrivals]
        result.p50_ms = percentile(latencies_ms, 0.50)
        result.p99_ms = percentile(latencies_ms, 0.99)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds spent so far by each role: the system's per process id."""

    producers_s: float
    receivers_s: float | None
    system_s: Mapping[int, float]


def sample_cpu(receivers: Child, system: Sequence[Child]) -> CpuSample:
    """The CPU seconds of this process (the producers), the receivers and the system's."""
    readings = {child.pid: child.cpu_s() for child in system}
    return CpuSample(
        producers_s=own_cpu_s(),
        receivers_s=receivers.cpu_s(),
        system_s={pid: cpu_s for pid, cpu_s in readings.items() if cpu_s is not None},
    )


def _system_spent_s(before: CpuSample, after: CpuSample) -> float | None:
    if any(pid not in after.system_s for pid in before.system_s):
        return None  # a process ended in between: what it spent since `before` is unknown
    # A process that started in between (the raw sender) counts from 0.
    return sum(cpu_s - before.system_s.get(pid, 0.0) for pid, cpu_s in after.system_s.items())


def charge_cpu(result: RunResult, before: CpuSample, after: CpuSample) -> None:
    """Each role's CPU between two samples, in ms per delivered notification (after fill)."""
    if not result.delivered:
        return

    def per_notification_ms(spent_s: float | None) -> float | None:
        return None if spent_s is None else spent_s * 1000 / result.delivered

    receivers_s = None
    if before.receivers_s is not None and after.receivers_s is not None:
        receivers_s = after.receivers_s - before.receivers_s
    result.cpu_producers_ms = per_notification_ms(after.producers_s - before.producers_s)
    result.cpu_system_ms = per_notification_ms(_system_spent_s(before, after))
    result.cpu_receivers_ms = per_notification_ms(receivers_s)
    parts = (result.cpu_producers_ms, result.cpu_system_ms, result.cpu_receivers_ms)
    if all(part is not None for part in parts):
        result.cpu_total_ms = sum(part for part in parts if part is not None)


def cpu_ceiling_per_s(total_ms: float | None, cores: int) -> float | None:
    """The deliveries/s `cores` could sustain at `total_ms` of CPU per notification."""
    if total_ms is None or total_ms <= 0:
        return None
    return cores * 1000 / total_ms


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(frozen=True)
class Figure:
    """The medians of a system's runs in one scenario."""

    system: str
    scenario: str
    runs: int
    delivery_rate: float | None
    submit_rate: float | None
    duration_s: float | None
    posts_per_notification: float | None
    p50_ms: float | None
    p99_ms: float | None
    peak_rss_mb: float | None
    cpu_producers_ms: float | None
    cpu_system_ms: float | None
    cpu_receivers_ms: float | None
    cpu_total_ms: float | None
    load: float | None
    delivered: int
    target: int
    problems: tuple[str, ...]


def figures(results: Sequence[RunResult]) -> dict[tuple[str, str], Figure]:
    """Medians per (system, scenario) over its runs; problems say which runs were not clean."""
    grouped: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        grouped.setdefault((result.system, result.scenario), []).append(result)
    out = {}
    for key, runs in grouped.items():
        problems = []
        for run in runs:
            if run.error:
                problems.append(f"run {run.run + 1}: {run.error}")
            elif run.timed_out:
                problems.append(
                    f"run {run.run + 1}: time limit hit with {run.delivered}/{run.target} delivered"
                )
            if run.submit_failures:
                problems.append(
                    f"run {run.run + 1}: {run.submit_failures} submits failed "
                    f"({run.first_submit_error})"
                )
        out[key] = Figure(
            system=key[0],
            scenario=key[1],
            runs=len(runs),
            delivery_rate=_median(r.delivery_rate for r in runs),
            submit_rate=_median(r.submit_rate for r in runs),
            duration_s=_median(r.duration_s for r in runs),
            posts_per_notification=_median(r.posts_per_notification for r in runs),
            p50_ms=_median(r.p50_ms for r in runs),
            p99_ms=_median(r.p99_ms for r in runs),
            peak_rss_mb=_median(r.peak_rss_mb for r in runs),
            cpu_producers_ms=_median(r.cpu_producers_ms for r in runs),
            cpu_system_ms=_median(r.cpu_system_ms for r in runs),
            cpu_receivers_ms=_median(r.cpu_receivers_ms for r in runs),
            # The median of each run's total, so it need not equal the sum of the medians.
            cpu_total_ms=_median(r.cpu_total_ms for r in runs),
            load=_median(
                max(r.load_before, r.load_after)
                for r in runs
                if r.load_before is not None and r.load_after is not None
            ),
            delivered=int(_median(r.delivered for r in runs) or 0),
            target=int(_median(r.target for r in runs) or 0),
            problems=tuple(problems),
        )
    return out
