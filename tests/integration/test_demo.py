"""The recharge demo, played for real on free loopback ports, ends consistent."""

from __future__ import annotations

import re
import socket
import sqlite3
from pathlib import Path

import pytest

from tidings.demo.receiver import Faults
from tidings.demo.recharge import plan_faults, run_demo


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base_port() -> int:
    """A port such that it and the two after it are free now."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        if base + 2 < 65536 and all(_bindable(base + offset) for offset in range(3)):
            return base
    raise RuntimeError("found no three consecutive free ports on 127.0.0.1")


def _table(output: str) -> dict[str, list[str]]:
    """The final table's rows by recharge id, cells split on the column gaps."""
    rows = {}
    for line in output.splitlines():
        if re.match(r"rc-\d{4}\s", line):
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[0]] = cells
    return rows


async def test_the_demo_ends_with_every_recharge_consistent_despite_the_faults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    consistent = await run_demo(recharges=5, base_port=_free_base_port(), data_dir=tmp_path)
    output = capsys.readouterr().out

    assert consistent is True
    assert "all 5 recharges consistent" in output
    rows = _table(output)
    assert sorted(rows) == ["rc-0001", "rc-0002", "rc-0003", "rc-0004", "rc-0005"]
    for cells in rows.values():
        assert len(cells) == 9, cells
        payment, account_status = cells[3], cells[7]
        assert (payment, account_status) in {("paid", "credited"), ("failed", "failed")}

    # Columns: id, account, amount, payment, fault, tidings, attempts, account system, by.
    plain = rows["rc-0001"]
    assert plain[1:5] == ["alice", "100.00", "paid", "-"]
    attempts = plain[6].split()
    assert attempts[0] == "ref"  # the account system was not listening yet
    assert attempts[-1] == "200"
    assert set(attempts[:-1]) == {"ref"}
    assert plain[5] == f"delivered ({len(attempts)})"
    assert plain[7:] == ["credited", "notification"]

    twice_500 = rows["rc-0002"]
    attempts = twice_500[6].split()
    assert twice_500[4] == "500 x2"
    assert attempts.count("500") == 2
    assert attempts[-1] == "200"
    assert twice_500[5] == f"delivered ({len(attempts)})"

    never = rows["rc-0003"]
    attempts = never[6].split()
    assert never[4] == "500 always"
    assert never[5] == f"exhausted ({len(attempts)})"
    assert len(attempts) >= 5
    assert "500" in attempts
    assert set(attempts) <= {"ref", "500"}
    assert never[7:] == ["credited", "reconciliation"]

    slow = rows["rc-0004"]
    attempts = slow[6].split()
    assert slow[4] == "slow x1"
    assert attempts[-2:] == ["t/o", "200"]
    assert slow[7:] == ["credited", "notification (1 duplicate ignored)"]

    failed = rows["rc-0005"]
    assert failed[1:4] == ["bob", "40.00", "failed"]
    assert failed[7:] == ["failed", "notification"]

    assert (
        "balances: alice 110.00 (expected 110.00), bob 25.00 (expected 25.00), "
        "carol 60.00 (expected 60.00)"
    ) in output

    # The recharge system's outbox: one row per result, every one relayed to Tidings.
    with sqlite3.connect(tmp_path / "recharge.db") as db:
        outbox = db.execute(
            "SELECT key, notification_id, relayed_at IS NOT NULL FROM tidings_outbox ORDER BY seq"
        ).fetchall()
    assert [(key, relayed) for key, _, relayed in outbox] == [
        ("rc-0001", 1),
        ("rc-0002", 1),
        ("rc-0003", 1),
        ("rc-0004", 1),
        ("rc-0005", 1),
    ]
    notification_of = {key: notification_id for key, notification_id, _ in outbox}

    # The account system's own books: each payment credited exactly once.
    with sqlite3.connect(tmp_path / "account.db") as db:
        balances = dict(db.execute("SELECT account, balance_cents FROM balances"))
        processed = {row[0] for row in db.execute("SELECT notification_id FROM tidings_processed")}
    assert balances == {"alice": 110_00, "bob": 25_00, "carol": 60_00}
    # The deduplicator holds one notification id per notification applied, and the recharge
    # id of the one result learnt by reconciliation: rc-0003 got only 500s.
    assert processed == {
        notification_of["rc-0001"],
        notification_of["rc-0002"],
        notification_of["rc-0004"],
        notification_of["rc-0005"],
        "rc-0003",
    }


def test_exactly_one_recharge_is_never_accepted_however_many_are_played() -> None:
    plan = plan_faults(20)

    assert len(plan) == 20
    assert [i for i, faults in enumerate(plan) if faults.never_accept] == [2]
    assert plan[0] == Faults()
    assert plan[1] == Faults(fail_first=2)


async def test_a_taken_port_stops_the_demo_with_a_message_naming_the_port_option(
    tmp_path: Path,
) -> None:
    base = _free_base_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        with pytest.raises(OSError, match=rf"port {base + 1} on 127\.0\.0\.1 is taken.*--port"):
            await run_demo(recharges=1, base_port=base, data_dir=tmp_path)
