"""The recharge system, the notifier of the story: it takes payment and tells Tidings.

It owns the truth about every recharge. A result and the notification announcing it are
written in one transaction of its own database, with `tidings.outbox.record`; the library
relay then hands every committed outbox row to Tidings. So a result is never settled
without being announced sooner or later, and never announced without being settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from tidings.client import Client
from tidings.demo.narrator import Narrator
from tidings.errors import TidingsError
from tidings.outbox import OUTBOX, OutboxRow, create_all, record, relay_once

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
    settled_at REAL
)
"""
# The outbox row of a recharge carries its id as business key; once relayed, the row also
# holds the id Tidings gave the notification.
_WITH_NOTIFICATION = (
    "SELECT r.id, r.account, r.amount_cents, r.status, o.notification_id "
    f"FROM recharges r LEFT JOIN {OUTBOX.name} o ON o.key = r.id"
)


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
        tidings: Client,
        narrator: Narrator,
        *,
        pay_delay_s: float = 0.3,
        fail_every: int = 5,
        relay_every_s: float = 0.5,
    ) -> None:
        # Tiny local writes: blocking the loop for them is fine in a demo. The relay reads
        # and marks rows from a worker thread, hence a connection usable from any thread.
        self._db = sa.create_engine(
            f"sqlite:///{db_path}", connect_args={"check_same_thread": False}
        )
        with self._db.begin() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            conn.exec_driver_sql(_SCHEMA)
            create_all(conn)
        self._tidings = tidings
        self._say = narrator.say
        self._pay_delay_s = pay_delay_s
        self._fail_every = fail_every
        self._relay_every_s = relay_every_s
        self._relay_wanted = asyncio.Event()
        self._stopping = False
        self._relay: asyncio.Task[None] | None = None
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
        self._relay = asyncio.create_task(self._relay_loop(), name="recharge-outbox-relay")

    async def stop(self) -> None:
        """Stop payments in progress, the relay and the listener; close the database."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._relay is not None:
            # Not cancelled: a relay pass runs in a thread that cancelling would not stop,
            # and it must not outlive the database it marks rows in.
            self._stopping = True
            self._relay_wanted.set()
            await self._relay
        if self._runner is not None:
            await self._runner.cleanup()
        self._db.dispose()

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
        with self._db.begin() as conn:
            cursor = conn.execute(
                sa.text(
                    "INSERT INTO recharges (account, amount_cents, status, requested_at) "
                    "VALUES (:account, :amount_cents, :status, :now)"
                ),
                {
                    "account": account,
                    "amount_cents": amount_cents,
                    "status": PENDING,
                    "now": time.time(),
                },
            )
            seq = cursor.lastrowid
            recharge_id = f"rc-{seq:04d}"
            conn.execute(
                sa.text("UPDATE recharges SET id = :id WHERE seq = :seq"),
                {"id": recharge_id, "seq": seq},
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
        # One transaction: the result, and the outbox row that will announce it.
        with self._db.begin() as conn:
            conn.execute(
                sa.text("UPDATE recharges SET status = :status, settled_at = :now WHERE id = :id"),
                {"status": status, "now": time.time(), "id": recharge_id},
            )
            recharge = self._read(conn, recharge_id)
            if recharge is None:  # it was created before its payment started
                raise RuntimeError(f"{recharge_id} vanished while being paid")
            record(conn, TOPIC, recharge.to_json(), key=recharge_id)
        self._relay_wanted.set()

    async def _relay_loop(self) -> None:
        """Run the library relay after every payment, and every `relay_every_s` anyway."""
        while not self._stopping:
            await self._relay_pass()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relay_wanted.wait(), self._relay_every_s)
            self._relay_wanted.clear()

    async def _relay_pass(self) -> None:
        sent: list[tuple[OutboxRow, str]] = []

        def after_send(row: OutboxRow, notification_id: str) -> None:
            sent.append((row, notification_id))

        try:
            # The client is synchronous and Tidings answers on this very event loop: the
            # relay runs in a worker thread so the loop stays free to serve it.
            await asyncio.to_thread(relay_once, self._db, self._tidings, after_send=after_send)
        except TidingsError as exc:
            self._say("recharge", f"could not reach Tidings ({exc}); the relay will try again")
        finally:
            for row, notification_id in sent:
                self._announce(row, notification_id)

    def _announce(self, row: OutboxRow, notification_id: str) -> None:
        recharge = self.recharge(row.key or "")
        if recharge is None:
            return
        result = "paid" if recharge.status == PAID else "payment FAILED"
        self._say(
            "recharge",
            f"{recharge.id}: {recharge.account} {format_cents(recharge.amount_cents)} "
            f"{result}; recorded with its outbox row, relayed to Tidings as {notification_id}",
        )

    # reading ---------------------------------------------------------------------------

    @staticmethod
    def _read(conn: sa.Connection, recharge_id: str) -> Recharge | None:
        row = conn.execute(
            sa.text(f"{_WITH_NOTIFICATION} WHERE r.id = :id"), {"id": recharge_id}
        ).first()
        return None if row is None else Recharge(*row)

    def recharge(self, recharge_id: str) -> Recharge | None:
        """One recharge as recorded here, or None."""
        with self._db.connect() as conn:
            return self._read(conn, recharge_id)

    def recharges(self) -> list[Recharge]:
        """Every recharge, in the order they were asked for."""
        with self._db.connect() as conn:
            rows = conn.execute(sa.text(f"{_WITH_NOTIFICATION} ORDER BY r.seq")).all()
        return [Recharge(*row) for row in rows]

    def name_of(self, notification_id: str) -> str:
        """The recharge a notification carries, for the commentary."""
        with self._db.connect() as conn:
            key = conn.execute(
                sa.select(OUTBOX.c.key).where(OUTBOX.c.notification_id == notification_id)
            ).scalar()
        return notification_id if key is None else str(key)

    def all_announced(self) -> bool:
        """Whether every recharge is settled and its outbox row relayed to Tidings."""
        with self._db.connect() as conn:
            unsettled = conn.execute(
                sa.text("SELECT COUNT(*) FROM recharges WHERE status = :pending"),
                {"pending": PENDING},
            ).scalar_one()
            unrelayed = conn.execute(
                sa.select(sa.func.count()).where(OUTBOX.c.relayed_at.is_(None))
            ).scalar_one()
        return unsettled == 0 and unrelayed == 0
