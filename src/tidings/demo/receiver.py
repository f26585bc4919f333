"""The account system, the receiver of the story: it credits balances, once each.

It learns results two ways. Tidings delivers signed notifications to its notify URL; it
checks each with `tidings.receiver.verify` and applies it at most once with the toolkit's
`AsyncDeduplicator`, keyed on the notification id. And because delivery is only best
effort, a reconciler looks into every recharge it has heard nothing of for a while: it asks
Tidings first, with its receiver key, and the recharge system when Tidings has delivered
nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from tidings.client import Client
from tidings.demo.narrator import Narrator
from tidings.demo.notifier import FAILED, PAID, TOPIC, format_cents
from tidings.errors import SignatureError, TidingsError
from tidings.receiver import AsyncDeduplicator, verify

CREDITED = "credited"
PENDING = "pending"
BY_NOTIFICATION = "notification"
BY_RECONCILIATION = "reconciliation"
_FINAL = {PAID: CREDITED, FAILED: FAILED}

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
        tidings: Client,
        narrator: Narrator,
        slow_s: float = 1.5,
        reconcile_after_s: float = 10.0,
        reconcile_every_s: float = 1.0,
    ) -> None:
        self._db = create_async_engine(f"sqlite+aiosqlite:///{db_path}")
        self._dedup = AsyncDeduplicator(self._db)
        self._secret = secret
        self._recharge_url = recharge_url.rstrip("/")
        self._tidings = tidings
        self._say = narrator.say
        self._slow_s = slow_s
        self._reconcile_after_s = reconcile_after_s
        self._reconcile_every_s = reconcile_every_s
        self._faults: dict[str, Faults] = {}
        self._reached: Counter[str] = Counter()
        self._duplicates: Counter[str] = Counter()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None

    # lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the account system's tables, the toolkit's processed-ids table among them."""
        async with self._db.begin() as conn:
            await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            for statement in _SCHEMA:
                await conn.exec_driver_sql(statement)
        await self._dedup.create_table()

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
            # Not cancelled: a question to Tidings runs in a thread that cancelling would
            # leave behind; the loop ends after the round in progress.
            self._stopping.set()
            await self._reconciler
        if self._runner is not None:
            await self._runner.cleanup()
        await self._http.close()
        await self._db.dispose()

    # asking for a recharge -------------------------------------------------------------

    async def request_recharge(self, account: str, amount_cents: int, faults: Faults) -> str:
        """Ask the recharge system for a top-up and remember it as pending."""
        async with self._http.post(
            f"{self._recharge_url}/recharges",
            json={"account": account, "amount_cents": amount_cents},
        ) as response:
            response.raise_for_status()
            recharge_id: str = (await response.json())["recharge_id"]
        async with self._db.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO recharges (id, account, amount_cents, status, requested_at) "
                    "VALUES (:id, :account, :amount_cents, :status, :now)"
                ),
                {
                    "id": recharge_id,
                    "account": account,
                    "amount_cents": amount_cents,
                    "status": PENDING,
                    "now": time.time(),
                },
            )
        self._faults[recharge_id] = faults
        return recharge_id

    # the notify URL --------------------------------------------------------------------

    async def _notify(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verified = verify(body, request.headers, self._secret)
        except SignatureError as exc:
            self._say("account", f"refused a notification with a bad signature ({exc})")
            return web.Response(status=401, text="bad signature")
        payload = verified.json()
        recharge_id = str(payload["recharge_id"])
        attempt = request.headers.get("Tidings-Attempt", "?")
        faults = self._faults.get(recharge_id, Faults())
        self._reached[recharge_id] += 1
        reached = self._reached[recharge_id]

        if faults.never_accept or reached <= faults.fail_first:
            self._say("account", f"{recharge_id} attempt {attempt}: answers 500 (injected fault)")
            return web.Response(status=500, text="internal error")

        outcome = await self.apply(
            verified.id, recharge_id, str(payload["status"]), BY_NOTIFICATION
        )
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

    async def apply(self, application_id: str, recharge_id: str, result: str, via: str) -> str:
        """Apply a recharge result at most once per `application_id` (a notification id, or
        the recharge id for a reconciled result); says what happened, for the commentary."""
        status = _FINAL.get(result)
        if status is None:
            # Not claimed: the recharge must stay open to a later, final answer.
            return f"result {result!r} is not final; nothing to apply"

        async def settle(conn: AsyncConnection) -> str:
            return await self._settle(conn, recharge_id, status, via)

        handled = await self._dedup.handle(application_id, settle)
        if not handled.ran or handled.result is None:
            self._duplicates[recharge_id] += 1
            return f"duplicate: {application_id} was applied before; ignored, answers 200"
        return handled.result

    async def _settle(self, conn: AsyncConnection, recharge_id: str, status: str, via: str) -> str:
        # Whatever the id the deduplicator saw, a recharge leaves pending only once: a
        # notification after a reconciliation (or the reverse) cannot credit twice.
        row = (
            await conn.execute(
                sa.text(
                    "SELECT account, amount_cents FROM recharges "
                    "WHERE id = :id AND status = :pending"
                ),
                {"id": recharge_id, "pending": PENDING},
            )
        ).first()
        if row is None:
            return "already settled (or never asked for); nothing to do, answers 200"
        account, amount_cents = row
        await conn.execute(
            sa.text(
                "UPDATE recharges SET status = :status, settled_by = :via, settled_at = :now "
                "WHERE id = :id"
            ),
            {"status": status, "via": via, "now": time.time(), "id": recharge_id},
        )
        if status != CREDITED:
            return "payment failed; recharge closed, balance unchanged"
        await conn.execute(
            sa.text(
                "INSERT INTO balances (account, balance_cents) VALUES (:account, :cents) "
                "ON CONFLICT (account) DO UPDATE "
                "SET balance_cents = balance_cents + excluded.balance_cents"
            ),
            {"account": account, "cents": amount_cents},
        )
        return f"{account} credited +{format_cents(amount_cents)}"

    # reconciliation --------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._reconcile_every_s)
            if not self._stopping.is_set():
                await self.reconcile()

    async def reconcile(self) -> None:
        """Look into every recharge long silent: ask Tidings, then the recharge system."""
        quiet_since = time.time() - self._reconcile_after_s
        async with self._db.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT id FROM recharges WHERE status = :pending AND requested_at < :t "
                        "ORDER BY id"
                    ),
                    {"pending": PENDING, "t": quiet_since},
                )
            ).all()
        for (recharge_id,) in rows:
            await self._reconcile_one(str(recharge_id))

    async def _reconcile_one(self, recharge_id: str) -> None:
        silent = f"{recharge_id}: nothing heard for {self._reconcile_after_s:g}s"
        try:
            # The client is synchronous and Tidings answers on this very event loop.
            found = await asyncio.to_thread(self._tidings.find, key=recharge_id, topic=TOPIC)
        except TidingsError as exc:
            self._say("account", f"{silent}; could not ask Tidings ({exc})")
            found = []
        delivered = [n for n in found if _delivered(n)]
        if delivered:
            latest = delivered[-1]
            status = str(latest["payload"]["status"])
            outcome = await self.apply(latest["id"], recharge_id, status, BY_RECONCILIATION)
            self._say("account", f"{silent}; Tidings delivered {latest['id']}: {status}; {outcome}")
            return
        with_tidings = f"its notification is {found[-1]['status']}" if found else "none yet"
        try:
            async with self._http.get(f"{self._recharge_url}/recharges/{recharge_id}") as r:
                r.raise_for_status()
                answer = await r.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._say("account", f"{silent}; could not ask the recharge system: {exc!r}")
            return
        status = str(answer["status"])
        outcome = await self.apply(recharge_id, recharge_id, status, BY_RECONCILIATION)
        self._say(
            "account",
            f"{silent}; Tidings delivered nothing ({with_tidings}), asked the recharge "
            f"system: {status}; {outcome}",
        )

    # reading ---------------------------------------------------------------------------

    async def recharges(self) -> dict[str, AccountRecharge]:
        """Every recharge this system asked for, by id."""
        async with self._db.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT id, account, amount_cents, status, settled_by FROM recharges "
                        "ORDER BY id"
                    )
                )
            ).all()
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

    async def balances(self) -> dict[str, int]:
        """Balance in cents per account."""
        async with self._db.connect() as conn:
            rows = await conn.execute(sa.text("SELECT account, balance_cents FROM balances"))
            return {str(account): int(cents) for account, cents in rows.all()}

    def faults(self, recharge_id: str) -> Faults:
        """The faults injected for a recharge."""
        return self._faults.get(recharge_id, Faults())

    async def all_settled(self) -> bool:
        """Whether every recharge asked for has a final status here."""
        async with self._db.connect() as conn:
            left = (
                await conn.execute(
                    sa.text("SELECT COUNT(*) FROM recharges WHERE status = :pending"),
                    {"pending": PENDING},
                )
            ).scalar_one()
        return bool(left == 0)


def _delivered(notification: dict[str, Any]) -> bool:
    """Whether Tidings delivered this notification to the account system's endpoint."""
    return any(d["status"] == "delivered" for d in notification["deliveries"])
