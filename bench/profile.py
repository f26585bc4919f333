"""py-spy on a delivering process during a run: a flame graph and a table of hot spots."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import VENV_BIN, Child

SAMPLE_RATE_HZ = 100
# "name (path/to/file.py:123)" -> name and file, the line dropped so a function is one row.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable, if installed."""
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = VENV_BIN / "py-spy"
    return str(candidate) if candidate.exists() else None


class Profiler:
    """Two py-spy samplers on one pid: an SVG flame graph and collapsed stacks."""

    def __init__(self, pid: int, svg: Path, collapsed: Path, log_dir: Path) -> None:
        tool = py_spy()
        if tool is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.svg = svg
        self.collapsed = collapsed
        self.started = time.monotonic()
        self.sampled_s = 0.0
        common = ["--pid", str(pid), "--rate", str(SAMPLE_RATE_HZ), "--nonblocking"]
        self._children = [
            Child(
                "py-spy svg",
                [tool, "record", "-o", str(svg), "--format", "flamegraph", *common],
                log_path=log_dir / "py-spy-svg.log",
            ),
            Child(
                "py-spy raw",
                [tool, "record", "-o", str(collapsed), "--format", "raw", "--threads", *common],
                log_path=log_dir / "py-spy-raw.log",
            ),
        ]

    def finish(self) -> None:
        """Stop sampling: SIGINT makes py-spy write its output, then it exits."""
        self.sampled_s = time.monotonic() - self.started
        for child in self._children:
            if child.alive():
                os.kill(child.pid, signal.SIGINT)
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(60)
            child.stop(grace_s=1.0)


@dataclass(frozen=True)
class HotSpot:
    """A function's share of the samples: where it was running, and where it was on the stack."""

    function: str
    self_percent: float
    total_percent: float


@dataclass
class Profile:
    """Samples counted by function, by package and by kind of thread."""

    total: int = 0
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)

    def spot(self, name: str) -> HotSpot:
        """The shares of one function."""
        return HotSpot(
            name, 100 * self.own[name] / self.total, 100 * self.inclusive[name] / self.total
        )

    def percent(self, count: int) -> float:
        """A count as a share of all samples."""
        return 100 * count / self.total if self.total else 0.0


def _function(frame: str) -> tuple[str, str]:
    """A frame as 'name (file)' and the package it belongs to."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "?"
    path = match.group("file")
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    package = path.split("/", 1)[0].removesuffix(".py") if "/" in path else path
    return f"{match.group('name')} ({path})", package


EVENT_LOOP = "MainThread: the event loop (API + dispatcher, uvloop)"
SQLITE = "aiosqlite worker threads (SQLite calls, C code included)"


def _thread_kind(label: str, names: list[str]) -> str:
    """py-spy's thread label (with --threads) or, without it, what the stack shows."""
    if "MainThread" in label or any("Runner.run" in name for name in names):
        return EVENT_LOOP
    if "_connection_worker_thread" in label or any(
        "_connection_worker_thread" in name for name in names
    ):
        return SQLITE
    return f"other: {label}" if label else "other"


def _busy(samples: int, sampled_s: float | None) -> str:
    if not sampled_s:
        return "—"
    return f"{100 * samples / (sampled_s * SAMPLE_RATE_HZ):.0f}"


def read_profile(collapsed: Path) -> Profile:
    """Count the samples of py-spy's collapsed (raw) output."""
    found = Profile()
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        label = next((part for part in parts if part.startswith("thread ")), "")
        frames = [_function(f) for f in parts if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        names = [name for name, _ in frames]
        found.total += count
        found.own[names[-1]] += count
        found.packages[frames[-1][1]] += count
        found.threads[_thread_kind(label, names)] += count
        for name in set(names):
            found.inclusive[name] += count
    return found


def write_profile_report(
    path: Path,
    collapsed: Path,
    svg_name: str,
    context: Sequence[str],
    *,
    sampled_s: float | None = None,
    top: int = 15,
) -> list[HotSpot]:
    """profile.md: the hot spots of the sampled process; returns the top by self time."""
    found = read_profile(collapsed)
    if found.total == 0:
        raise OSError(f"no samples in {collapsed}")
    by_self = [found.spot(name) for name, _ in found.own.most_common(top)]
    # Tidings' own code, inclusive: which of its steps the time is spent under.
    ours = [
        found.spot(name)
        for name, _ in found.inclusive.most_common()
        if "(tidings/" in name and "(tidings/cli.py)" not in name
    ][:top]
    lines = [
        "# Profile of Tidings embedded under S1",
        "",
        *context,
        "",
        f"{found.total:,} samples at {SAMPLE_RATE_HZ} Hz of the threads that were not idle. "
        f"Flame graph: `{svg_name}` (open it in a browser).",
        "",
        "## By thread",
        "",
        "Busy = the thread's samples / (seconds sampled x rate): how much of the wall time "
        "the thread was running rather than waiting; a thread near 100 % is a bottleneck.",
        "",
        "| thread | % of samples | busy % of wall time |",
        "|---|---:|---:|",
        *(
            f"| {kind} | {found.percent(n):.1f} | {_busy(n, sampled_s)} |"
            for kind, n in found.threads.most_common()
        ),
        "",
        "## By package (self time)",
        "",
        "| package | self % |",
        "|---|---:|",
        *(f"| {pkg} | {found.percent(n):.1f} |" for pkg, n in found.packages.most_common(top)),
        "",
        "## By function, self time (where the CPU was)",
        "",
        "| function | self % | inclusive % |",
        "|---|---:|---:|",
        *(f"| `{s.function}` | {s.self_percent:.1f} | {s.total_percent:.1f} |" for s in by_self),
        "",
        "## Tidings' own functions, inclusive time (what the time was spent under)",
        "",
        "| function | inclusive % | self % |",
        "|---|---:|---:|",
        *(f"| `{s.function}` | {s.total_percent:.1f} | {s.self_percent:.1f} |" for s in ours),
        "",
    ]
    path.write_text("\n".join(lines))
    return by_self
