"""The demo's running commentary: one line per event, stamped with seconds since the start."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tidings.stores.base import Store


class Narrator:
    """Prints what each system of the demo does, as it happens."""

    def __init__(self, out: TextIO | None = None) -> None:
        # None means "sys.stdout when printing", so a replaced stdout (pytest) is honoured.
        self._out = out
        self._started = time.monotonic()

    def elapsed_s(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self._started

    def say(self, who: str, text: str) -> None:
        """One event line: when, which system, what happened."""
        self.line(f"[{self.elapsed_s():5.1f}s] {who:<9} {text}")

    def line(self, text: str = "") -> None:
        """A line as it is, e.g. a row of the final table."""
        print(text, file=self._out or sys.stdout, flush=True)


class _TidingsVoice(logging.Handler):
    """Tells Tidings' own errors (a notification given up) in the commentary."""

    def __init__(self, narrator: Narrator, name_of: Callable[[str], str]) -> None:
        super().__init__(level=logging.ERROR)
        self._narrator = narrator
        self._name_of = name_of

    def emit(self, record: logging.LogRecord) -> None:
        notification_id = getattr(record, "notification_id", None)
        if getattr(record, "action", None) == "exhausted" and notification_id:
            name = self._name_of(notification_id)
            answer = getattr(record, "status_code", None) or getattr(record, "error_class", "?")
            self._narrator.say(
                "tidings",
                f"gave up on {name} after {getattr(record, 'attempt', '?')} attempts "
                f"(last answer: {answer}): its time window has no room for another; "
                "marked exhausted and kept for inspection",
            )
        else:
            self._narrator.say("tidings", record.getMessage())


@contextmanager
def tidings_voice(narrator: Narrator, name_of: Callable[[str], str]) -> Iterator[None]:
    """While open, Tidings' error log lines appear in the commentary; `name_of` tells
    which recharge a notification id carries. Retry warnings stay quiet: the final
    table lists every attempt."""
    logger = logging.getLogger("tidings")
    handler = _TidingsVoice(narrator, name_of)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


async def watch_breaker(
    store: Store, endpoint_id: str, narrator: Narrator, *, every_s: float = 0.1
) -> None:
    """Tell when the endpoint's circuit breaker opens and closes, until cancelled."""
    open_until: float | None = None
    while True:
        try:
            health = await store.endpoint_health(endpoint_id)
        except Exception as exc:
            narrator.say("demo", f"stopped watching the circuit breaker: {exc!r}")
            return
        if health.circuit_open_until != open_until:
            if health.circuit_open_until is None:
                narrator.say("tidings", "circuit closed: a probe got through; deliveries resume")
            elif open_until is None or health.circuit_open_until > open_until:
                pause_s = max(0.0, health.circuit_open_until - time.time())
                why = (
                    f"circuit open after {health.consecutive_failures} failures in a row"
                    if open_until is None
                    else f"probe failed too ({health.consecutive_failures} in a row)"
                )
                narrator.say(
                    "tidings", f"{why}: deliveries held for {pause_s:.1f}s, then one probe"
                )
            open_until = health.circuit_open_until
        await asyncio.sleep(every_s)
