"""Durations written the way people write them: '30s', '5m', '2h', '1d'."""

from __future__ import annotations

import re

from tidings.errors import InvalidDuration

_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration_s(value: str | float, *, field: str = "duration") -> float:
    """Parse '90s', '5m', '1.5h' or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise InvalidDuration(f"{field}: expected a duration such as '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _PATTERN.match(value)
        if match is None:
            raise InvalidDuration(
                f"{field}: {value!r} is not a duration; write a number followed by "
                "s, m, h or d, e.g. '30s', '5m', '2h'",
                field=field,
            )
        seconds = float(match.group(1)) * _UNIT_S[match.group(2) or "s"]
    if seconds <= 0 or seconds != seconds or seconds == float("inf"):
        raise InvalidDuration(f"{field}: a duration must be positive, got {value!r}", field=field)
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds in the largest unit that divides them exactly: 300 -> '5m'."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
