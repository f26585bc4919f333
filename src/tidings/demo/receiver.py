"""The account system, the receiver of the story: it credits balances, once each.

It learns results two ways. Tidings delivers signed notifications to its notify URL; it
verifies each with the `standardwebhooks` package and applies it at most once, keyed on
`webhook-id`. And because delivery is only best effort, a reconciler asks the recharge
system about every recharge it has heard nothing of for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from tidings.demo.narrator import Narrator
from tidings.demo.notifier import FAILED, PAID, format_cents

CREDITED = "credited"
PENDING = "pending"
BY_NOTIFICATION = "notification"
BY_RECONCILIATION = "reconciliation"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS recharges (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        amount_cents INTEGER NOT NULL,
        status TEXT NOT NULL,
        requested_at REAL NOT NULL,
        settled_by TEXT,
        settled_at REAL
    )""",
    """CREATE TABLE IF NOT EXISTS inbox (
        webhook_id TEXT PRIMARY KEY,
        recharge_id TEXT NOT NULL,
        received_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS balances (
        account TEXT PRIMARY KEY,
        balance_cents INTEGER NOT NULL
    )""",
)


@dataclass(frozen=True)
class Faults:
    """How the account system misbehaves towards one recharge's notifications."""

    fail_first: int = 0  # answer 500 to this many deliveries that reach it
    slow_first: int = 0  # then do the work but answer after the timeout, this many times
    never_accept: bool = False  # answer 500 to every delivery

    def describe(self) -> str:
        """A few words for the final table."""
        if self.never_accept:
            return "500 always"
        parts = []
        if self.fail_first:
            parts.append(f"500 x{self.fail_first}")
        if self.slow_first:
            parts.append(f"slow x{self.slow_first}")
        return ", ".join(parts) or "-"


@dataclass(frozen=True)
class AccountRecharge:
    """A recharge as the account system sees it."""

    id: str
    account: str
    amount_cents: int
    status: str
    settled_by: str | None
    duplicates: int


class AccountSystem:
    """An aiohttp service with a notify URL, a balance per account, and a reconciler."""

    def __init__(
        self,
        db_path: Path,
        *,
        secret: str,
        recharge_url: str,
        narrator: Narrator,
        slow_s: float = 1.5,
        reconcile_after_s: float = 10.0,
        reconcile_every_s: float = 1.0,
    ) -> None:
        # Tiny local writes: blocking the loop for them is fine in a demo.
        self._db = sqlite3.connect(db_path)
        self._db.execute("PRAGMA journal_mode=WAL")
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._webhook = Webhook(secret)
        self._recharge_url = recharge_url.rstrip("/")
        self._say = narrator.say
        self._slow_s = slow_s
        self._reconcile_after_s = reconcile_after_s
        self._reconcile_every_s = reconcile_every_s
        self._faults: dict[str, Faults] = {}
        self._reached: Counter[str] = Counter()
        self._duplicates: Counter[str] = Counter()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._runner: web.AppRunner | None = None
        self._reconciler: asyncio.Task[None] | None = None

    # lifecycle -------------------------------------------------------------------------

    async def come_up(self, sock: socket.socket) -> None:
        """Start listening on the notify URL's socket, and start reconciling."""
        app = web.Application()
        app.router.add_post("/notify", self._notify)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self._reconciler = asyncio.create_task(self._reconcile_loop(), name="account-reconciler")

    async def stop(self) -> None:
        """Stop the reconciler and the listener; close the database."""
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self._runner is not None:
            await self._runner.cleanup()
        await self._http.close()
        self._db.close()

    # asking for a recharge -------------------------------------------------------------

    async def request_recharge(self, account: str, amount_cents: int, faults: Faults) -> str:
        """Ask the recharge system for a top-up and remember it as pending."""
        async with self._http.post(
            f"{self._recharge_url}/recharges",
            json={"account": account, "amount_cents": amount_cents},
        ) as response:
            response.raise_for_status()
            recharge_id: str = (await response.json())["recharge_id"]
        with self._db:
            self._db.execute(
                "INSERT INTO recharges (id, account, amount_cents, status, requested_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (recharge_id, account, amount_cents, PENDING, time.time()),
            )
        self._faults[recharge_id] = faults
        return recharge_id

    # the notify URL --------------------------------------------------------------------

    async def _notify(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = self._webhook.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            self._say("account", f"refused a notification with a bad signature ({exc})")
            return web.Response(status=401, text="bad signature")
        webhook_id = request.headers["webhook-id"]
        recharge_id = str(payload["recharge_id"])
        attempt = request.headers.get("Tidings-Attempt", "?")
        faults = self._faults.get(recharge_id, Faults())
        self._reached[recharge_id] += 1
        reached = self._reached[recharge_id]

        if faults.never_accept or reached <= faults.fail_first:
            self._say("account", f"{recharge_id} attempt {attempt}: answers 500 (injected fault)")
            return web.Response(status=500, text="internal error")

        outcome = self.apply(recharge_id, str(payload["status"]), BY_NOTIFICATION, webhook_id)
        self._say("account", f"{recharge_id} attempt {attempt}: {outcome}")
        if reached <= faults.fail_first + faults.slow_first:
            # The work is done and committed, but the answer comes after Tidings stopped
            # waiting: the next attempt will be a duplicate.
            self._say(
                "account",
                f"{recharge_id} attempt {attempt}: now stalls "
                f"{self._slow_s:g}s before answering (injected fault)",
            )
            await asyncio.sleep(self._slow_s)
        return web.Response(text="ok")

    def apply(self, recharge_id: str, result: str, via: str, webhook_id: str | None = None) -> str:
        """Apply a recharge result at most once; says what happened, for the commentary."""
        status = {PAID: CREDITED, FAILED: FAILED}.get(result)
        if status is None:
            return f"result {result!r} is not final; nothing to apply"
        with self._db:
            if webhook_id is not None:
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO inbox (webhook_id, recharge_id, received_at) "
                    "VALUES (?, ?, ?)",
                    (webhook_id, recharge_id, time.time()),
                ).rowcount
                if not inserted:
                    self._duplicates[recharge_id] += 1
                    return "duplicate of a notification already applied; ignored, answers 200"
            row = self._db.execute(
                "SELECT account, amount_cents FROM recharges WHERE id = ? AND status = ?",
                (recharge_id, PENDING),
            ).fetchone()
            if row is None:
                return "already settled (or never asked for); nothing to do, answers 200"
            account, amount_cents = row
            self._db.execute(
                "UPDATE recharges SET status = ?, settled_by = ?, settled_at = ? WHERE id = ?",
                (status, via, time.time(), recharge_id),
            )
            if status == CREDITED:
                self._db.execute(
                    "INSERT INTO balances (account, balance_cents) VALUES (?, ?) "
                    "ON CONFLICT (account) DO UPDATE "
                    "SET balance_cents = balance_cents + excluded.balance_cents",
                    (account, amount_cents),
                )
        if status == CREDITED:
            return f"{account} credited +{format_cents(amount_cents)}"
        return "payment failed; recharge closed, balance unchanged"

    # reconciliation --------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_every_s)
            await self.reconcile()

    async def reconcile(self) -> None:
        """Ask the recharge system about every recharge long silent, and apply the answer."""
        quiet_since = time.time() - self._reconcile_after_s
        rows = self._db.execute(
            "SELECT id FROM recharges WHERE status = ? AND requested_at < ? ORDER BY id",
            (PENDING, quiet_since),
        ).fetchall()
        for (recharge_id,) in rows:
            try:
                async with self._http.get(f"{self._recharge_url}/recharges/{recharge_id}") as r:
                    r.raise_for_status()
                    answer = await r.json()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._say("account", f"reconciliation could not ask about {recharge_id}: {exc!r}")
                continue
            outcome = self.apply(recharge_id, str(answer["status"]), BY_RECONCILIATION)
            self._say(
                "account",
                f"{recharge_id}: nothing heard for {self._reconcile_after_s:g}s, asked the "
                f"recharge system: {answer['status']}; {outcome}",
            )

    # reading ---------------------------------------------------------------------------

    def recharges(self) -> dict[str, AccountRecharge]:
        """Every recharge this system asked for, by id."""
        rows = self._db.execute(
            "SELECT id, account, amount_cents, status, settled_by FROM recharges ORDER BY id"
        ).fetchall()
        return {
            recharge_id: AccountRecharge(
                recharge_id,
                account,
                amount_cents,
                status,
                settled_by,
                duplicates=self._duplicates[recharge_id],
            )
            for recharge_id, account, amount_cents, status, settled_by in rows
        }

    def balances(self) -> dict[str, int]:
        """Balance in cents per account."""
        return dict(self._db.execute("SELECT account, balance_cents FROM balances").fetchall())

    def faults(self, recharge_id: str) -> Faults:
        """The faults injected for a recharge."""
        return self._faults.get(recharge_id, Faults())

    def all_settled(self) -> bool:
        """Whether every recharge asked for has a final status here."""
        (left,) = self._db.execute(
            "SELECT COUNT(*) FROM recharges WHERE status = ?", (PENDING,)
        ).fetchone()
        return bool(left == 0)
