"""Durations as people write them: parsing, refusing with the field named, and formatting."""

from __future__ import annotations

import pytest

from tidings.durations import format_duration, parse_duration_s
from tidings.errors import InvalidDuration, InvalidInput


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("45", 45.0),
        (" 2h ", 7200.0),
        ("10 m", 600.0),
        ("0.5s", 0.5),
    ],
)
def test_a_duration_string_parses_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize(("number", "seconds"), [(90, 90.0), (2.5, 2.5), (86400, 86400.0)])
def test_a_plain_number_is_taken_as_seconds(number: float, seconds: float) -> None:
    parsed = parse_duration_s(number)
    assert parsed == seconds
    assert isinstance(parsed, float)


@pytest.mark.parametrize("text", ["", "abc", "5x", "m5", "-5s", "1.2.3m", "5 minutes", "1e3s"])
def test_text_that_is_not_a_duration_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidDuration) as caught:
        parse_duration_s(text, field="window")

    assert str(caught.value).startswith("window: ")
    assert repr(text) in str(caught.value)
    assert caught.value.field == "window"
    assert caught.value.code == "invalid_duration"
    assert isinstance(caught.value, InvalidInput)


@pytest.mark.parametrize("value", ["0s", "0", 0, -3, -0.5, float("nan"), float("inf")])
def test_a_duration_that_is_not_positive_and_finite_is_refused(value: str | float) -> None:
    with pytest.raises(InvalidDuration) as caught:
        parse_duration_s(value, field="timeout")

    assert str(caught.value).startswith("timeout: a duration must be positive")
    assert caught.value.field == "timeout"


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_duration(value: bool) -> None:
    with pytest.raises(InvalidDuration, match=r"^retry_schedule: expected a duration"):
        parse_duration_s(value, field="retry_schedule")


def test_the_field_defaults_to_duration_in_the_message() -> None:
    with pytest.raises(InvalidDuration, match=r"^duration: 'soon' is not a duration"):
        parse_duration_s("soon")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (300.0, "5m"),
        (90.0, "90s"),
        (5400.0, "90m"),
        (7200.0, "2h"),
        (86400.0, "1d"),
        (1.5, "1.5s"),
        (0.25, "0.25s"),
    ],
)
def test_a_duration_formats_in_the_largest_exact_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["15s", "3m", "6h", "2d"])
def test_formatting_then_parsing_gives_the_same_seconds(text: str) -> None:
    assert format_duration(parse_duration_s(text)) == text
