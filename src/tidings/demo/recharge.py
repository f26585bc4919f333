"""`tidings demo recharge`: the worked example of DESIGN.md, played for real on 127.0.0.1.

Three systems run in this one asyncio program, each with its own port and database:
Tidings itself (the API served by uvicorn, the dispatcher, an SQLite store), the recharge
system (the notifier) and the account system (the receiver). The account system asks for
recharges, customers pay, the recharge system notifies through Tidings, and the account
system misbehaves on purpose: down at first, then answering 500 or too slowly to some
notifications, and never accepting one recharge's at all. Retries and reconciliation
must still bring both businesses to the same view of every recharge.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import uvicorn

from tidings.api.app import create_app
from tidings.auth import Scope
from tidings.client import Client
from tidings.demo.narrator import Narrator, tidings_voice, watch_breaker
from tidings.demo.notifier import TOPIC, RechargeSystem
from tidings.demo.receiver import AccountSystem, Faults
from tidings.demo.report import DemoReport, build_report, render
from tidings.demo.tidings_api import TidingsApi
from tidings.errors import InvalidInput
from tidings.service import Service
from tidings.settings import Settings

HOST = "127.0.0.1"
_ACCOUNTS = ("alice", "bob", "carol")
_AMOUNTS_CENTS = (100_00, 25_00, 60_00, 10_00, 40_00, 75_00, 5_00, 30_00)
# The account system's misbehaviour, recharge by recharge; the cycle repeats after eight.
_FAULT_CYCLE = (
    Faults(),
    Faults(fail_first=2),
    Faults(never_accept=True),
    Faults(slow_first=1),
    Faults(),
    Faults(fail_first=1),
    Faults(slow_first=1),
    Faults(),
)


@dataclass(frozen=True)
class DemoTiming:
    """The story's clock, compressed from hours to seconds."""

    ladder: tuple[str, ...] = ("1s", "2s", "2s", "3s")
    window: str = "15s"
    timeout: str = "1s"  # the endpoint's request timeout
    down_s: float = 3.0  # how long the notify URL is not listening, from the first request
    slow_s: float = 1.5  # how late a slow answer comes: past the timeout
    pay_delay_s: float = 0.3  # from asking for a recharge to its payment result
    request_gap_s: float = 0.1
    reconcile_after_s: float = 11.0  # silence after which the account system asks
    reconcile_every_s: float = 1.0
    deadline_s: float = 30.0  # the whole demo, whatever happens
    poll_interval_s: float = 0.1  # Tidings' dispatcher
    # The endpoint's circuit breaker, on the same compressed clock: at its real 30s pause
    # one outage would hold every notification past its 15s window.
    breaker_cooldown_s: float = 0.5
    breaker_max_cooldown_s: float = 1.0


def plan_faults(count: int) -> list[Faults]:
    """The faults for `count` recharges: the cycle, with one recharge never accepted."""
    plan = [_FAULT_CYCLE[index % len(_FAULT_CYCLE)] for index in range(count)]
    return [
        replace(faults, never_accept=False) if index >= len(_FAULT_CYCLE) else faults
        for index, faults in enumerate(plan)
    ]


async def run_demo(
    recharges: int = 8,
    base_port: int = 18080,
    *,
    data_dir: Path | None = None,
    timing: DemoTiming | None = None,
) -> bool:
    """Play the demo, print the table; True when every recharge ends consistent."""
    report = await play(recharges, base_port, data_dir=data_dir, timing=timing)
    return report.consistent


async def play(
    recharges: int,
    base_port: int,
    *,
    data_dir: Path | None = None,
    timing: DemoTiming | None = None,
    narrator: Narrator | None = None,
) -> DemoReport:
    """Play the demo on `base_port` and the two ports after it; return how it ended."""
    if recharges < 1:
        raise InvalidInput("recharges: play at least one", field="recharges")
    timing = timing or DemoTiming()
    narrator = narrator or Narrator()
    with contextlib.ExitStack() as files:
        if data_dir is None:
            data_dir = Path(files.enter_context(tempfile.TemporaryDirectory(prefix="tidings-")))
        data_dir.mkdir(parents=True, exist_ok=True)
        sockets = [files.enter_context(_bind(base_port + offset)) for offset in range(3)]
        async with contextlib.AsyncExitStack() as running:
            report = await _play(recharges, data_dir, sockets, timing, narrator, running)
    for line in render(report):
        narrator.line(line)
    return report


@dataclass(frozen=True)
class _Cast:
    """The running systems of the demo."""

    api: TidingsApi  # the operator's view of Tidings
    recharges: RechargeSystem
    accounts: AccountSystem


async def _play(
    count: int,
    data_dir: Path,
    sockets: list[socket.socket],
    timing: DemoTiming,
    narrator: Narrator,
    running: contextlib.AsyncExitStack,
) -> DemoReport:
    _introduce(narrator, timing, [_url(sock) for sock in sockets], data_dir)
    cast = await _start_cast(data_dir, sockets, timing, narrator, running)
    api, recharges, accounts = cast.api, cast.recharges, cast.accounts

    with tidings_voice(narrator, recharges.name_of):
        down_until_s = narrator.elapsed_s() + timing.down_s
        narrator.say("account", f"notify URL down (a deploy in progress) for {timing.down_s:g}s")
        await _ask_for_recharges(accounts, count, timing, narrator)
        await asyncio.sleep(max(0.0, down_until_s - narrator.elapsed_s()))
        await accounts.come_up(sockets[2])
        narrator.say("account", "notify URL up again; reconciliation running")

        if not await _wait_until_final(cast, count, timing, narrator):
            narrator.say("demo", f"{timing.deadline_s:g}s are up; showing where things stand")
        truth = recharges.recharges()
        notifications = {r.id: await api.get(r.notification_id) for r in truth if r.notification_id}
    narrator.line()
    return build_report(
        truth,
        notifications,
        await accounts.recharges(),
        {r.id: accounts.faults(r.id) for r in truth},
        await accounts.balances(),
    )


async def _start_cast(
    data_dir: Path,
    sockets: list[socket.socket],
    timing: DemoTiming,
    narrator: Narrator,
    running: contextlib.AsyncExitStack,
) -> _Cast:
    """Start Tidings and the recharge system, register the account system (not yet up)."""
    tidings_url, recharge_url, account_url = (_url(sock) for sock in sockets)
    service = await _serve_tidings(data_dir, sockets[0], timing, running)
    # Least privilege, as an operator would hand out with `tidings keys create`: the
    # recharge system may only send (and read) recharge results.
    admin_key = await service.create_key(Scope.ADMIN, name="demo operator")
    notifier_key = await service.create_key(Scope.NOTIFIER, name="recharge system", topics=(TOPIC,))
    api = TidingsApi(tidings_url, admin_key.plain)
    running.push_async_callback(api.close)
    # The library's synchronous client, for the outbox relay; closed after the system stops.
    notifier_client = running.enter_context(Client(tidings_url, notifier_key.plain, timeout_s=5.0))

    endpoint = await api.add_endpoint(
        f"{account_url}/notify",
        [TOPIC],
        retry_schedule=list(timing.ladder),
        window=timing.window,
        timeout=timing.timeout,
        description="account system: recharge results",
    )
    narrator.say("operator", f"registered the account system's notify URL as {endpoint['id']}")
    watcher = asyncio.create_task(
        watch_breaker(service.store, endpoint["id"], narrator), name="demo-breaker-watch"
    )
    running.push_async_callback(_cancel, watcher)

    # The account system reconciles with a key that reads only its own endpoint's deliveries.
    receiver_key = await service.create_key(
        Scope.RECEIVER, name="account system", endpoint_ids=(endpoint["id"],)
    )
    receiver_client = running.enter_context(Client(tidings_url, receiver_key.plain, timeout_s=5.0))

    recharges = RechargeSystem(
        data_dir / "recharge.db", notifier_client, narrator, pay_delay_s=timing.pay_delay_s
    )
    await recharges.start(sockets[1])
    running.push_async_callback(recharges.stop)
    accounts = AccountSystem(
        data_dir / "account.db",
        secret=endpoint["secret"],
        recharge_url=recharge_url,
        tidings=receiver_client,
        narrator=narrator,
        slow_s=timing.slow_s,
        reconcile_after_s=timing.reconcile_after_s,
        reconcile_every_s=timing.reconcile_every_s,
    )
    running.push_async_callback(accounts.stop)
    await accounts.open()
    return _Cast(api, recharges, accounts)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _introduce(narrator: Narrator, timing: DemoTiming, urls: list[str], data_dir: Path) -> None:
    ladder = ", ".join(timing.ladder)
    for line in (
        "Tidings recharge demo: the worked example of DESIGN.md, live on 127.0.0.1",
        f"  Tidings          {urls[0]}  delivers notifications (store in {data_dir})",
        f"  recharge system  {urls[1]}  the notifier: takes payment, owns the result",
        f"  account system   {urls[2]}  the receiver: credits balances, misbehaves",
        f"Hours compressed to seconds: retries after {ladder} within a {timing.window} "
        f"window, {timing.timeout} timeout;",
        "the account system reconciles a recharge it has not heard of after "
        f"{timing.reconcile_after_s:g}s.",
        "",
    ):
        narrator.line(line)


async def _serve_tidings(
    data_dir: Path, sock: socket.socket, timing: DemoTiming, running: contextlib.AsyncExitStack
) -> Service:
    """Start the service and its API on `sock`; stopping is left on `running`."""
    settings = Settings(
        # Pinned, whatever the environment says: the demo needs no server at all.
        database_url=f"sqlite+aiosqlite:///{data_dir / 'tidings.db'}",
        broker_url=None,
        auth_required=True,
        allow_private_networks=True,
        poll_interval_s=timing.poll_interval_s,
        breaker_cooldown_s=timing.breaker_cooldown_s,
        breaker_max_cooldown_s=timing.breaker_max_cooldown_s,
        shutdown_grace_s=1.0,
    )
    service = Service(settings)
    await service.start()
    running.push_async_callback(service.stop)
    config = uvicorn.Config(
        create_app(service, manage_lifecycle=False),
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="tidings-api")

    async def stop() -> None:
        server.should_exit = True
        await task

    running.push_async_callback(stop)
    while not server.started:
        if task.done():
            await task  # raises what stopped it
            raise RuntimeError("the Tidings API stopped while starting")
        await asyncio.sleep(0.02)
    return service


async def _ask_for_recharges(
    accounts: AccountSystem, count: int, timing: DemoTiming, narrator: Narrator
) -> None:
    narrator.say("account", f"asks the recharge system for {count} recharges; customers pay")
    for index, faults in enumerate(plan_faults(count)):
        account = _ACCOUNTS[index % len(_ACCOUNTS)]
        amount_cents = _AMOUNTS_CENTS[index % len(_AMOUNTS_CENTS)]
        await accounts.request_recharge(account, amount_cents, faults)
        await asyncio.sleep(timing.request_gap_s)


async def _wait_until_final(
    cast: _Cast, count: int, timing: DemoTiming, narrator: Narrator
) -> bool:
    """Wait until every result is announced, settled, and final at Tidings."""
    while narrator.elapsed_s() < timing.deadline_s:
        if cast.recharges.all_announced() and await cast.accounts.all_settled():
            sent = await cast.api.list_topic(TOPIC)
            if len(sent) == count and all(n["status"] != "pending" for n in sent):
                return True
        await asyncio.sleep(0.25)
    return False


@contextlib.contextmanager
def _bind(port: int) -> Iterator[socket.socket]:
    """A socket bound to HOST:`port`, not yet listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"port {port} on {HOST} is taken ({exc.strerror}); pick other ports "
            "with --port (the demo uses that port and the two after it)",
        ) from exc
    try:
        yield sock
    finally:
        sock.close()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"
