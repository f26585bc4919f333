"""From what the producer and receivers saw to figures: rates, latencies, medians."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.config import Scenario
from bench.harness import SubmitResult


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
