"""What the harness asks of every system under test."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from bench.config import Scenario
from bench.harness import RunContext, SubmitResult
from bench.payloads import Item
from bench.procs import Child


class System(abc.ABC):
    """A way of getting notifications to the receivers, started fresh for every run."""

    name: str
    label: str
    needs_rabbitmq = False

    def __init__(self) -> None:
        self.notes: list[str] = []

    def supports(self, scenario: Scenario) -> bool:
        """Whether the scenario means anything for this system."""
        return True

    @abc.abstractmethod
    async def start(self, ctx: RunContext) -> None:
        """Start from an empty state: processes up, endpoints known."""

    async def load_backlog(self, ctx: RunContext, count: int) -> float:
        """Put `count` deliveries waiting hours for a retry in place; returns seconds taken."""
        raise NotImplementedError(f"{self.name} has no backlog")

    @abc.abstractmethod
    async def submit(
        self, ctx: RunContext, items: Sequence[Item], rate: float | None
    ) -> SubmitResult:
        """Hand `items` over the way a producer would, concurrently, paced at `rate`."""

    async def explain(self, ctx: RunContext, ids: Sequence[str], file_name: str) -> None:
        """Save what the system knows of some notifications (late or lost) into the run dir."""
        return None

    @abc.abstractmethod
    def watched(self) -> list[Child]:
        """The processes that must stay alive while the run goes on."""

    def delivering_pids(self) -> list[int]:
        """The processes that deliver (profiled with --profile)."""
        return [child.pid for child in self.watched()]

    @abc.abstractmethod
    def peak_rss_mb(self) -> float | None:
        """The peak RSS of the delivering process (the largest, if several)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every process and clean what the run made."""
