"""The final table: every recharge as the recharge system, Tidings and the account system
each see it, and whether the two businesses agree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tidings.demo.notifier import FAILED, PAID, Recharge, format_cents
from tidings.demo.receiver import CREDITED, AccountRecharge, Faults

# What the account system must show for each result the recharge system holds.
_AGREES_WITH = {PAID: CREDITED, FAILED: FAILED}
_SHORT_ERRORS = {"connect_refused": "ref", "timeout": "t/o", "connection_reset": "reset"}
_HEADER = (
    "recharge",
    "account",
    "amount",
    "payment",
    "fault injected",
    "tidings",
    "attempts, oldest first",
    "account system",
    "settled by",
)
_RIGHT_ALIGNED = frozenset({2})  # amounts


@dataclass(frozen=True)
class Row:
    """One recharge, seen from the three places that know about it."""

    recharge_id: str
    account: str
    amount_cents: int
    payment: str  # at the recharge system: the truth
    faults: Faults
    delivery_status: str  # at Tidings
    attempts: tuple[str, ...]
    account_status: str  # at the account system
    settled_by: str | None
    duplicates: int

    @property
    def consistent(self) -> bool:
        """Both businesses hold the same final result."""
        return _AGREES_WITH.get(self.payment) == self.account_status

    def cells(self) -> tuple[str, ...]:
        """The row as table cells."""
        settled = self.settled_by or "-"
        if self.duplicates:
            plural = "s" if self.duplicates > 1 else ""
            settled += f" ({self.duplicates} duplicate{plural} ignored)"
        return (
            self.recharge_id,
            self.account,
            format_cents(self.amount_cents),
            self.payment,
            self.faults.describe(),
            f"{self.delivery_status} ({len(self.attempts)})",
            " ".join(self.attempts) or "-",
            self.account_status,
            settled,
        )


@dataclass(frozen=True)
class DemoReport:
    """How the demo ended."""

    rows: tuple[Row, ...]
    balances_cents: dict[str, int]  # at the account system
    expected_cents: dict[str, int]  # the sum of paid recharges, per account

    @property
    def inconsistent(self) -> list[str]:
        """The recharges on which the two businesses disagree."""
        return [row.recharge_id for row in self.rows if not row.consistent]

    @property
    def balances_agree(self) -> bool:
        """Every balance is the sum of that account's paid recharges, each counted once."""
        accounts = self.expected_cents.keys() | self.balances_cents.keys()
        return all(self.balances_cents.get(a, 0) == self.expected_cents.get(a, 0) for a in accounts)

    @property
    def consistent(self) -> bool:
        """Every recharge and every balance agrees."""
        return bool(self.rows) and not self.inconsistent and self.balances_agree


def attempt_label(attempt: dict[str, Any]) -> str:
    """One attempt in a few characters: the status code, or a short error class."""
    if attempt.get("status_code") is not None:
        return str(attempt["status_code"])
    error = str(attempt.get("error") or "?")
    return _SHORT_ERRORS.get(error, error)


def build_report(
    truth: list[Recharge],
    notifications: dict[str, dict[str, Any]],
    seen: dict[str, AccountRecharge],
    faults: dict[str, Faults],
    balances_cents: dict[str, int],
) -> DemoReport:
    """Put the three views side by side; `notifications` maps recharge id to Tidings'
    record of its notification, with attempts."""
    rows = []
    expected: dict[str, int] = {}
    for recharge in truth:
        if recharge.status == PAID:
            expected[recharge.account] = expected.get(recharge.account, 0) + recharge.amount_cents
        record = notifications.get(recharge.id)
        delivery = (record or {}).get("deliveries") or [{}]
        account_view = seen.get(recharge.id)
        rows.append(
            Row(
                recharge_id=recharge.id,
                account=recharge.account,
                amount_cents=recharge.amount_cents,
                payment=recharge.status,
                faults=faults.get(recharge.id, Faults()),
                delivery_status=str(delivery[0].get("status", "not sent")),
                attempts=tuple(attempt_label(a) for a in delivery[0].get("attempts") or []),
                account_status=account_view.status if account_view else "unknown",
                settled_by=account_view.settled_by if account_view else None,
                duplicates=account_view.duplicates if account_view else 0,
            )
        )
    return DemoReport(tuple(rows), balances_cents, expected)


def render(report: DemoReport) -> list[str]:
    """The table, a legend, the balances and the verdict, as lines."""
    body = [row.cells() for row in report.rows]
    widths = [max(len(cell) for cell in column) for column in zip(_HEADER, *body, strict=True)]
    lines = [_format(_HEADER, widths), _format(tuple("-" * w for w in widths), widths)]
    lines += [_format(cells, widths) for cells in body]
    lines += [
        "",
        "attempts: the HTTP status the account system answered; ref = connection refused "
        "(it was down), t/o = no answer within the endpoint's timeout",
        "balances: "
        + ", ".join(
            f"{account} {format_cents(report.balances_cents.get(account, 0))} "
            f"(expected {format_cents(cents)})"
            for account, cents in sorted(report.expected_cents.items())
        ),
        "",
    ]
    if report.consistent:
        lines.append(
            f"all {len(report.rows)} recharges consistent: the account system agrees with "
            "the recharge system on every one, and every balance counts each payment once"
        )
    else:
        lines.append(_verdict_against(report))
    return lines


def _verdict_against(report: DemoReport) -> str:
    problems = [
        f"{row.recharge_id} (recharge system: {row.payment}, account system: {row.account_status})"
        for row in report.rows
        if not row.consistent
    ]
    if not report.balances_agree:
        problems.append("balances differ from the sum of paid recharges")
    if not report.rows:
        problems.append("no recharge was made")
    return "NOT consistent: " + "; ".join(problems)


def _format(cells: tuple[str, ...], widths: list[int]) -> str:
    parts = [
        cell.rjust(width) if index in _RIGHT_ALIGNED else cell.ljust(width)
        for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(parts).rstrip()
