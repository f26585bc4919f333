"""Retry schedules: the ladder of intervals, the time window, and the decision after a failure."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from tidings.durations import format_duration, parse_duration_s
from tidings.errors import InvalidSchedule

PRESETS: dict[str, tuple[str, ...]] = {
    name: tuple(ladder.split(","))
    for name, ladder in {
        "default": "1m,5m,10m,30m,1h,2h,5h,10h",
        "wechatpay": "15s,15s,30s,3m,10m,20m,30m,30m,30m,1h,3h,3h,3h,6h,6h",
        "alipay": "4m,10m,10m,1h,2h,6h,15h",
    }.items()
}
DEFAULT_WINDOW_S = 24 * 3600.0
DEFAULT_JITTER = 0.1
MAX_SCHEDULE_STEPS = 100


@dataclass(frozen=True)
class Decision:
    """What happens after a failed attempt: retry at `next_attempt_at`, or give up."""

    next_attempt_at: float | None
    reason: str

    @property
    def gives_up(self) -> bool:
        return self.next_attempt_at is None


@dataclass(frozen=True)
class RetrySchedule:
    """A ladder of intervals between attempts, bounded by a window from creation."""

    intervals_s: tuple[float, ...]
    window_s: float = DEFAULT_WINDOW_S
    jitter: float = DEFAULT_JITTER

    @classmethod
    def parse(
        cls,
        ladder: str | Sequence[str | float] | None,
        window: str | float | None = None,
        *,
        jitter: float = DEFAULT_JITTER,
    ) -> RetrySchedule:
        """Build a schedule from a preset name, a list of durations or a comma list."""
        if ladder is None:
            ladder = "default"
        if isinstance(ladder, str):
            if ladder in PRESETS:
                ladder = PRESETS[ladder]
            elif "," in ladder or ladder[:1].isdigit():
                ladder = [part for part in ladder.split(",") if part.strip()]
            else:
                names = ", ".join(sorted(PRESETS))
                raise InvalidSchedule(
                    f"retry_schedule: unknown preset {ladder!r}; use one of {names} "
                    "or a list of durations such as ['10s', '1m']",
                    field="retry_schedule",
                )
        if not ladder or len(ladder) > MAX_SCHEDULE_STEPS:
            raise InvalidSchedule(
                f"retry_schedule: give between 1 and {MAX_SCHEDULE_STEPS} durations",
                field="retry_schedule",
            )
        intervals = tuple(parse_duration_s(step, field="retry_schedule") for step in ladder)
        window_s = DEFAULT_WINDOW_S if window is None else parse_duration_s(window, field="window")
        if not 0 <= jitter < 1:
            raise InvalidSchedule("jitter must be between 0 and 1", field="jitter")
        return cls(intervals, window_s, jitter)

    def describe(self) -> list[str]:
        """The ladder as duration strings, e.g. ['1m', '5m']."""
        return [format_duration(step) for step in self.intervals_s]

    def interval_after_s(self, attempt_number: int) -> float:
        """The nominal wait after failed attempt number `attempt_number` (1-based)."""
        index = min(max(attempt_number, 1) - 1, len(self.intervals_s) - 1)
        return self.intervals_s[index]

    def after_failure(
        self,
        *,
        attempt_number: int,
        deadline_at: float,
        now: float,
        retry_after_s: float | None = None,
        rng: random.Random | None = None,
    ) -> Decision:
        """Decide when to try again after attempt `attempt_number` failed at `now`."""
        wait_s = self.interval_after_s(attempt_number)
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            wait_s *= 1.0 + spread
        if retry_after_s is not None and retry_after_s > wait_s:
            # The receiver asked for a longer pause; coming back earlier would be refused.
            wait_s = retry_after_s
        next_at = now + wait_s
        if next_at > deadline_at:
            return Decision(None, "the next attempt would fall after the time window")
        return Decision(next_at, "retry")

    def deadline(self, created_at: float) -> float:
        """When the time window of a delivery created at `created_at` closes."""
        return created_at + self.window_s
