"""A hypothesis state machine over the delivery lifecycle, on the real SQLite store.

Random receiver answers, timeouts, dispatcher crashes (claims dropped unrecorded),
manual redeliveries and the clock moving; after every step the invariants hold.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tidings.dispatch.outcome import decide_outcome
from tidings.models import (
    FINAL_STATUSES,
    Attempt,
    Claim,
    DeliveryStatus,
    Endpoint,
    ErrorClass,
    NewNotification,
)
from tidings.schedule import RetrySchedule
from tidings.stores.sql import SqlStore
from tidings.success import SuccessRule

LEASE_S = 30.0
WINDOW_S = 600.0
MAX_CRASHES = 3
T = TypeVar("T")
ANSWERS = st.sampled_from(["200", "500", "403", "timeout", "429"])


class Lifecycle(RuleBasedStateMachine):
    """Deliveries to two endpoints, driven step by step by one or two dispatchers."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = tempfile.TemporaryDirectory()
        self.store = SqlStore(f"sqlite+aiosqlite:///{Path(self.folder.name) / 's.db'}")
        self.now = 1_700_000_000.0
        self.rng = random.Random(7)
        self.held: dict[str, Claim] = {}  # delivery id -> live claim (not yet recorded)
        self.numbers: dict[str, list[int]] = {}  # attempt numbers seen per delivery
        self.final: dict[str, DeliveryStatus] = {}  # final states seen, by delivery
        self.redelivered: set[str] = set()
        self.lease_end: dict[str, float] = {}  # delivery id -> when its live lease runs out
        self.endpoints: dict[str, Endpoint] = {}
        self.notifications: list[str] = []

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.folder.cleanup()

    @initialize()
    def open_store(self) -> None:
        self.run(self.store.open())
        for name in ("a", "b"):
            endpoint = Endpoint(
                id=f"ep_{name}",
                url=f"http://127.0.0.1:9/{name}",
                topics=("t",),
                secrets=("whsec_dGVzdHRlc3R0ZXN0dGVzdA==",),
                schedule=RetrySchedule.parse(["10s", "60s", "120s"], WINDOW_S, jitter=0.1),
                success=SuccessRule(),
                timeout_s=5.0,
                created_at=self.now,
            )
            self.run(self.store.add_endpoint(endpoint))
            self.endpoints[endpoint.id] = endpoint

    # steps -----------------------------------------------------------------------------

    @rule()
    def send(self) -> None:
        made, _ = self.run(
            self.store.add_notification(NewNotification(topic="t", body=b"{}"), self.now)
        )
        self.notifications.append(made.id)

    @rule(owner=st.sampled_from(["d1", "d2"]), limit=st.integers(1, 4))
    def claim(self, owner: str, limit: int) -> None:
        claims = self.run(
            self.store.claim_due(
                now=self.now, limit=limit, lease_s=LEASE_S, owner=owner, max_crashes=MAX_CRASHES
            )
        )
        for claim in claims:
            assert self.now <= claim.deadline_at, "an attempt after the window"
            # A delivery is held by at most one live claim: a second claim of the same
            # delivery means the first lease ran out (its holder counts as crashed).
            earlier = self.held.get(claim.delivery_id)
            if earlier is not None:
                assert self.now >= self.lease_end[claim.delivery_id], "two attempts in flight"
            self.held[claim.delivery_id] = claim
            self.lease_end[claim.delivery_id] = self.now + LEASE_S
            self.numbers.setdefault(claim.delivery_id, []).append(claim.attempt_number)

    @precondition(lambda self: bool(self.held))
    @rule(answer=ANSWERS, data=st.data())
    def answer(self, answer: str, data: st.DataObject) -> None:
        delivery_id = data.draw(st.sampled_from(sorted(self.held)))
        claim = self.held.pop(delivery_id)
        succeeded = answer == "200"
        attempt = Attempt(
            delivery_id=delivery_id,
            number=claim.attempt_number,
            started_at=self.now,
            duration_ms=1.0,
            succeeded=succeeded,
            status_code=None if answer == "timeout" else int(answer),
            error_class=ErrorClass.TIMEOUT if answer == "timeout" else None,
            retry_after_s=90.0 if answer == "429" else None,
        )
        endpoint = self.endpoints[claim.endpoint_id]
        outcome = decide_outcome(claim, endpoint, attempt, now=self.now, rng=self.rng)
        self.run(self.store.record_outcomes([outcome], self.now))

    @precondition(lambda self: bool(self.held))
    @rule()
    def crash(self) -> None:
        """A dispatcher dies: its claims are never recorded; their leases run out."""
        self.held.clear()

    @precondition(lambda self: bool(self.notifications))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        notification_id = data.draw(st.sampled_from(self.notifications))
        ids = self.run(self.store.redeliver(notification_id, self.now))
        self.redelivered.update(ids)

    @rule(seconds=st.sampled_from([1.0, 10.0, 45.0, 130.0, 700.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    # invariants ------------------------------------------------------------------------

    @invariant()
    def attempt_numbers_strictly_increase(self) -> None:
        for numbers in self.numbers.values():
            assert numbers == sorted(set(numbers)), numbers

    @invariant()
    def recorded_attempts_are_numbered_without_repeats(self) -> None:
        for notification_id in self.notifications:
            notification = self.run(self.store.get_notification(notification_id))
            for delivery in notification.deliveries:
                numbers = [a.number for a in delivery.attempts]
                assert numbers == sorted(set(numbers)), numbers
                assert all(n <= delivery.attempt_count for n in numbers)

    @invariant()
    def a_final_state_never_changes_unless_redelivered(self) -> None:
        for notification_id in self.notifications:
            notification = self.run(self.store.get_notification(notification_id))
            for delivery in notification.deliveries:
                before = self.final.get(delivery.id)
                if before is not None and delivery.id not in self.redelivered:
                    assert delivery.status == before, (delivery.id, before, delivery.status)
                if delivery.status in FINAL_STATUSES:
                    self.final[delivery.id] = delivery.status
                    self.redelivered.discard(delivery.id)

    def teardown_check(self) -> None:
        """Once the window has passed and dispatchers keep working, everything is final."""
        self.held.clear()
        for _ in range(60):
            self.now += LEASE_S + 1
            claims = self.run(
                self.store.claim_due(
                    now=self.now,
                    limit=50,
                    lease_s=LEASE_S,
                    owner="sweeper",
                    max_crashes=MAX_CRASHES,
                )
            )
            for claim in claims:
                attempt = Attempt(
                    delivery_id=claim.delivery_id,
                    number=claim.attempt_number,
                    started_at=self.now,
                    duration_ms=1.0,
                    succeeded=False,
                    status_code=500,
                )
                endpoint = self.endpoints[claim.endpoint_id]
                outcome = decide_outcome(claim, endpoint, attempt, now=self.now, rng=self.rng)
                self.run(self.store.record_outcomes([outcome], self.now))
        for notification_id in self.notifications:
            notification = self.run(self.store.get_notification(notification_id))
            for delivery in notification.deliveries:
                assert delivery.status in FINAL_STATUSES, delivery


class CheckedLifecycle(Lifecycle):
    """The machine plus the end-of-run check that every delivery became final."""

    def teardown(self) -> None:
        try:
            self.teardown_check()
        finally:
            super().teardown()


CheckedLifecycle.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDeliveryLifecycle = CheckedLifecycle.TestCase
