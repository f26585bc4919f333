"""CPU accounting: reading /proc, charging each role per delivered notification, medians."""

from __future__ import annotations

import os
import select
import sys
import time
from pathlib import Path

from bench.measure import CpuSample, RunResult, charge_cpu, cpu_ceiling_per_s, figures, sample_cpu
from bench.procs import (
    CLOCK_TICKS_PER_S,
    Child,
    own_cpu_s,
    process_cpu_s,
    stat_cpu_ticks,
)

# Burns 0.3 s of its own CPU, says so, then sleeps (spending nothing) until stopped.
BURNER = (
    "import time\n"
    "while time.process_time() < 0.3:\n"
    "    pass\n"
    "print('burnt', flush=True)\n"
    "time.sleep(60)\n"
)


def _burn_s(cpu_s: float) -> None:
    started = time.process_time()
    while time.process_time() - started < cpu_s:
        pass


def _times_ticks() -> int:
    times = os.times()
    return round((times.user + times.system) * CLOCK_TICKS_PER_S)


def test_the_stat_line_is_read_after_the_last_parenthesis() -> None:
    # A command name may hold spaces and ')': fields 14 and 15 are 7 and 5 ticks here.
    stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194304 100 0 0 0 7 5 3 2 20 0 1 0 69201"
    assert stat_cpu_ticks(stat) == 12


def test_this_process_reads_the_same_ticks_as_os_times() -> None:
    _burn_s(0.05)
    before = _times_ticks()
    read_s = process_cpu_s(os.getpid())
    after = _times_ticks()
    assert read_s is not None
    assert before <= round(read_s * CLOCK_TICKS_PER_S) <= after


def test_own_cpu_is_this_process_user_plus_system_time() -> None:
    _burn_s(0.05)
    before = _times_ticks() / CLOCK_TICKS_PER_S
    own_s = own_cpu_s()
    after = _times_ticks() / CLOCK_TICKS_PER_S
    # os.times() rounds user and system time down to whole ticks each; getrusage does not.
    assert before <= own_s < after + 2 / CLOCK_TICKS_PER_S


def test_a_child_reports_its_cpu_until_it_is_reaped(tmp_path: Path) -> None:
    burner = Child(
        "burner",
        [sys.executable, "-c", BURNER],
        log_path=tmp_path / "burner.log",
        stdout_pipe=True,
    )
    try:
        assert burner.process.stdout is not None
        ready, _, _ = select.select([burner.process.stdout], [], [], 30.0)
        assert ready, "the burner did not finish burning in 30 s"
        assert burner.process.stdout.readline() == b"burnt\n"
        spent_s = burner.cpu_s()
        assert spent_s is not None
        assert 0.29 <= spent_s < 2.0  # 0.3 s of loop, plus Python's start, in whole ticks
        sample = sample_cpu(burner, [burner])  # asleep now, so its CPU no longer moves
        assert sample.receivers_s == spent_s
        assert sample.system_s == {burner.pid: spent_s}
    finally:
        burner.stop(grace_s=1.0)
    assert burner.cpu_s() is None
    gone = sample_cpu(burner, [burner])
    assert gone.receivers_s is None
    assert gone.system_s == {}


def _delivered(count: int) -> RunResult:
    result = RunResult("tidings", "S1", 0, count)
    result.delivered = count
    return result


def test_each_role_is_charged_per_delivered_notification() -> None:
    before = CpuSample(producers_s=1.0, receivers_s=4.0, system_s={10: 2.0, 11: 0.25})
    # Process 12 started in between (the raw sender does): it counts from 0.
    after = CpuSample(producers_s=1.5, receivers_s=4.25, system_s={10: 3.0, 11: 0.25, 12: 0.5})
    result = _delivered(250)
    charge_cpu(result, before, after)
    assert result.cpu_producers_ms == 2.0
    assert result.cpu_system_ms == 6.0
    assert result.cpu_receivers_ms == 1.0
    assert result.cpu_total_ms == 9.0


def test_a_system_process_that_ended_leaves_the_system_and_total_unknown() -> None:
    before = CpuSample(producers_s=1.0, receivers_s=4.0, system_s={10: 2.0, 11: 0.25})
    after = CpuSample(producers_s=1.5, receivers_s=4.25, system_s={10: 3.0})
    result = _delivered(250)
    charge_cpu(result, before, after)
    assert result.cpu_producers_ms == 2.0
    assert result.cpu_system_ms is None
    assert result.cpu_receivers_ms == 1.0
    assert result.cpu_total_ms is None


def test_nothing_is_charged_when_nothing_was_delivered() -> None:
    sample = CpuSample(producers_s=1.0, receivers_s=4.0, system_s={10: 2.0})
    result = _delivered(0)
    charge_cpu(result, sample, sample)
    assert result.cpu_producers_ms is None
    assert result.cpu_total_ms is None


def test_the_median_total_is_taken_over_each_run_total() -> None:
    runs = []
    for run, (producers_ms, system_ms) in enumerate(((1.0, 1.0), (2.0, 4.0), (3.0, 2.0))):
        result = RunResult("tidings", "S1", run, 100)
        result.cpu_producers_ms = producers_ms
        result.cpu_system_ms = system_ms
        result.cpu_receivers_ms = 0.5
        result.cpu_total_ms = producers_ms + system_ms + 0.5
        runs.append(result)
    figure = figures(runs)[("tidings", "S1")]
    assert figure.cpu_producers_ms == 2.0
    assert figure.cpu_system_ms == 2.0
    assert figure.cpu_receivers_ms == 0.5
    assert figure.cpu_total_ms == 5.5  # of 2.5, 6.5, 5.5; the medians would add up to 4.5
    assert figures(runs[:2])[("tidings", "S1")].cpu_total_ms == 4.5  # (2.5 + 6.5) / 2


def test_the_cpu_ceiling_is_cores_times_1000_over_the_total() -> None:
    assert cpu_ceiling_per_s(0.8, 2) == 2500.0
    assert cpu_ceiling_per_s(4.0, 1) == 250.0
    assert cpu_ceiling_per_s(None, 2) is None
    assert cpu_ceiling_per_s(0.0, 2) is None
