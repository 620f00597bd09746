"""TangleConsumer: the durable outbox of results -> ``submitResult(s)`` transactions (DESIGN.md §7 "Results").

For each batch of pending results: ask ``getJobCall`` first (completed = success, no transaction;
a call that does not exist is dropped), simulate the transaction (``eth_estimateGas``), split a
reverting batch and classify each revert (already done = success; permanent = logged and dropped),
then sign with the operator key and send. Nonces are managed locally so transactions pipeline;
receipts are collected as they come. Transport errors back off and retry. Nothing here can take the
service down: every failure ends in a log line and a retry or a drop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from eth_abi import decode, encode
from eth_account import Account

from ..crashpoints import crash_point
from .contracts import ALREADY_DONE, GET_JOB_CALL, PERMANENT, SUBMIT_RESULT, SUBMIT_RESULTS, selector
from .errors import RpcError, TangleError
from .keystore import OperatorKey
from .producer import Backoff
from .rpc import ContractRevert, JsonRpc
from .state import OutboxRow, TangleState

log = logging.getLogger(__name__)

SEL_SUBMIT_RESULT = bytes.fromhex(selector(SUBMIT_RESULT)[2:])
SEL_SUBMIT_RESULTS = bytes.fromhex(selector(SUBMIT_RESULTS)[2:])
SEL_GET_JOB_CALL = bytes.fromhex(selector(GET_JOB_CALL)[2:])
GAS_FALLBACK = 8_000_000
RECEIPT_TIMEOUT = 120.0


@dataclass(frozen=True)
class JobResult:
    service_id: int
    call_id: int
    output: bytes


@dataclass
class _InFlight:
    tx_hash: str
    service_id: int
    call_ids: list[int]
    sent_at: float
    nonce: int


def submit_result_data(service_id: int, call_id: int, output: bytes) -> bytes:
    return SEL_SUBMIT_RESULT + encode(["uint64", "uint64", "bytes"], [service_id, call_id, output])


def submit_results_data(service_id: int, call_ids: Sequence[int], outputs: Sequence[bytes]) -> bytes:
    return SEL_SUBMIT_RESULTS + encode(["uint64", "uint64[]", "bytes[]"], [service_id, list(call_ids), list(outputs)])


Callback = Callable[[int, str], None]


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
        on_submitted: Callback | None = None,
        on_dropped: Callback | None = None,
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
        self.on_submitted = on_submitted or (lambda call_id, tx: None)
        self.on_dropped = on_dropped or (lambda call_id, why: None)
        self._wake = asyncio.Event()
        self._in_flight: dict[str, _InFlight] = {}
        self._nonce: int | None = None
        self._chain_id: int | None = None
        self._gas_price: int | None = None
        self.sent_tx = 0

    def wake(self) -> None:
        """Tell the sender new results are in the outbox."""
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not self._in_flight and not self.state.pending(1)

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
        """Drop rows already on-chain or impossible; return those still worth sending."""
        keep: list[OutboxRow] = []
        for row in rows:
            exists, completed = await self._job_call(service_id, row.call_id)
            if completed:
                log.info("result for call %d already on-chain; nothing to send", row.call_id,
                         extra={"call_id": row.call_id})
                self.state.mark(service_id, [row.call_id], "done", reason="already completed")
                continue
            if not exists:
                self._drop(service_id, row.call_id, "JobCallNotFound")
                continue
            keep.append(row)
        return keep

    def _drop(self, service_id: int, call_id: int, why: str) -> None:
        log.error("dropping result for call %d: %s (permanent)", call_id, why, extra={"call_id": call_id})
        self.state.mark(service_id, [call_id], "dropped", reason=why)
        self.on_dropped(call_id, why)

    def _operator(self) -> OperatorKey:
        if self.key is None:
            raise TangleError("an operator key is required to send results")
        return self.key

    async def _estimate(self, data: bytes) -> int:
        return await self.rpc.estimate_gas(self.contract, data, self._operator().address)

    async def _simulate(self, service_id: int, rows: list[OutboxRow]) -> tuple[list[OutboxRow], bytes, int]:
        """Find the largest sendable set: try the batch, else each alone; classify reverts."""
        if len(rows) > 1:
            data = submit_results_data(service_id, [r.call_id for r in rows], [r.output for r in rows])
            try:
                return rows, data, await self._estimate(data)
            except ContractRevert as exc:
                log.info("batch of %d would revert (%s); checking each call", len(rows), exc.name or exc)
        ok: list[OutboxRow] = []
        gas_one = 0
        for row in rows:
            data = submit_result_data(service_id, row.call_id, row.output)
            try:
                gas_one = await self._estimate(data)
                ok.append(row)
            except ContractRevert as exc:
                if exc.name in ALREADY_DONE:
                    self.state.mark(service_id, [row.call_id], "done", reason=exc.name)
                elif exc.name in PERMANENT:
                    self._drop(service_id, row.call_id, exc.name or str(exc))
                else:
                    log.warning("result for call %d would revert (%s); will retry", row.call_id, exc)
        if not ok:
            return [], b"", 0
        if len(ok) == 1:
            return ok, submit_result_data(service_id, ok[0].call_id, ok[0].output), gas_one
        data = submit_results_data(service_id, [r.call_id for r in ok], [r.output for r in ok])
        try:
            return ok, data, await self._estimate(data)
        except ContractRevert:
            first = ok[:1]
            return first, submit_result_data(service_id, first[0].call_id, first[0].output), gas_one

    async def _send(self, service_id: int, rows: list[OutboxRow], data: bytes, gas: int) -> None:
        key = self._operator()
        if self._chain_id is None:
            self._chain_id = await self.rpc.chain_id()
        if self._nonce is None:
            self._nonce = await self.rpc.nonce(key.address)
        if self._gas_price is None:
            self._gas_price = await self.rpc.gas_price()
        tx = {
            "to": self.contract,
            "data": data,
            "gas": int(gas * 1.3) + 10_000 if gas else GAS_FALLBACK,
            "gasPrice": self._gas_price,
            "nonce": self._nonce,
            "chainId": self._chain_id,
            "value": 0,
        }
        signed = Account.sign_transaction(tx, key.secret.reveal())
        try:
            tx_hash = await self.rpc.send_raw(bytes(signed.raw_transaction))
        except RpcError as exc:
            # nonce drift, underpriced, ... : resync the local view and retry on the next round
            self._nonce = None
            self._gas_price = None
            raise exc
        crash_point("consumer.after_send")
        ids = [r.call_id for r in rows]
        self.state.mark(service_id, ids, "sent", tx_hash=tx_hash)
        self._in_flight[tx_hash] = _InFlight(tx_hash, service_id, ids, time.monotonic(), self._nonce)
        self._nonce += 1
        self.sent_tx += 1
        log.info("sent %d result(s) in %s", len(ids), tx_hash, extra={"call_ids": ",".join(map(str, ids))})

    async def _collect(self) -> None:
        for tx_hash, fl in list(self._in_flight.items()):
            receipt = await self.rpc.receipt(tx_hash)
            if receipt is None:
                if time.monotonic() - fl.sent_at > RECEIPT_TIMEOUT:
                    log.warning("no receipt for %s after %.0fs; re-checking its calls", tx_hash, RECEIPT_TIMEOUT)
                    del self._in_flight[tx_hash]
                    self._nonce = None
                    self.state.mark(fl.service_id, fl.call_ids, "pending")
                continue
            del self._in_flight[tx_hash]
            if int(str(receipt.get("status", "0x0")), 16) == 1:
                crash_point("consumer.after_receipt")
                self.state.mark(fl.service_id, fl.call_ids, "done", tx_hash=tx_hash)
                for call_id in fl.call_ids:
                    self.on_submitted(call_id, tx_hash)
            else:
                log.warning("result transaction %s failed on-chain; re-checking its calls", tx_hash)
                self.state.mark(fl.service_id, fl.call_ids, "pending")

    async def _round(self) -> bool:
        """One send/collect round. Returns True if there may be more work right away."""
        if self._in_flight:
            await self._collect()
        flying = {c for fl in self._in_flight.values() for c in fl.call_ids}
        rows = [r for r in self.state.pending(self.batch_max * 4) if r.call_id not in flying]
        if self.dry_run:
            for row in rows:
                log.info("dry run: result for call %d not sent", row.call_id, extra={"call_id": row.call_id})
                self.state.mark(row.service_id, [row.call_id], "done", reason="dry run")
            return False
        if not rows or len(self._in_flight) >= self.max_in_flight:
            return bool(self._in_flight)
        if self._in_flight and len(rows) < self.batch_max:
            # a transaction is on its way: let results gather into one full batch instead of
            # paying for many small ones (a full batch still pipelines immediately)
            return True
        by_service: dict[int, list[OutboxRow]] = {}
        for row in rows:
            by_service.setdefault(row.service_id, []).append(row)
        for service_id, group in by_service.items():
            group = group[: self.batch_max]
            # fast path: one simulation of the whole batch; it reverts if any call is completed,
            # unknown or not ours, and only then is each call looked at (getJobCall) and classified
            data = (
                submit_results_data(service_id, [r.call_id for r in group], [r.output for r in group])
                if len(group) > 1
                else submit_result_data(service_id, group[0].call_id, group[0].output)
            )
            try:
                gas = await self._estimate(data)
            except ContractRevert as exc:
                log.info("batch of %d would revert (%s); checking each call", len(group), exc.name or exc)
                group = await self._classify(service_id, group)
                if not group:
                    continue
                chosen, data, gas = await self._simulate(service_id, group)
                if chosen:
                    await self._send(service_id, chosen, data, gas)
                continue
            await self._send(service_id, group, data, gas)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set and nothing is in flight (or the drain deadline passes)."""
        backoff = Backoff()
        drain_deadline: float | None = None
        while True:
            if stop.is_set():
                if drain_deadline is None:
                    drain_deadline = time.monotonic() + 10
                if (not self._in_flight and not self.state.pending(1)) or time.monotonic() > drain_deadline:
                    return
            try:
                busy = await self._round()
                backoff.reset()
            except (RpcError, ContractRevert) as exc:
                delay = backoff.next()
                log.warning("result sender: %s; retrying in %.1fs", exc, delay)
                await _wait(stop if drain_deadline is None else None, delay)
                continue
            except TangleError as exc:
                delay = backoff.next()
                log.error("result sender: %s; retrying in %.1fs", exc, delay)
                await _wait(None, delay)
                continue
            if busy:
                await _wait(self._wake, 0.05)
            else:
                await _wait(self._wake, 0.5)
            self._wake.clear()


async def _wait(event: asyncio.Event | None, timeout: float) -> None:
    if event is None:
        await asyncio.sleep(timeout)
        return
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass


