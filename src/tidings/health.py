"""Endpoint health: the circuit breaker, the rate limiter, and when to disable an endpoint.

Pure rules over plain values; the stores keep the state and apply them in transactions,
so every dispatcher process sees the same breaker and the same rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

RATE_TOLERANCE_S = 0.25


@dataclass(frozen=True)
class HealthPolicy:
    """When a failing endpoint's circuit opens, for how long, and when it is disabled."""

    # Consecutive failed attempts that open the circuit: high enough that a receiver
    # failing a third of requests at random (runs of 5 are common) does not trip it.
    breaker_threshold: int = 20
    breaker_cooldown_s: float = 30.0  # first pause; doubles on each reopening
    breaker_max_cooldown_s: float = 600.0
    disable_after_s: float = 5 * 86400.0  # failing this long without a success: disabled


@dataclass(frozen=True)
class Health:
    """One endpoint's health record."""

    consecutive_failures: int = 0
    failing_since: float | None = None
    circuit_open_until: float | None = None
    circuit_opens: int = 0
    next_slot_at: float = 0.0

    def after_success(self) -> Health:
        """A success closes the circuit and forgets the failures."""
        return replace(
            self,
            consecutive_failures=0,
            failing_since=None,
            circuit_open_until=None,
            circuit_opens=0,
        )

    def after_failure(
        self,
        *,
        at: float,
        now: float,
        policy: HealthPolicy,
        retry_after_s: float | None = None,
    ) -> Health:
        """Count a failed attempt made at `at`; open the circuit at the threshold."""
        failures = self.consecutive_failures + 1
        open_until = self.circuit_open_until
        opens = self.circuit_opens
        if retry_after_s is not None:
            # The receiver asked everyone to wait, not just this one delivery.
            open_until = max(open_until or 0.0, now + retry_after_s)
        is_open = open_until is not None and now < open_until
        if failures >= policy.breaker_threshold and not is_open:
            pause_s = min(policy.breaker_cooldown_s * 2**opens, policy.breaker_max_cooldown_s)
            open_until = max(open_until or 0.0, now + pause_s)
            opens += 1
        return Health(
            consecutive_failures=failures,
            failing_since=self.failing_since if self.failing_since is not None else at,
            circuit_open_until=open_until,
            circuit_opens=opens,
            next_slot_at=self.next_slot_at,
        )

    def should_disable(self, now: float, policy: HealthPolicy) -> bool:
        """Whether the endpoint has failed for longer than the policy allows."""
        return self.failing_since is not None and now - self.failing_since >= policy.disable_after_s

    def circuit_state(self, now: float) -> str:
        """`closed`, `open` (held back) or `half_open` (one probe at a time)."""
        if self.circuit_open_until is None:
            return "closed"
        return "open" if now < self.circuit_open_until else "half_open"


def admissible(
    health: Health,
    *,
    now: float,
    in_flight: int,
    rate_limit_per_s: float | None,
    max_in_flight: int | None,
) -> int:
    """How many attempts the gate lets start now (None limits mean unlimited)."""
    state = health.circuit_state(now)
    if state == "open":
        return 0
    room = math.inf
    cap = 1 if state == "half_open" else max_in_flight
    if cap is not None:
        room = max(0, cap - in_flight)
    if rate_limit_per_s is not None:
        # GCRA: `next_slot_at` runs ahead by one interval per attempt started. It may lag
        # `now` by RATE_TOLERANCE_S, so a dispatcher that polls every 0.25 s still
        # reaches the full rate; bursts stay within twice that much of the rate.
        start = max(health.next_slot_at, now - RATE_TOLERANCE_S)
        tokens = math.floor((now + RATE_TOLERANCE_S - start) * rate_limit_per_s + 1e-9)
        room = min(room, max(0, tokens))
    return int(min(room, 10**6))


def spend(health: Health, *, now: float, started: int, rate_limit_per_s: float | None) -> Health:
    """Move the rate limiter's next free slot past `started` attempts."""
    if rate_limit_per_s is None or started == 0:
        return health
    start = max(health.next_slot_at, now - RATE_TOLERANCE_S)
    return replace(health, next_slot_at=start + started / rate_limit_per_s)


def is_gated(
    health: Health, *, enabled: bool, rate_limit_per_s: float | None, max_in_flight: int | None
) -> bool:
    """Whether claims for this endpoint must go through the gate."""
    return (
        not enabled
        or rate_limit_per_s is not None
        or max_in_flight is not None
        or health.circuit_open_until is not None
    )
