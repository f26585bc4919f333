"""Retry schedules: presets, the ladder, the window, jitter and Retry-After."""

from __future__ import annotations

import itertools
import random

import pytest

from tidings.errors import InvalidInput, InvalidSchedule
from tidings.schedule import PRESETS, Decision, RetrySchedule

T0 = 1_700_000_000.0
MINUTE = 60.0
HOUR = 3600.0


def attempt_times(schedule: RetrySchedule, created_at: float, attempts: int) -> list[float]:
    """When each attempt of a delivery that always fails happens, first one at creation."""
    deadline_at = schedule.deadline(created_at)
    times = [created_at]  # the first attempt is due as soon as the notification is sent
    while len(times) < attempts:
        decision = schedule.after_failure(
            attempt_number=len(times), deadline_at=deadline_at, now=times[-1]
        )
        if decision.next_attempt_at is None:
            break
        times.append(decision.next_attempt_at)
    return times


def gaps(times: list[float]) -> list[float]:
    """The waits between successive attempts."""
    return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.mark.parametrize(
    ("preset", "intervals_s"),
    [
        ("default", (60, 300, 600, 1800, 3600, 7200, 18000, 36000)),
        (
            "wechatpay",
            (15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800, 21600, 21600),
        ),
        ("alipay", (240, 600, 600, 3600, 7200, 21600, 54000)),
    ],
)
def test_a_preset_is_its_exact_ladder(preset: str, intervals_s: tuple[float, ...]) -> None:
    schedule = RetrySchedule.parse(preset)

    assert schedule.intervals_s == intervals_s
    assert schedule.window_s == 24 * HOUR
    assert schedule.jitter == 0.1


def test_the_presets_are_the_three_documented_ones() -> None:
    assert sorted(PRESETS) == ["alipay", "default", "wechatpay"]
    assert RetrySchedule.parse(None) == RetrySchedule.parse("default")
    assert RetrySchedule.parse("wechatpay").describe()[:4] == ["15s", "15s", "30s", "3m"]


def test_the_first_attempt_is_immediate_then_the_ladder_is_followed() -> None:
    schedule = RetrySchedule.parse("default", "2d", jitter=0)

    times = attempt_times(schedule, T0, attempts=9)

    assert times[0] == T0
    assert gaps(times) == [m * MINUTE for m in (1, 5, 10, 30, 60, 120, 300, 600)]


def test_after_the_last_step_the_last_interval_repeats() -> None:
    schedule = RetrySchedule.parse("10s,1m", "1d", jitter=0)

    times = attempt_times(schedule, T0, attempts=6)

    assert gaps(times) == [10.0, 60.0, 60.0, 60.0, 60.0]
    assert schedule.interval_after_s(50) == 60.0


def test_an_attempt_that_would_fall_after_the_window_gives_up() -> None:
    schedule = RetrySchedule.parse("1m", "200s", jitter=0)

    times = attempt_times(schedule, T0, attempts=100)

    # T0+240 would be past the window (T0+200): the fourth attempt is the last.
    assert times == [T0, T0 + 60, T0 + 120, T0 + 180]
    decision = schedule.after_failure(attempt_number=4, deadline_at=T0 + 200, now=T0 + 180)
    assert decision == Decision(None, "the next attempt would fall after the time window")
    assert decision.gives_up


def test_an_attempt_exactly_at_the_end_of_the_window_still_happens() -> None:
    schedule = RetrySchedule.parse("1m", "60s", jitter=0)

    decision = schedule.after_failure(attempt_number=1, deadline_at=T0 + 60, now=T0)

    assert decision == Decision(T0 + 60, "retry")
    assert not decision.gives_up


@pytest.mark.parametrize("attempt_number", [1, 3, 8, 20])
def test_jitter_stays_within_ten_percent_of_the_ladder(attempt_number: int) -> None:
    schedule = RetrySchedule.parse("default")
    nominal_s = schedule.interval_after_s(attempt_number)
    rng = random.Random(20240601 + attempt_number)

    waits_s = []
    for _ in range(5000):
        decision = schedule.after_failure(
            attempt_number=attempt_number, deadline_at=T0 + 7 * 24 * HOUR, now=T0, rng=rng
        )
        assert decision.next_attempt_at is not None
        waits_s.append(decision.next_attempt_at - T0)

    assert min(waits_s) >= nominal_s * 0.9
    assert max(waits_s) <= nominal_s * 1.1
    # It does spread: both sides of the nominal wait are reached.
    assert min(waits_s) < nominal_s * 0.92
    assert max(waits_s) > nominal_s * 1.08
    assert abs(sum(waits_s) / len(waits_s) - nominal_s) < nominal_s * 0.01


def test_without_jitter_the_wait_is_exactly_the_ladder() -> None:
    schedule = RetrySchedule.parse("5m", jitter=0)
    rng = random.Random(7)

    waits_s = {
        schedule.after_failure(
            attempt_number=1, deadline_at=T0 + HOUR, now=T0, rng=rng
        ).next_attempt_at
        for _ in range(50)
    }

    assert waits_s == {T0 + 300.0}


def test_a_retry_after_longer_than_the_ladder_is_honoured() -> None:
    schedule = RetrySchedule.parse("1m")

    decision = schedule.after_failure(
        attempt_number=1,
        deadline_at=T0 + 24 * HOUR,
        now=T0,
        retry_after_s=2 * HOUR,
        rng=random.Random(1),
    )

    assert decision == Decision(T0 + 2 * HOUR, "retry")


def test_a_retry_after_shorter_than_the_ladder_does_not_bring_the_attempt_forward() -> None:
    schedule = RetrySchedule.parse("10m", jitter=0)

    decision = schedule.after_failure(
        attempt_number=1, deadline_at=T0 + 24 * HOUR, now=T0, retry_after_s=5.0
    )

    assert decision.next_attempt_at == T0 + 600.0


def test_a_retry_after_past_the_window_gives_up() -> None:
    schedule = RetrySchedule.parse("1m", "1h")

    decision = schedule.after_failure(
        attempt_number=1,
        deadline_at=schedule.deadline(T0),
        now=T0 + 10 * MINUTE,
        retry_after_s=HOUR,
        rng=random.Random(3),
    )

    assert decision.gives_up
    assert decision.next_attempt_at is None


def test_a_ladder_can_be_a_list_or_a_comma_separated_string() -> None:
    assert RetrySchedule.parse(["10s", "1m", 90]).intervals_s == (10.0, 60.0, 90.0)
    assert RetrySchedule.parse("10s, 1m,").intervals_s == (10.0, 60.0)
    assert RetrySchedule.parse("30", "2h").window_s == 7200.0
    assert RetrySchedule.parse(["10s"], 300).deadline(T0) == T0 + 300


@pytest.mark.parametrize(
    ("ladder", "window", "field"),
    [
        ("hourly", None, "retry_schedule"),
        ([], None, "retry_schedule"),
        (["1m"] * 101, None, "retry_schedule"),
        (["1m", "soon"], None, "retry_schedule"),
        ("1m", "-1h", "window"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_field(
    ladder: str | list[str], window: str | None, field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        RetrySchedule.parse(ladder, window)

    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.field == field


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 1.5])
def test_jitter_outside_zero_to_one_is_refused(jitter: float) -> None:
    with pytest.raises(InvalidSchedule, match="jitter"):
        RetrySchedule.parse("1m", jitter=jitter)
