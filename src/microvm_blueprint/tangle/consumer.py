"""TangleConsumer: the durable outbox of results -> ``submitResult(s)`` transactions (DESIGN.md §7 "Results").

Results wait in the outbox (``state.py``; the runner queues a job's result in the same transaction
that records the job as handled). For each batch of pending results the sender simulates the
transaction (``eth_estimateGas``); only when that reverts does it look at each call (``getJobCall``:
completed = success with no transaction, unknown = dropped) and classify each call's own revert
(already done = success; permanent = logged and dropped; anything else held back with a growing
delay and dropped after :data:`MAX_UNKNOWN_REVERTS`). It then signs with the operator key and sends.
Nonces are managed locally so transactions pipeline; receipts are collected as they come; a result
whose transaction was sent before a restart is watched again rather than sent twice. Gas is the
estimate x 1.3; the fixed :data:`GAS_FALLBACK` is used only when the node refuses to estimate (not a
revert) for a call known to be open. Transport errors back off and retry. Nothing here can take the
service down: every failure ends in a log line and a retry or a drop.

The consumer is the one owner of the operator's nonces: any other transaction signed with the
operator key (the QoS heartbeat, ``heartbeat.py``) is queued through :meth:`TangleConsumer.send_call`
and sent between result rounds, after the results of that round, with the next nonce. Such a call is
simulated first (a revert fails the caller's wait and sends nothing), and a transaction of its own
in flight never holds results back (they do not wait for it to gather into a batch).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import decode, encode

from ..crashpoints import crash_point
from .aio import wait_first
from .calls import GuardedObserver, JobObserver
from .contracts import ALREADY_DONE, GET_JOB_CALL, PERMANENT, SUBMIT_RESULT, SUBMIT_RESULTS, selector_bytes
from .errors import RpcError, RpcUnavailable, TangleError
from .keystore import OperatorKey
from .producer import Backoff
from .rpc import ContractRevert, JsonRpc
from .signing import LegacyTx, sign_legacy
from .state import OutboxRow, TangleState
from .transact import GAS_MULTIPLIER  # gas limit over the node's estimate, as every sender's

log = logging.getLogger(__name__)

SEL_SUBMIT_RESULT = selector_bytes(SUBMIT_RESULT)
SEL_SUBMIT_RESULTS = selector_bytes(SUBMIT_RESULTS)
SEL_GET_JOB_CALL = selector_bytes(GET_JOB_CALL)
#: Gas limit used only when the node refuses ``eth_estimateGas`` without a revert (one result per tx).
GAS_FALLBACK = 1_000_000
#: A transaction without a receipt after this long is given up and its calls looked at again.
RECEIPT_TIMEOUT = 120.0
#: Mined-but-failed transactions for one result before it is dropped.
MAX_SEND_ATTEMPTS = 5
#: Simulations of one result reverting with an error we cannot classify before it is dropped.
MAX_UNKNOWN_REVERTS = 12
HOLD_CAP = 60.0
#: Receipts of transactions in flight are looked for at most this often, first this soon after a send...
COLLECT_INTERVAL = 0.02
#: ...then, while none comes, ever less often (the wait doubles) up to this. A new block announced over
#: ``WS_RPC_URL`` is looked at at once: on a chain with 12 s blocks, polling every 20 ms cost ~600
#: requests a transaction (a hosted RPC's rate limit) where now it costs a dozen.
COLLECT_CAP = 1.0
#: How long the first result waiting for a transaction waits for company (fewer, fuller transactions:
#: on a busy chain each transaction costs far more than one more result in it). A full batch goes at once.
LINGER = 0.05


@dataclass
class _Call:
    """A transaction other than a result (``send_call``), waiting for its turn; ``done`` gets its receipt."""

    to: str
    data: bytes
    label: str
    done: asyncio.Future[dict[str, Any]]


@dataclass
class _InFlight:
    tx_hash: str
    service_id: int
    call_ids: list[int]
    sent_at: float
    nonce: int  # -1: sent by an earlier run, watched again
    extra: _Call | None = None  # a send_call transaction, not results


def submit_result_data(service_id: int, call_id: int, output: bytes) -> bytes:
    return SEL_SUBMIT_RESULT + encode(["uint64", "uint64", "bytes"], [service_id, call_id, output])


def submit_results_data(service_id: int, call_ids: Sequence[int], outputs: Sequence[bytes]) -> bytes:
    return SEL_SUBMIT_RESULTS + encode(["uint64", "uint64[]", "bytes[]"], [service_id, list(call_ids), list(outputs)])


def _batch_data(service_id: int, rows: Sequence[OutboxRow]) -> bytes:
    if len(rows) == 1:
        return submit_result_data(service_id, rows[0].call_id, rows[0].output)
    return submit_results_data(service_id, [r.call_id for r in rows], [r.output for r in rows])


class TangleConsumer:
    def __init__(
        self,
        rpc: JsonRpc,
        state: TangleState,
        key: OperatorKey | None,
        *,
        contract: str,
        dry_run: bool = False,
        batch_max: int = 100,
        max_in_flight: int = 8,
        observer: JobObserver | None = None,
        drain_timeout: float = 10.0,
        backoff_cap: float = 10.0,
        linger: float = LINGER,
        blocks: Callable[[], int] | None = None,
    ) -> None:
        if key is None and not dry_run:
            raise TangleError("an operator key is required unless --dry-run")
        self.rpc = rpc
        self.state = state
        self.key = key
        self.contract = contract
        self.dry_run = dry_run
        self.batch_max = max(1, batch_max)
        self.max_in_flight = max(1, max_in_flight)
        self.observer = GuardedObserver(observer)  # hears submitted / dropped
        self.drain_timeout = drain_timeout
        self.backoff_cap = backoff_cap
        self._wake = asyncio.Event()
        self._in_flight: dict[str, _InFlight] = {}
        self._holds: dict[tuple[int, int], tuple[float, int]] = {}  # (service, call) -> (not before, reverts)
        self._collected_at = float("-inf")
        self._collect_every = COLLECT_INTERVAL
        self._blocks = blocks  # blocks announced so far (NewHeads.heads), when the operator has a WebSocket
        self._blocks_at_collect: int | None = None
        self.receipt_requests = 0
        self.linger = max(0.0, linger)
        self._gathering_since: float | None = None
        self._nonce: int | None = None
        self._chain_id: int | None = None
        self._gas_price: int | None = None
        self._calls: deque[_Call] = deque()
        #: result transactions sent, mined and successful, mined and failed (the metrics read them)
        self.tx_sent = 0
        self.tx_mined = 0
        self.tx_failed = 0
        #: rounds that failed (RPC outage, database hiccup) and were retried with backoff
        self.round_errors = 0

    async def send_call(self, to: str, data: bytes, *, label: str = "call",
                        timeout: float = RECEIPT_TIMEOUT) -> dict[str, Any]:
        """Send one transaction to ``to`` with the operator key and this consumer's nonces, between
        result rounds; return its receipt (mined, any status). Raises :class:`ContractRevert` when its
        simulation reverts (nothing is sent), :class:`TangleError` when it cannot be sent (no key, dry
        run, the sender stopped, an RPC failure) or no receipt comes within ``timeout`` seconds."""
        if self.dry_run or self.key is None:
            raise TangleError(f"{label}: not sent (dry run / no operator key)")
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls.append(_Call(to, bytes(data), label, done))
        self.wake()
        try:
            return await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise TangleError(f"{label}: no receipt within {timeout:.0f}s") from None

    async def _serve_calls(self) -> None:
        """Send the queued ``send_call`` transactions (after this round's results)."""
        while self._calls:
            call = self._calls.popleft()
            if call.done.done():  # its caller gave up
                continue
            try:
                gas = await self.rpc.estimate_gas(call.to, call.data, self._operator().address)
            except TangleError as exc:
                call.done.set_exception(exc)  # a revert, or the chain is away: nothing is sent
                if isinstance(exc, RpcUnavailable):
                    raise
                continue
            try:
                tx_hash, nonce = await self._sign_and_send(call.to, call.data, _gas_limit(gas))
            except TangleError as exc:
                if not call.done.done():
                    call.done.set_exception(exc)
                raise
            self._in_flight[tx_hash] = _InFlight(tx_hash, -1, [], time.monotonic(), nonce, extra=call)
            log.info("sent %s in %s", call.label, tx_hash)

    def _fail_calls(self, why: str) -> None:
        """The sender is stopping: every queued or unconfirmed ``send_call`` gets ``why``."""
        waiting = list(self._calls)
        waiting += [fl.extra for fl in self._in_flight.values() if fl.extra is not None]
        self._calls.clear()
        for call in waiting:
            if not call.done.done():
                call.done.set_exception(TangleError(f"{call.label}: {why}"))

    def _results_in_flight(self) -> int:
        return sum(1 for fl in self._in_flight.values() if fl.extra is None)

    def chain_reorged(self) -> None:
        """The producer saw a reorg (it reopened the results mined in the replaced blocks): our
        transactions there are gone or back in the pool, so the nonce and gas price are read from
        the chain again before the next send, and the sender wakes for the reopened results."""
        self._nonce = None
        self._gas_price = None
        self.wake()

    def wake(self) -> None:
        """Tell the sender new results are in the outbox."""
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not self._in_flight and not self.state.pending(1)

    def _drop(self, service_id: int, call_id: int, why: str) -> None:
        log.error("dropping result for call %d: %s (permanent)", call_id, why, extra={"call_id": call_id})
        self.state.mark(service_id, [call_id], "dropped", reason=why)
        self._holds.pop((service_id, call_id), None)
        self.observer.on_dropped(call_id, why)

    def _already_done(self, service_id: int, call_id: int, why: str) -> None:
        log.info("result for call %d already on-chain (%s); nothing to send", call_id, why, extra={"call_id": call_id})
        self.state.mark(service_id, [call_id], "done", reason=why)
        self._holds.pop((service_id, call_id), None)

    def _hold(self, service_id: int, call_id: int, why: str) -> None:
        """An unclassified revert: try again later (growing delay), drop after MAX_UNKNOWN_REVERTS."""
        _, reverts = self._holds.get((service_id, call_id), (0.0, 0))
        reverts += 1
        if reverts >= MAX_UNKNOWN_REVERTS:
            self._drop(service_id, call_id, f"{why} (after {reverts} attempts)")
            return
        delay = min(HOLD_CAP, 0.5 * 2**reverts)
        self._holds[(service_id, call_id)] = (time.monotonic() + delay, reverts)
        log.warning("result for call %d would revert (%s); retrying in %.1fs", call_id, why, delay,
                    extra={"call_id": call_id})

    def _held(self, row: OutboxRow, now: float) -> bool:
        hold = self._holds.get((row.service_id, row.call_id))
        return hold is not None and hold[0] > now

    # ---- chain helpers ----

    async def _job_call(self, service_id: int, call_id: int) -> tuple[bool, bool]:
        """(exists, completed) from getJobCall (the real contract returns zeros for unknown calls)."""
        raw = await self.rpc.eth_call(
            self.contract, SEL_GET_JOB_CALL + encode(["uint64", "uint64"], [service_id, call_id])
        )
        try:
            ((_idx, caller, created_at, _count, completed, _rfq, _pay),) = decode(
                ["(uint8,address,uint64,uint32,bool,bool,uint256)"], raw
            )
        except Exception as exc:
            raise RpcError(f"getJobCall answered malformed data: {exc}") from exc
        exists = int(caller, 16) != 0 or created_at != 0
        return exists, bool(completed)

    async def _classify(self, service_id: int, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Settle rows already on-chain or impossible; return those still worth sending."""
        keep: list[OutboxRow] = []
        for row in rows:
            exists, completed = await self._job_call(service_id, row.call_id)
            if completed:
                self._already_done(service_id, row.call_id, "already completed")
            elif not exists:
                self._drop(service_id, row.call_id, "JobCallNotFound")
            else:
                keep.append(row)
        return keep

    def _operator(self) -> OperatorKey:
        if self.key is None:
            raise TangleError("an operator key is required to send results")
        return self.key

    async def _estimate(self, data: bytes) -> int:
        return await self.rpc.estimate_gas(self.contract, data, self._operator().address)

    async def _simulate(self, service_id: int, rows: list[OutboxRow]) -> tuple[list[OutboxRow], bytes, int]:
        """The largest sendable set of open calls, its calldata and gas limit: each call alone first
        (classifying its revert), then the survivors together. ``([], b"", 0)``: nothing to send now."""
        ok: list[OutboxRow] = []
        refused: list[OutboxRow] = []
        gas_one = 0
        for row in rows:
            data = submit_result_data(service_id, row.call_id, row.output)
            try:
                gas_one = await self._estimate(data)
                ok.append(row)
            except ContractRevert as exc:
                if exc.name in ALREADY_DONE:
                    self._already_done(service_id, row.call_id, exc.name or "")
                elif exc.name in PERMANENT:
                    self._drop(service_id, row.call_id, exc.name or str(exc))
                else:
                    self._hold(service_id, row.call_id, exc.name or str(exc))
            except RpcUnavailable:
                raise
            except RpcError as exc:  # the node refuses to estimate, without a revert: the call is open
                log.warning("gas estimate refused for call %d (%s)", row.call_id, exc, extra={"call_id": row.call_id})
                refused.append(row)
        if not ok:
            if refused:
                row = refused[0]
                return [row], submit_result_data(service_id, row.call_id, row.output), GAS_FALLBACK
            return [], b"", 0
        if len(ok) == 1:
            return ok, _batch_data(service_id, ok), _gas_limit(gas_one)
        data = _batch_data(service_id, ok)
        try:
            return ok, data, _gas_limit(await self._estimate(data))
        except ContractRevert:
            first = ok[:1]
            return first, _batch_data(service_id, first), _gas_limit(gas_one)

    async def _sign_and_send(self, to: str, data: bytes, gas_limit: int) -> tuple[str, int]:
        """Sign with the operator key and the next nonce (the one place nonces are taken) and send;
        returns ``(tx hash, nonce)``."""
        key = self._operator()
        try:
            if self._chain_id is None:
                self._chain_id = await self.rpc.chain_id()
            if self._nonce is None:
                self._nonce = await self.rpc.nonce(key.address)
            if self._gas_price is None:
                self._gas_price = await self.rpc.gas_price()
            nonce = self._nonce
            tx = LegacyTx(nonce=nonce, gas_price=self._gas_price, gas=gas_limit, to=to, data=data,
                          chain_id=self._chain_id)
            tx_hash = await self.rpc.send_raw(sign_legacy(tx, key.secret.reveal()))
        except BaseException:
            # nonce drift, underpriced, a dropped connection ...: resync the local view next time
            self._nonce = None
            self._gas_price = None
            raise
        self._nonce = nonce + 1
        return tx_hash, nonce

    async def _send(self, service_id: int, rows: list[OutboxRow], data: bytes, gas_limit: int) -> None:
        tx_hash, nonce = await self._sign_and_send(self.contract, data, gas_limit)
        self.tx_sent += 1
        crash_point("consumer.after_send")
        ids = [r.call_id for r in rows]
        self.state.mark(service_id, ids, "sent", tx_hash=tx_hash)
        self._in_flight[tx_hash] = _InFlight(tx_hash, service_id, ids, time.monotonic(), nonce)
        self._collect_every = COLLECT_INTERVAL  # a new transaction: look for it soon
        log.info("sent %d result(s) in %s (gas limit %d)", len(ids), tx_hash, gas_limit,
                 extra={"call_ids": ",".join(map(str, ids))})

    def _adopt(self, rows: Sequence[OutboxRow]) -> int:
        """Results sent by an earlier run whose receipt was never seen: watch those transactions again."""
        adopted = 0
        for row in rows:
            if row.status != "sent" or not row.tx_hash:
                continue
            fl = self._in_flight.get(row.tx_hash)
            if fl is None:
                log.info("watching result transaction %s from an earlier run", row.tx_hash,
                         extra={"call_id": row.call_id})
                self._in_flight[row.tx_hash] = _InFlight(row.tx_hash, row.service_id, [row.call_id],
                                                         time.monotonic(), -1)
                adopted += 1
            elif row.call_id not in fl.call_ids and fl.nonce == -1:
                fl.call_ids.append(row.call_id)
                adopted += 1
        return adopted

    async def _collect(self, *, force: bool = False) -> None:
        """Look for the receipts of every transaction in flight, in one request: at most once per
        :data:`COLLECT_INTERVAL` (rounds come with every finished job; the receipts do not), and while
        none comes, only when a new block was announced or after a wait that doubles up to
        :data:`COLLECT_CAP`."""
        now = time.monotonic()
        if not self._in_flight:
            return
        blocks = self._blocks() if self._blocks is not None else None
        since = now - self._collected_at
        due = since >= self._collect_every or (blocks is not None and blocks != self._blocks_at_collect)
        if not force and (since < COLLECT_INTERVAL or not due):
            return
        self._collected_at = now
        self._blocks_at_collect = blocks
        flights = list(self._in_flight.items())
        self.receipt_requests += 1
        answers = await self.rpc.receipts([tx_hash for tx_hash, _ in flights])
        found = False
        for (tx_hash, fl), receipt in zip(flights, answers, strict=True):
            if isinstance(receipt, RpcError):
                log.warning("receipt of %s: %s", tx_hash, receipt)
                continue
            if receipt is None:
                if time.monotonic() - fl.sent_at > RECEIPT_TIMEOUT:
                    log.warning("no receipt for %s after %.0fs; re-checking its calls", tx_hash, RECEIPT_TIMEOUT)
                    del self._in_flight[tx_hash]
                    self._nonce = None
                    if fl.extra is not None:
                        if not fl.extra.done.done():
                            fl.extra.done.set_exception(TangleError(f"{fl.extra.label}: no receipt for {tx_hash}"))
                    else:
                        self.state.mark(fl.service_id, fl.call_ids, "pending")
                continue
            found = True
            del self._in_flight[tx_hash]
            if fl.extra is not None:
                if not fl.extra.done.done():
                    fl.extra.done.set_result(receipt)
                continue
            self.tx_mined += 1
            if _receipt_ok(receipt):
                crash_point("consumer.after_receipt")
                self.state.mark(fl.service_id, fl.call_ids, "done", tx_hash=tx_hash, block=_block_of(receipt))
                for call_id in fl.call_ids:
                    self.observer.on_submitted(call_id, tx_hash)
            else:
                self.tx_failed += 1
                log.warning("result transaction %s failed on-chain; re-checking its calls", tx_hash)
                self.state.mark(fl.service_id, fl.call_ids, "pending")
        self._collect_every = COLLECT_INTERVAL if found else min(COLLECT_CAP, self._collect_every * 2)

    async def _round(self) -> bool:
        """One send/collect round. Returns True if there may be more work right away."""
        if self._in_flight:
            await self._collect()
        rows = self.state.pending(self.batch_max * 4)
        if not self.dry_run:
            if self._adopt(rows):
                await self._collect(force=True)
                rows = self.state.pending(self.batch_max * 4)
        flying = {(fl.service_id, c) for fl in self._in_flight.values() for c in fl.call_ids}
        now = time.monotonic()
        rows = [r for r in rows if (r.service_id, r.call_id) not in flying and not self._held(r, now)]
        if self.dry_run:
            for row in rows:
                log.info("dry run: result for call %d not sent (0x%s)", row.call_id, row.output.hex()[:64],
                         extra={"call_id": row.call_id})
                self.state.mark(row.service_id, [row.call_id], "done", reason="dry run")
            return False
        for row in [r for r in rows if r.attempts >= MAX_SEND_ATTEMPTS]:
            self._drop(row.service_id, row.call_id, f"{row.attempts} result transactions failed on-chain")
            rows.remove(row)
        if not rows:
            self._gathering_since = None
            return bool(self._in_flight)
        results_flying = self._results_in_flight()  # a send_call transaction never holds results back
        if results_flying >= self.max_in_flight:
            return True
        if results_flying and len(rows) < self.batch_max:
            # a transaction is on its way: let results gather into one full batch instead of
            # paying for many small ones (a full batch still pipelines immediately)
            return True
        if len(rows) < self.batch_max and self.linger:
            if self._gathering_since is None:
                self._gathering_since = now
            if now - self._gathering_since < self.linger:
                return True
        self._gathering_since = None
        by_service: dict[int, list[OutboxRow]] = {}
        for row in rows:
            by_service.setdefault(row.service_id, []).append(row)
        for service_id, group in by_service.items():
            group = group[: self.batch_max]
            # fast path: one simulation of the whole batch; it reverts if any call is completed,
            # unknown or not ours, and only then is each call looked at (getJobCall) and classified
            data = _batch_data(service_id, group)
            try:
                gas = await self._estimate(data)
            except RpcUnavailable:
                raise
            except (ContractRevert, RpcError) as exc:
                name = exc.name if isinstance(exc, ContractRevert) else None
                log.info("%d result(s) would not go through as one transaction (%s); checking each call",
                         len(group), name or exc)
                group = await self._classify(service_id, group)
                if not group:
                    continue
                chosen, data, gas_limit = await self._simulate(service_id, group)
                if chosen:
                    await self._send(service_id, chosen, data, gas_limit)
                continue
            await self._send(service_id, group, data, _gas_limit(gas))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set, then flush best-effort: until nothing is pending or in flight, or
        ``drain_timeout`` passes (what is left stays in the outbox for the next start)."""
        try:
            await self._run(stop)
        finally:
            self._fail_calls("the result sender stopped")

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(cap=self.backoff_cap)
        drain_deadline: float | None = None
        while True:
            if stop.is_set():
                if drain_deadline is None:
                    drain_deadline = time.monotonic() + self.drain_timeout
                if self.idle or time.monotonic() > drain_deadline:
                    if not self.idle:
                        log.warning("shutting down with results still in the outbox; they are sent at the next start")
                    return
            try:
                busy = await self._round()
                if self._calls and not self.dry_run:
                    await self._serve_calls()
                    busy = True
                backoff.reset()
            except TangleError as exc:  # RpcError, ContractRevert, a database hiccup
                self.round_errors += 1
                delay = backoff.next()
                log.warning("result sender: %s; retrying in %.1fs", exc, delay)
                await _wait(stop if drain_deadline is None else None, _clip(delay, drain_deadline))
                continue
            except Exception:
                self.round_errors += 1
                delay = backoff.next()
                log.exception("result sender: unexpected error; retrying in %.1fs", delay)
                await _wait(stop if drain_deadline is None else None, _clip(delay, drain_deadline))
                continue
            if stop.is_set():
                await _wait(self._wake, 0.05)
            else:
                await wait_first(self._wake.wait(), stop.wait(), timeout=0.05 if busy else 0.5)
            self._wake.clear()


def _block_of(receipt: dict[str, object]) -> int | None:
    """The receipt's block number; ``None`` when the node gave none we can read."""
    try:
        return int(str(receipt.get("blockNumber")), 16)
    except ValueError:
        return None


def _receipt_ok(receipt: dict[str, object]) -> bool:
    try:
        return int(str(receipt.get("status", "0x0")), 16) == 1
    except ValueError:
        return False


def _gas_limit(estimate: int) -> int:
    return math.ceil(estimate * GAS_MULTIPLIER)


def _clip(delay: float, deadline: float | None) -> float:
    if deadline is None:
        return delay
    return max(0.0, min(delay, deadline - time.monotonic()))


async def _wait(event: asyncio.Event | None, timeout: float) -> None:
    if event is None:
        await asyncio.sleep(timeout)
        return
    await wait_first(event.wait(), timeout=timeout)
