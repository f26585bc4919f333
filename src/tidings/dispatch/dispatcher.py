"""The dispatcher: claims due deliveries, attempts them, records what happened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tidings.brokers.base import Broker
from tidings.clock import Clock, SystemClock
from tidings.dispatch.endpoints import EndpointCache
from tidings.dispatch.http import HttpResult, HttpSender
from tidings.dispatch.outcome import decide_http
from tidings.health import HealthPolicy
from tidings.models import (
    Attempt,
    Claim,
    EndpointKind,
    ErrorClass,
    Outcome,
    OutcomeKind,
)
from tidings.operational import announce
from tidings.stores.base import Store

if TYPE_CHECKING:
    from tidings.dispatch.queue import QueueDispatch

log = logging.getLogger(__name__)

_WRITE_BATCH = 500
# Slow start: an endpoint first gets this many claims at a time, doubled by each answer
# quicker than SLOW_S up to the full cap, halved by each slower one. An endpoint that
# hangs so holds few of the dispatcher's slots, not a full share, while it times out.
START_CAP = 4
SLOW_S = 1.0
_STORE_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class DispatcherConfig:
    """How hard a dispatcher works; see Settings for what each means."""

    lease_s: float = 60.0
    claim_batch: int = 200
    max_in_flight: int = 256
    endpoint_concurrency: int = 16
    poll_interval_s: float = 0.25
    max_crashes: int = 3
    excerpt_bytes: int = 1024
    shutdown_grace_s: float = 10.0
    health: HealthPolicy = field(default_factory=HealthPolicy)
    fault_injection: str | None = None  # crash tests only: see Dispatcher._maybe_crash
    jitter: float = 0.1


def _owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


class Dispatcher:
    """Runs deliveries until told to stop; any number may share one store."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        sender: HttpSender,
        config: DispatcherConfig,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.sender = sender
        self.config = config
        self.clock = clock or SystemClock()
        self.owner = _owner_name()
        self.endpoints = EndpointCache(store, self.clock, jitter=config.jitter)
        self._held: dict[str, Claim] = {}
        self._held_per_endpoint: defaultdict[str, int] = defaultdict(int)
        self._endpoint_slots: dict[str, _Gate] = {}
        self._outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self._unrecorded = 0  # outcomes queued or being written: held, but not in flight
        self._room = asyncio.Event()
        self._suspect: Claim | None = None  # being attempted alone; see _start_attempt
        self._side_tasks: set[asyncio.Task[None]] = set()
        # Claims one endpoint may hold: its attempts in flight plus a few waiting, but never
        # so many that a few hanging endpoints fill every slot of the dispatcher.
        concurrency = config.endpoint_concurrency
        self._hold_cap = min(2 * concurrency, max(concurrency, config.max_in_flight // 4))
        self._caps: dict[str, int] = {}  # the slow-start cap of each endpoint seen
        self._freed = asyncio.Event()
        self._attempts: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.queues = _queue_dispatch(self)

    # lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Work until `stop()`; then finish or hand back what is in flight."""
        log.info("dispatcher %s started", self.owner, extra={"action": "dispatcher_start"})
        background = [
            asyncio.create_task(self._write_loop(), name="tidings-outcome-writer"),
            asyncio.create_task(self._heartbeat_loop(), name="tidings-lease-heartbeat"),
        ]
        try:
            if self.queues is not None:
                await self.queues.start()
            await self._claim_loop()
        finally:
            await self._drain()
            await self._recorded(self.config.shutdown_grace_s)
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._flush_all()
            await self._settle()
            if self.queues is not None:
                await self.queues.close()
            log.info("dispatcher %s stopped", self.owner, extra={"action": "dispatcher_stop"})

    def stop(self) -> None:
        """Ask the dispatcher to stop taking work."""
        self._stop.set()
        self._room.set()

    # claiming --------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        announced: list[str] | None = None
        while not self._stop.is_set():
            # A slot is free once its attempt ends, before the outcome is recorded: the
            # record and the next claim then overlap instead of following one another.
            # Claims awaiting their record are bounded too, should the store fall behind.
            attempting = len(self._held) - self._unrecorded
            room = min(
                self.config.max_in_flight - attempting,
                2 * self.config.max_in_flight - len(self._held),
            )
            if self._suspect is not None:
                self._room.clear()
                await self._room.wait()
                continue
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                claims = await self.store.claim_due(
                    now=self.clock.now(),
                    limit=min(room, self.config.claim_batch),
                    lease_s=self.config.lease_s,
                    owner=self.owner,
                    exclude_endpoints=self._busy_endpoints(),
                    delivery_ids=announced,
                    max_crashes=self.config.max_crashes,
                )
            except Exception:
                log.warning(
                    "could not claim due deliveries; retrying",
                    exc_info=True,
                    extra={"action": "claim_failed"},
                )
                await self._pause(self.config.poll_interval_s * 4)
                announced = None
                continue
            for claim in claims:
                self._start_attempt(claim)
            if announced is None and len(claims) >= min(room, self.config.claim_batch):
                continue  # more may be due right now
            announced = await self._wait_due()

    def _busy_endpoints(self) -> list[str]:
        return [ep for ep, held in self._held_per_endpoint.items() if held >= self._cap(ep)]

    def _cap(self, endpoint_id: str) -> int:
        return self._caps.get(endpoint_id, min(START_CAP, self._hold_cap))

    def _pace(self, endpoint_id: str, result: HttpResult) -> None:
        """Open an endpoint's cap after a quick answer, close it after a slow one."""
        cap = self._cap(endpoint_id)
        if result.error_class is None and result.duration_ms < SLOW_S * 1000:
            self._caps[endpoint_id] = min(self._hold_cap, cap * 2)
        else:
            self._caps[endpoint_id] = max(START_CAP, cap // 2)

    async def _wait_due(self) -> list[str] | None:
        """The broker's news, cut short by stop(): a broker may wait seconds for news."""
        news = asyncio.create_task(
            self.broker.wait_due(self.config.poll_interval_s), name="tidings-wait-due"
        )
        stopping = asyncio.create_task(self._stop.wait(), name="tidings-wait-stop")
        freed = asyncio.create_task(self._freed.wait(), name="tidings-wait-freed")
        try:
            await asyncio.wait({news, stopping, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._freed.clear()
            for task in (news, stopping, freed):
                task.cancel()
            await asyncio.gather(news, stopping, freed, return_exceptions=True)
        if news.cancelled():
            return None  # stopping
        failure = news.exception()
        if failure is not None:
            log.warning(
                "could not wait for the broker (%s); looking in the store",
                failure,
                extra={"action": "broker_wait_failed"},
            )
            await self._pause(self.config.poll_interval_s)
            return None
        return news.result()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _start_attempt(self, claim: Claim) -> None:
        self._held[claim.delivery_id] = claim
        self._held_per_endpoint[claim.endpoint_id] += 1
        if not claim.suspect:
            self._launch(claim)
        elif self._suspect is None:
            # Attempted alone once the others in flight are recorded; until then the claim
            # loop takes nothing new, so a poison notification kills no innocent one.
            self._suspect = claim
            self._keep(asyncio.create_task(self._isolate(claim), name="tidings-suspect"))
        else:
            self._hand_back(claim)  # one suspect at a time

    def _launch(self, claim: Claim) -> None:
        self._maybe_crash("after_claim", claim)
        task = asyncio.create_task(
            self._attempt(claim), name=f"tidings-attempt-{claim.delivery_id}"
        )
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    def _hand_back(self, claim: Claim) -> None:
        async def release() -> None:
            try:
                await self.store.release([claim], self.clock.now())
            finally:
                self._let_go(claim)

        self._keep(asyncio.create_task(release(), name=f"tidings-hand-back-{claim.delivery_id}"))

    def _keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to a side task until it ends (the loop keeps only weak ones)."""
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _isolate(self, claim: Claim) -> None:
        """Attempt a suspect alone, then let the claim loop go on."""
        try:
            await self._quiet(but=claim.delivery_id)
            self._launch(claim)
            await self._quiet()  # its outcome is recorded before anything else starts
        finally:
            self._suspect = None
            self._room.set()

    async def _quiet(self, but: str | None = None) -> None:
        """Wait until no claim (but `but`) is held: all attempted and recorded."""
        while self._held.keys() - {but}:
            # _let_go sets _room once an outcome is recorded or a claim handed back.
            self._room.clear()
            await self._room.wait()

    def _maybe_crash(self, point: str, claim: Claim) -> None:
        """Fault injection for the crash tests (TIDINGS_FAULT_INJECTION); never in use."""
        fault = self.config.fault_injection
        if fault and (fault == point or fault == f"{point}:{claim.topic}"):
            log.error("fault injection: dying at %s", point, extra={"action": "fault"})
            os.kill(os.getpid(), signal.SIGKILL)

    def _let_go(self, claim: Claim) -> None:
        self._held.pop(claim.delivery_id, None)
        left = self._held_per_endpoint[claim.endpoint_id] - 1
        if left <= 0:
            self._held_per_endpoint.pop(claim.endpoint_id, None)
        else:
            self._held_per_endpoint[claim.endpoint_id] = left
        if left == self._cap(claim.endpoint_id) - 1:
            # The endpoint was left out of the last claim for being busy; it has room
            # again, and it may have work waiting: claim now rather than at the next poll.
            self._freed.set()
        self._room.set()

    # attempting ------------------------------------------------------------------------

    def _slot(self, endpoint_id: str) -> _Gate:
        slot = self._endpoint_slots.get(endpoint_id)
        if slot is None:
            slot = self._endpoint_slots[endpoint_id] = _Gate(
                lambda: min(self.config.endpoint_concurrency, self._cap(endpoint_id))
            )
        return slot

    async def _attempt(self, claim: Claim) -> None:
        try:
            await self._attempt_once(claim)
        except asyncio.CancelledError:
            # Shutdown cut the attempt short: record it, and make the delivery due again.
            now = self.clock.now()
            attempt = interrupted_attempt(claim, now, "the dispatcher stopped mid-attempt")
            self._finish(Outcome(claim, attempt, OutcomeKind.RETRY, now))
            raise
        except Exception:
            log.exception(
                "attempt of %s failed inside the dispatcher",
                claim.delivery_id,
                extra={"action": "attempt_crashed", "delivery_id": claim.delivery_id},
            )
            now = self.clock.now()
            attempt = interrupted_attempt(claim, now, "internal error in the dispatcher")
            retry_at = now + self.config.lease_s
            self._finish(Outcome(claim, attempt, OutcomeKind.RETRY, retry_at))

    async def _attempt_once(self, claim: Claim) -> None:
        endpoint = await self.endpoints.get(claim.endpoint_id)
        if endpoint is not None and endpoint.kind is EndpointKind.QUEUE and self.queues is not None:
            failed = await self.queues.hand_over(claim, endpoint)
            if failed is None:
                self._let_go(claim)  # the subscriber group holds it now
            else:
                self._finish(failed)
            return
        if endpoint is None or endpoint.kind is not EndpointKind.HTTP:
            # Removed meanwhile (its deliveries are cancelled) or not ours to send.
            await self.store.release([claim], self.clock.now() + self.config.lease_s)
            self._let_go(claim)
            return
        async with self._slot(endpoint.id):
            if self._stop.is_set():
                # Stopping: an attempt not yet begun goes back for the next dispatcher.
                await self.store.release([claim], self.clock.now())
                self._let_go(claim)
                return
            result = await self.sender.post(
                url=endpoint.url,
                msg_id=claim.notification_id,
                body=claim.body,
                content_type=claim.content_type,
                secrets=endpoint.active_secrets(self.clock.now()),
                timeout_s=endpoint.timeout_s,
                attempt_number=claim.attempt_number,
            )
        self._pace(endpoint.id, result)
        outcome = decide_http(
            claim, endpoint, result, now=self.clock.now(), excerpt_bytes=self.config.excerpt_bytes
        )
        self._log_outcome(outcome, result)
        self._finish(outcome)

    def _finish(self, outcome: Outcome) -> None:
        """Queue an attempt's outcome for recording; its slot takes the next attempt now."""
        self._outcomes.put_nowait(outcome)
        self._unrecorded += 1
        self._room.set()

    def _log_outcome(self, outcome: Outcome, result: HttpResult) -> None:
        if outcome.kind is OutcomeKind.DELIVERED and not log.isEnabledFor(logging.DEBUG):
            return  # the common case: nothing to say, and nothing to build
        fields = {
            "notification_id": outcome.claim.notification_id,
            "delivery_id": outcome.claim.delivery_id,
            "endpoint": outcome.claim.endpoint_id,
            "attempt": outcome.claim.attempt_number,
            "status_code": result.status_code,
            "error_class": result.error_class.value if result.error_class else None,
        }
        answer = result.status_code or (result.error_class.value if result.error_class else "?")
        if outcome.kind is OutcomeKind.DELIVERED:
            log.debug(
                "delivered %s to %s",
                outcome.claim.notification_id,
                outcome.claim.endpoint_id,
                extra={"action": "delivered", **fields},
            )
        elif outcome.kind is OutcomeKind.RETRY:
            log.warning(
                "attempt %d of %s to %s failed (%s); retrying in %.1fs",
                outcome.claim.attempt_number,
                outcome.claim.notification_id,
                outcome.claim.endpoint_id,
                answer,
                (outcome.next_attempt_at or 0) - self.clock.now(),
                extra={"action": "retry", **fields},
            )
        else:
            log.error(
                "gave up on %s to %s after %d attempts (last: %s)",
                outcome.claim.notification_id,
                outcome.claim.endpoint_id,
                outcome.claim.attempt_number,
                answer,
                extra={"action": "exhausted", **fields},
            )

    # recording -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._outcomes.get()]
            while len(batch) < _WRITE_BATCH and not self._outcomes.empty():
                batch.append(self._outcomes.get_nowait())
            await self._write(batch)

    async def _write(self, batch: list[Outcome]) -> None:
        """Record a batch, retrying while the store is away; the leases keep it ours."""
        for outcome in batch:
            self._maybe_crash("before_record", outcome.claim)
        failures = 0
        while True:
            try:
                # Shielded: a shutdown must not cut a status write in half.
                disabled = await asyncio.shield(
                    self.store.record_outcomes(batch, self.clock.now(), self.config.health)
                )
                await self._announce(batch, disabled)
                break
            except Exception:
                failures += 1
                if self._stop.is_set() and failures > len(_STORE_RETRY_S):
                    log.exception(
                        "could not record %d outcomes; their leases will run out and they "
                        "will be attempted again",
                        len(batch),
                        extra={"action": "record_failed"},
                    )
                    break
                log.warning(
                    "could not record %d outcomes (try %d); retrying",
                    len(batch),
                    failures,
                    exc_info=True,
                    extra={"action": "record_retry"},
                )
                await asyncio.sleep(_STORE_RETRY_S[min(failures, len(_STORE_RETRY_S)) - 1])
        self._unrecorded -= len(batch)
        for outcome in batch:
            self._let_go(outcome.claim)
        await self._announce_retries(batch)

    async def _announce(self, batch: list[Outcome], disabled: list[str]) -> None:
        if not disabled and all(o.kind is not OutcomeKind.EXHAUSTED for o in batch):
            return
        try:
            await announce(self.store, self.broker, batch, disabled, self.clock.now())
        except Exception:
            # Limitation: an operational notification lost here is not sent again; the
            # exhausted deliveries themselves stay recorded and listable.
            log.exception(
                "could not send operational notifications", extra={"action": "operational_failed"}
            )

    async def _announce_retries(self, batch: list[Outcome]) -> None:
        for outcome in batch:
            if outcome.kind is not OutcomeKind.RETRY or outcome.next_attempt_at is None:
                continue
            try:
                await self.broker.publish_retry(outcome.claim.delivery_id, outcome.next_attempt_at)
            except Exception:
                # The retry is in the store; the poll of the store picks it up when due.
                log.warning(
                    "could not announce the retry of %s; the store poll will find it",
                    outcome.claim.delivery_id,
                    exc_info=True,
                    extra={"action": "announce_failed", "delivery_id": outcome.claim.delivery_id},
                )

    async def _flush_all(self) -> None:
        batch: list[Outcome] = []
        while not self._outcomes.empty():
            batch.append(self._outcomes.get_nowait())
        if batch:
            await self._write(batch)

    async def _heartbeat_loop(self) -> None:
        interval_s = max(self.config.lease_s / 3, 0.05)
        while True:
            await asyncio.sleep(interval_s)
            if not self._held:
                continue
            try:
                await self.store.renew_leases(
                    owner=self.owner, now=self.clock.now(), lease_s=self.config.lease_s
                )
            except Exception:
                log.warning(
                    "could not renew leases", exc_info=True, extra={"action": "renew_failed"}
                )

    # shutdown --------------------------------------------------------------------------

    async def _recorded(self, timeout_s: float) -> None:
        """Wait until every outcome queued so far is recorded (or `timeout_s` passes)."""

        async def all_recorded() -> None:
            while self._unrecorded:
                self._room.clear()  # _let_go sets it once a batch is recorded
                await self._room.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_recorded(), timeout_s)

    async def _settle(self) -> None:
        """Let side tasks and endpoint reads end, so none holds a store connection past stop."""
        waiting: list[asyncio.Future[Any]] = [*self._side_tasks, *self.endpoints.loading()]
        if waiting:
            await asyncio.wait(waiting, timeout=self.config.shutdown_grace_s)

    async def _drain(self) -> None:
        """Give in-flight attempts the grace period, then cut them short (they record it)."""
        if not self._attempts:
            return
        _, pending = await asyncio.wait(set(self._attempts), timeout=self.config.shutdown_grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Gate:
    """At most `limit()` holders at once; the limit may change between entries.

    Leaving never waits (a cancelled attempt must not keep its place).
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._busy = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        while self._busy >= self._limit():
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn in self._waiting:
                    self._waiting.remove(turn)
                self._wake()  # a turn given to us goes to the next in line
                raise
        self._busy += 1

    async def __aexit__(self, *_: object) -> None:
        self._busy -= 1
        self._wake()

    def _wake(self) -> None:
        room = self._limit() - self._busy
        while room > 0 and self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                room -= 1


def _queue_dispatch(dispatcher: Dispatcher) -> QueueDispatch | None:
    """The queue endpoints' side of a dispatcher: only on RabbitMQ, which carries them."""
    try:
        from tidings.brokers.rabbitmq import RabbitBroker
        from tidings.dispatch.queue import QueueDispatch
    except ImportError:
        return None  # no aio-pika, so no RabbitMQ
    broker = dispatcher.broker
    if not isinstance(broker, RabbitBroker):
        return None
    return QueueDispatch(
        broker.url,
        prefix=broker.prefix,
        store=dispatcher.store,
        broker=broker,
        endpoints=dispatcher.endpoints,
        clock=dispatcher.clock,
        health=dispatcher.config.health,
        shutdown_grace_s=dispatcher.config.shutdown_grace_s,
    )


def interrupted_attempt(claim: Claim, now: float, detail: str) -> Attempt:
    """An attempt that was cut short by the dispatcher itself."""
    return Attempt(
        delivery_id=claim.delivery_id,
        number=claim.attempt_number,
        started_at=now,
        duration_ms=0.0,
        succeeded=False,
        error_class=ErrorClass.INTERRUPTED,
        error_detail=detail,
    )
