"""The demo's running commentary: one line per event, stamped with seconds since the start."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


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

    def __init__(self, narrator: Narrator, names: dict[str, str]) -> None:
        super().__init__(level=logging.ERROR)
        self._narrator = narrator
        self._names = names

    def emit(self, record: logging.LogRecord) -> None:
        notification_id = getattr(record, "notification_id", None)
        if getattr(record, "action", None) == "exhausted" and notification_id:
            name = self._names.get(notification_id, notification_id)
            answer = getattr(record, "status_code", None) or getattr(record, "error_class", "?")
            self._narrator.say(
                "tidings",
                f"gave up on {name} after {getattr(record, 'attempt', '?')} attempts: "
                f"its time window is closing (last answer: {answer}); exhausted, kept for "
                "inspection",
            )
        else:
            self._narrator.say("tidings", record.getMessage())


@contextmanager
def tidings_voice(narrator: Narrator, names: dict[str, str]) -> Iterator[None]:
    """While open, Tidings' error log lines appear in the commentary; `names` maps
    notification ids to the recharge they carry. Retry warnings stay quiet: the final
    table lists every attempt."""
    logger = logging.getLogger("tidings")
    handler = _TidingsVoice(narrator, names)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
