"""The recharge system, the notifier of the story: it takes payment and tells Tidings.

It owns the truth about every recharge. A result and the duty to announce it are written
in one local transaction (`notified_at` stays empty until Tidings has the notification),
so a result is never settled without being announced sooner or later.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tidings.demo.narrator import Narrator
from tidings.demo.tidings_api import TidingsApi
from tidings.errors import TidingsError

TOPIC = "recharge.result"
PAID = "paid"
FAILED = "failed"
PENDING = "pending"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS recharges (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE,
    account TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    status TEXT NOT NULL,
    requested_at REAL NOT NULL,
    settled_at REAL,
    notified_at REAL,
    notification_id TEXT
)
"""


@dataclass(frozen=True)
class Recharge:
    """A recharge as the recharge system records it: the authoritative answer."""

    id: str
    account: str
    amount_cents: int
    status: str
    notification_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The shape of a notification payload and of `GET /recharges/{id}`."""
        return {
            "recharge_id": self.id,
            "account": self.account,
            "amount_cents": self.amount_cents,
            "status": self.status,
        }


def format_cents(amount_cents: int) -> str:
    """1050 -> '10.50'."""
    return f"{amount_cents // 100}.{amount_cents % 100:02d}"


class RechargeSystem:
    """An aiohttp service: `POST /recharges` to ask, `GET /recharges/{id}` to reconcile."""

    def __init__(
        self,
        db_path: Path,
        tidings: TidingsApi,
        narrator: Narrator,
        *,
        pay_delay_s: float = 0.3,
        fail_every: int = 5,
        outbox_every_s: float = 0.5,
    ) -> None:
        # Tiny local writes: blocking the loop for them is fine in a demo.
        self._db = sqlite3.connect(db_path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._tidings = tidings
        self._say = narrator.say
        self._pay_delay_s = pay_delay_s
        self._fail_every = fail_every
        self._outbox_every_s = outbox_every_s
        self._outbox_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None

    # lifecycle -------------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Listen on an already bound socket and start the outbox relay."""
        app = web.Application()
        app.router.add_post("/recharges", self._create)
        app.router.add_get("/recharges/{recharge_id}", self._lookup)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self._spawn(self._outbox_loop(), "recharge-outbox")

    async def stop(self) -> None:
        """Stop payments in progress, the relay and the listener; close the database."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        self._db.close()

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # HTTP ------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        account, amount_cents = body.get("account"), body.get("amount_cents")
        if not isinstance(account, str) or not isinstance(amount_cents, int) or amount_cents <= 0:
            raise web.HTTPUnprocessableEntity(text="give account (text) and amount_cents (> 0)")
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO recharges (account, amount_cents, status, requested_at) "
                "VALUES (?, ?, ?, ?)",
                (account, amount_cents, PENDING, time.time()),
            )
            recharge_id = f"rc-{cursor.lastrowid:04d}"
            self._db.execute(
                "UPDATE recharges SET id = ? WHERE seq = ?", (recharge_id, cursor.lastrowid)
            )
        # The customer now goes off to pay; the answer comes back later.
        self._spawn(self._pay(recharge_id), f"pay-{recharge_id}")
        recharge = Recharge(recharge_id, account, amount_cents, PENDING)
        return web.json_response(recharge.to_json(), status=201)

    async def _lookup(self, request: web.Request) -> web.Response:
        recharge = self.recharge(request.match_info["recharge_id"])
        if recharge is None:
            raise web.HTTPNotFound(text="no such recharge")
        return web.json_response(recharge.to_json())

    # payment and the outbox ------------------------------------------------------------

    async def _pay(self, recharge_id: str) -> None:
        await asyncio.sleep(self._pay_delay_s)
        seq = int(recharge_id.removeprefix("rc-"))
        status = FAILED if seq % self._fail_every == 0 else PAID
        # One transaction: the result, and (notified_at still empty) the duty to announce it.
        with self._db:
            self._db.execute(
                "UPDATE recharges SET status = ?, settled_at = ? WHERE id = ?",
                (status, time.time(), recharge_id),
            )
        await self._flush_outbox()

    async def _outbox_loop(self) -> None:
        while True:
            await asyncio.sleep(self._outbox_every_s)
            await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        """Hand every settled, not yet announced result to Tidings."""
        async with self._outbox_lock:
            rows = self._db.execute(
                "SELECT id, account, amount_cents, status FROM recharges "
                "WHERE status != ? AND notified_at IS NULL ORDER BY seq",
                (PENDING,),
            ).fetchall()
            for row in rows:
                recharge = Recharge(*row)
                try:
                    # The recharge id as idempotency key: a resend after a lost answer is
                    # recognised by Tidings, not delivered twice.
                    sent = await self._tidings.send(
                        TOPIC, recharge.to_json(), key=recharge.id, idempotency_key=recharge.id
                    )
                except TidingsError as exc:
                    self._say(
                        "recharge",
                        f"could not reach Tidings for {recharge.id} ({exc}); "
                        "the outbox will try again",
                    )
                    return
                with self._db:
                    self._db.execute(
                        "UPDATE recharges SET notified_at = ?, notification_id = ? WHERE id = ?",
                        (time.time(), sent["id"], recharge.id),
                    )
                result = "paid" if recharge.status == PAID else "payment FAILED"
                self._say(
                    "recharge",
                    f"{recharge.id}: {recharge.account} {format_cents(recharge.amount_cents)} "
                    f"{result}; recorded, and sent to Tidings as {sent['id']}",
                )

    # reading ---------------------------------------------------------------------------

    def recharge(self, recharge_id: str) -> Recharge | None:
        """One recharge as recorded here, or None."""
        row = self._db.execute(
            "SELECT id, account, amount_cents, status, notification_id FROM recharges WHERE id = ?",
            (recharge_id,),
        ).fetchone()
        return None if row is None else Recharge(*row)

    def recharges(self) -> list[Recharge]:
        """Every recharge, in the order they were asked for."""
        rows = self._db.execute(
            "SELECT id, account, amount_cents, status, notification_id FROM recharges ORDER BY seq"
        ).fetchall()
        return [Recharge(*row) for row in rows]

    def name_of(self, notification_id: str) -> str:
        """The recharge a notification carries, for the commentary."""
        row = self._db.execute(
            "SELECT id FROM recharges WHERE notification_id = ?", (notification_id,)
        ).fetchone()
        return notification_id if row is None else str(row[0])

    def all_announced(self) -> bool:
        """Whether every recharge is settled and handed to Tidings."""
        (left,) = self._db.execute(
            "SELECT COUNT(*) FROM recharges WHERE notified_at IS NULL"
        ).fetchone()
        return bool(left == 0)
