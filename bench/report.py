"""The results: `latest.md` (tables, ratios, targets) and `latest.png` (throughput, latency)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.config import BenchConfig, Scenario
from bench.measure import Figure, cpu_ceiling_per_s
from bench.procs import REPO

TIDINGS_SYSTEMS = ("tidings", "tidings-pg-1", "tidings-pg-2")
# Higher is better for rates, lower for times and latencies.
HEADLINE = {
    "S1": ("delivery_rate", "deliveries/s", True),
    "S2": ("delivery_rate", "healthy deliveries/s", True),
    "S3": ("duration_s", "seconds until all final", False),
    "S4": ("delivery_rate", "deliveries/s", True),
    "S5": ("p99_ms", "p99 latency ms", False),
}


@dataclass(frozen=True)
class Target:
    """One target of the issue, as measured."""

    name: str
    measured: str
    holds: bool | None  # None: not measured in this run
    info: bool = False  # a figure to compare with, not a target


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _times(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _headline(figure: Figure | None, scenario: str) -> float | None:
    if figure is None:
        return None
    value: float | None = getattr(figure, HEADLINE[scenario][0])
    return value


def targets(found: Mapping[tuple[str, str], Figure]) -> list[Target]:
    """The issue's targets, checked against the medians (printed, never asserted)."""

    def rate(system: str, scenario: str) -> float | None:
        figure = found.get((system, scenario))
        return figure.delivery_rate if figure else None

    out = []
    s1 = rate("tidings", "S1")
    for name, other, want in (("Celery", "celery", 5.0), ("raw limit", "raw", 0.5)):
        ratio = _ratio(s1, rate(other, "S1"))
        out.append(
            Target(
                f"S1: Tidings embedded >= {want:g}x {name}",
                _times(ratio),
                None if ratio is None else ratio >= want,
            )
        )
    for scenario, want in (("S2", 0.9), ("S4", 0.9)):
        ratio = _ratio(rate("tidings", scenario), s1)
        out.append(
            Target(
                f"{scenario}: Tidings embedded >= {want:g}x its S1",
                _times(ratio),
                None if ratio is None else ratio >= want,
            )
        )
    celery_s2 = _ratio(rate("celery", "S2"), rate("celery", "S1"))
    out.append(
        Target("S2 (for comparison): Celery's S2 / its S1", _times(celery_s2), None, info=True)
    )
    s4 = found.get(("tidings", "S4"))
    rss = s4.peak_rss_mb if s4 else None
    out.append(
        Target(
            "S4: dispatcher peak RSS <= 250 MB",
            f"{_fmt(rss, 0)} MiB",
            None if rss is None else rss * 1.048576 <= 250,
        )
    )
    s5 = found.get(("tidings", "S5"))
    for label, value, limit in (
        ("p99", s5.p99_ms if s5 else None, 50.0),
        ("p50", s5.p50_ms if s5 else None, 10.0),
    ):
        out.append(
            Target(
                f"S5: Tidings embedded {label} <= {limit:g} ms",
                f"{_fmt(value, 1)} ms",
                None if value is None else value <= limit,
            )
        )
    ratio = _ratio(rate("tidings-pg-2", "S1"), rate("tidings-pg-1", "S1"))
    out.append(
        Target(
            "(d): two dispatchers >= 1.6x one (S1)",
            _times(ratio),
            None if ratio is None else ratio >= 1.6,
        )
    )
    return out


def _cpu_table(
    scenario: Scenario,
    systems: Sequence[tuple[str, str]],
    found: Mapping[tuple[str, str], Figure],
    usable_cores: int,
) -> list[str]:
    """CPU ms per delivered notification by role, and the rate CPU alone would allow."""
    figures = [
        (system_label, found[(system, scenario.name)])
        for system, system_label in systems
        if (system, scenario.name) in found
    ]
    if not any(figure.cpu_total_ms is not None for _, figure in figures):
        return []
    lines = [
        f"CPU ms per delivered notification; CPU ceiling/s = {usable_cores} usable cores "
        "x 1000 / total ms:",
        "",
        "| system | producers | system | receivers | total | CPU ceiling/s | deliveries/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system_label, figure in figures:
        ceiling = cpu_ceiling_per_s(figure.cpu_total_ms, usable_cores)
        lines.append(
            f"| {system_label} | {_fmt(figure.cpu_producers_ms, 3)} "
            f"| {_fmt(figure.cpu_system_ms, 3)} | {_fmt(figure.cpu_receivers_ms, 3)} "
            f"| {_fmt(figure.cpu_total_ms, 3)} | {_fmt(ceiling)} | {_fmt(figure.delivery_rate)} |"
        )
    return ["", *lines]


def _scenario_table(
    scenario: Scenario,
    systems: Sequence[tuple[str, str]],
    found: Mapping[tuple[str, str], Figure],
    usable_cores: int,
) -> list[str]:
    label = HEADLINE[scenario.name][1]
    lines = [
        f"### {scenario.name}: {scenario.title}",
        "",
        f"Ratios compare the headline figure ({label}); for times and latencies below 1 is better."
        if not HEADLINE[scenario.name][2]
        else f"Ratios compare {label}.",
        "",
        "| system | deliveries/s | submit/s | time s | POSTs per notification | p50 ms | p99 ms "
        "| peak RSS MiB | delivered | x Celery | x raw | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    celery = _headline(found.get(("celery", scenario.name)), scenario.name)
    raw = _headline(found.get(("raw", scenario.name)), scenario.name)
    for system, system_label in systems:
        figure = found.get((system, scenario.name))
        if figure is None:
            continue
        mine = _headline(figure, scenario.name)
        is_tidings = system in TIDINGS_SYSTEMS
        vs_celery = _fmt(_ratio(mine, celery), 2) if is_tidings else ""
        vs_raw = _fmt(_ratio(mine, raw), 2) if is_tidings else ""
        submit = "—" if system == "raw" else _fmt(figure.submit_rate)
        lines.append(
            f"| {system_label} | {_fmt(figure.delivery_rate)} | {submit} "
            f"| {_fmt(figure.duration_s, 2)} | {_fmt(figure.posts_per_notification, 3)} "
            f"| {_fmt(figure.p50_ms, 1)} | {_fmt(figure.p99_ms, 1)} "
            f"| {_fmt(figure.peak_rss_mb)} | {figure.delivered:,}/{figure.target:,} "
            f"| {vs_celery} | {vs_raw} | {_fmt(figure.load, 1)} |"
        )
    lines += _cpu_table(scenario, systems, found, usable_cores)
    problems = [
        f"- {found[(system, scenario.name)].system}: {problem.replace(str(REPO) + '/', '')}"
        for system, _ in systems
        if (system, scenario.name) in found
        for problem in found[(system, scenario.name)].problems
    ]
    if problems:
        lines += ["", "Problems:", *problems]
    return [*lines, ""]


def write_markdown(
    path: Path,
    *,
    title_line: str,
    command: str,
    config: BenchConfig,
    machine: Mapping[str, str],
    setup: Sequence[str],
    scenarios: Sequence[Scenario],
    systems: Sequence[tuple[str, str]],
    found: Mapping[tuple[str, str], Figure],
    notes: Sequence[str],
    usable_cores: int,
) -> None:
    """Write the Markdown report."""
    lines = [
        f"# Tidings benchmark: {title_line}",
        "",
        f"Command: `{command}`. {config.runs} run(s) per figure, medians shown. "
        f"{config.notifications:,} notifications per run over {config.endpoints} endpoints "
        "(one topic per endpoint, so one delivery per notification).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in machine.items()),
        "",
        "## Setup",
        "",
        *(f"- {line}" for line in setup),
        "",
        "## Targets (printed, never asserted)",
        "",
        "The `load` column of each table is the machine's 1-minute load average during the "
        "runs (median of the higher of start and end): above the core count, other work "
        "shared the CPUs and the figures are lower and noisier than on an idle machine.",
        "",
        "| target | measured | holds |",
        "|---|---:|---|",
    ]
    for target in targets(found):
        if target.info:
            verdict = "(no target)"
        elif target.holds is None:
            verdict = "not measured"
        else:
            verdict = "yes" if target.holds else "no"
        lines.append(f"| {target.name} | {target.measured} | {verdict} |")
    lines += ["", "## Results", ""]
    for scenario in scenarios:
        lines += _scenario_table(scenario, systems, found, usable_cores)
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in dict.fromkeys(notes)), ""]
    path.write_text("\n".join(lines))


def write_chart(
    path: Path,
    scenarios: Sequence[Scenario],
    systems: Sequence[tuple[str, str]],
    found: Mapping[tuple[str, str], Figure],
) -> None:
    """Throughput per scenario and S5 latency per system, side by side (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate_scenarios = [s.name for s in scenarios if s.name in ("S1", "S2", "S3", "S4")]
    shown = [(name, label) for name, label in systems if any(k[0] == name for k in found)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / max(len(shown), 1)
    for offset, (system, label) in enumerate(shown):
        rates = [
            found[(system, s)].delivery_rate if (system, s) in found else None
            for s in rate_scenarios
        ]
        positions = [i + offset * width for i in range(len(rate_scenarios))]
        bars = left.bar(positions, [r or 0.0 for r in rates], width, label=label)
        left.bar_label(bars, ["n/a" if r is None else f"{r:.0f}" for r in rates], fontsize=6)
    left.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(rate_scenarios))])
    left.set_xticklabels(rate_scenarios)
    left.set_ylabel("deliveries/s (median)")
    left.set_title("Throughput (S2: to the healthy endpoints)")
    left.legend(fontsize=8)
    latency: list[tuple[str, Figure]] = []
    for system, label in shown:
        figure = found.get((system, "S5"))
        if figure is not None and figure.p50_ms is not None:
            latency.append((label, figure))
    if latency:
        positions = list(range(len(latency)))
        for shift, name in ((-0.2, "p50"), (0.2, "p99")):
            bars = right.bar(
                [p + shift for p in positions],
                [getattr(f, f"{name}_ms") or 0.0 for _, f in latency],
                0.4,
                label=name,
            )
            right.bar_label(bars, fmt="%.1f", fontsize=6)
        right.set_xticks(positions)
        right.set_xticklabels([label for label, _ in latency], rotation=15, fontsize=8)
        right.set_yscale("log")
        right.set_ylabel("ms, submit returned -> receiver got it")
        right.legend()
    right.set_title("S5 latency at half the S1 rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
