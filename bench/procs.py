"""Child processes of the benchmark: started in their own session, always stopped by id."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

_live: dict[int, Child] = {}


class ChildFailed(RuntimeError):
    """A child process ended or never became ready."""


class Child:
    """One subprocess with its log file; a process group of its own so stop() takes all."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
        drop_env_prefix: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        inherited = {
            name: value
            for name, value in os.environ.items()
            if drop_env_prefix is None or not name.startswith(drop_env_prefix)
        }
        merged = {**inherited, "PYTHONPATH": str(REPO), **(env or {})}
        self.process = subprocess.Popen(
            self.argv,
            env=merged,
            cwd=str(cwd or REPO),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.process.pid
        _live[self.pid] = self

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def check_alive(self) -> None:
        """Raise, naming the log, when the process has ended."""
        if not self.alive():
            raise ChildFailed(
                f"{self.name} (pid {self.pid}) exited with {self.process.returncode}; "
                f"see {self.log_path}"
            )

    def peak_rss_mb(self) -> float | None:
        """The peak resident set size so far (VmHWM), in MiB; None once it has ended."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) spent so far; None once it has been reaped."""
        return process_cpu_s(self.pid)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the child's process group, SIGKILL after `grace_s`."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(5)
        # Children of the group leader that outlived it (none expected) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        _live.pop(self.pid, None)


def stat_cpu_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of a `/proc/<pid>/stat` file."""
    # The command name (field 2) sits in parentheses and may hold spaces and ')' itself,
    # so the numbered fields are counted from the last ')'.
    fields = stat[stat.rindex(")") + 1 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) process `pid` spent; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_cpu_ticks(stat) / CLOCK_TICKS_PER_S


def own_cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process spent."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stop_all() -> None:
    """Stop every child still running: the benchmark's last act, even on failure."""
    for child in list(_live.values()):
        with contextlib.suppress(Exception):
            child.stop(grace_s=3.0)


def run_to_end(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 120.0,
    drop_env_prefix: str | None = None,
) -> None:
    """Run a short command (a migration) to its end; raise if it fails."""
    child = Child(name, argv, log_path=log_path, env=env, cwd=cwd, drop_env_prefix=drop_env_prefix)
    try:
        code = child.process.wait(timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ChildFailed(f"{name} took longer than {timeout_s:g}s; see {log_path}") from exc
    finally:
        child.stop(grace_s=1.0)
    if code != 0:
        raise ChildFailed(f"{name} exited with {code}; see {log_path}")


def wait_http_ok(url: str, children: Sequence[Child], timeout_s: float = 60.0) -> None:
    """Wait until GET `url` answers 2xx, failing fast if a child process ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            child.check_alive()
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if 200 <= response.status < 300:
                return
        time.sleep(0.1)
    raise ChildFailed(f"{url} did not answer within {timeout_s:g}s")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
