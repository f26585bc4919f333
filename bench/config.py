"""What a benchmark run does: the sizes, the shared concurrency, and the five scenarios."""

from __future__ import annotations

from dataclasses import dataclass, replace

# The ladder for healthy runs; S3 compresses it so retries land inside the run.
DEFAULT_LADDER = ("1m", "5m", "10m", "30m", "1h", "2h", "5h", "10h")
FLAKY_LADDER = ("1s", "2s", "4s")
# S4's backlog waits this long for its next attempt: hours away, as the issue says.
BACKLOG_DELAY_S = 5 * 3600.0

SCENARIOS = ("S1", "S2", "S3", "S4", "S5")
SYSTEMS = ("raw", "celery", "tidings", "tidings-pg-1", "tidings-pg-2")


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and limits; every system gets the same concurrency, payloads and receivers."""

    notifications: int = 20_000
    endpoints: int = 20
    runs: int = 3
    concurrency: int = 64
    producers: int = 64
    endpoint_concurrency: int = 16
    timeout_s: float = 5.0
    payload_bytes: int = 256
    hang_endpoints: int = 2
    flaky_percent: int = 30
    backlog: int = 1_000_000
    celery_backlog: int | None = None
    s5_seconds: float = 20.0
    s5_rate: float | None = None
    run_timeout_s: float = 600.0

    @classmethod
    def quick(cls) -> BenchConfig:
        """Small sizes and one run: minutes on two cores."""
        return cls(notifications=2_000, runs=1, backlog=20_000, s5_seconds=8.0, run_timeout_s=150)

    def with_overrides(self, **changes: object) -> BenchConfig:
        """A copy with the given fields changed; None leaves a field as it is."""
        given = {name: value for name, value in changes.items() if value is not None}
        return replace(self, **given)  # type: ignore[arg-type]

    @property
    def celery_backlog_size(self) -> int:
        """How many far-future tasks Celery's S4 starts with."""
        return self.backlog if self.celery_backlog is None else self.celery_backlog


@dataclass(frozen=True)
class Scenario:
    """One scenario: how receivers behave, the ladder, any backlog and any pacing."""

    name: str
    title: str
    ladder: tuple[str, ...] = DEFAULT_LADDER
    hang: frozenset[int] = frozenset()
    flaky_percent: int = 0
    backlog: int = 0
    paced: bool = False

    @property
    def behaviour(self) -> dict[str, object]:
        """The receivers' behaviour, as their control route takes it."""
        return {"hang": sorted(self.hang), "flaky_percent": self.flaky_percent}


def scenario(name: str, config: BenchConfig) -> Scenario:
    """The scenario called `name` at the sizes of `config`."""
    if name == "S1":
        return Scenario("S1", "healthy: every endpoint answers 204")
    if name == "S2":
        hang = frozenset(range(config.endpoints - config.hang_endpoints, config.endpoints))
        return Scenario(
            "S2",
            f"bad neighbours: {len(hang)} of {config.endpoints} endpoints hang past the "
            f"{config.timeout_s:g}s timeout; throughput to the healthy ones",
            hang=hang,
        )
    if name == "S3":
        return Scenario(
            "S3",
            f"flaky: {config.flaky_percent}% of first attempts answer 500; ladder 1s,2s,4s",
            ladder=FLAKY_LADDER,
            flaky_percent=config.flaky_percent,
        )
    if name == "S4":
        return Scenario(
            "S4",
            f"backlog: {config.backlog:,} deliveries waiting hours for a retry, then S1",
            backlog=config.backlog,
        )
    if name == "S5":
        return Scenario("S5", "latency: paced at half the S1 rate; submit-to-receipt", paced=True)
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def ladder_seconds(ladder: tuple[str, ...]) -> list[float]:
    """A ladder of durations such as '1m' in seconds, for the systems that need numbers."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    return [float(step[:-1]) * units[step[-1]] for step in ladder]
