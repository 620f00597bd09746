"""TangleProducer: ``JobSubmitted`` / ``JobSubmittedFromQuote`` logs -> :class:`JobCall` (DESIGN.md §3, §7).

Polls ``eth_getLogs`` on the Tangle address for our service only. Start: the persisted cursor;
else ``--from-block``; else the block where the service was activated; else the head minus a
small look-back. Reads wide windows (``MAX_GETLOGS_RANGE``) while behind, narrow ones once caught
up. Each window's calls and the cursor move are one SQLite transaction (see ``state.py``), so no
call is missed or handed out twice across restarts. A changed block hash rewinds (reorg). RPC
errors are retried with capped exponential backoff and jitter; an undecodable log is skipped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from eth_abi import decode
from eth_utils import to_checksum_address

from ..crashpoints import crash_point
from .contracts import TOPIC_JOB_SUBMITTED, TOPIC_JOB_SUBMITTED_FROM_QUOTE, TOPIC_SERVICE_ACTIVATED
from .errors import RpcError, TangleError
from .rpc import JsonRpc
from .state import Cursor, InboxRow, TangleState

log = logging.getLogger(__name__)

REORG_REWIND = 64
FRESH_LOOKBACK = 9


@dataclass(frozen=True)
class JobCall:
    service_id: int
    call_id: int
    job_index: int
    caller: str
    inputs: bytes
    block_number: int = 0
    block_hash: str = ""
    log_index: int = 0
    tx_hash: str = ""
    from_quote: bool = False

    @classmethod
    def from_row(cls, row: InboxRow) -> JobCall:
        return cls(**row.__dict__)

    def to_row(self) -> InboxRow:
        return InboxRow(**self.__dict__)


def _word(topic: str) -> int:
    return int(topic, 16)


def decode_job_log(entry: dict[str, Any]) -> JobCall:
    """Decode one log of either JobSubmitted layout or JobSubmittedFromQuote. Raises TangleError."""
    try:
        topics = [str(t) for t in entry["topics"]]
        data = bytes.fromhex(str(entry["data"])[2:])
        t0 = topics[0].lower()
        service_id, call_id = _word(topics[1]), _word(topics[2])
        from_quote = False
        if t0 == TOPIC_JOB_SUBMITTED and len(topics) == 3:
            job_index, caller, inputs = decode(["uint8", "address", "bytes"], data)
        elif t0 == TOPIC_JOB_SUBMITTED and len(topics) == 4:
            job_index = _word(topics[3])
            caller, inputs = decode(["address", "bytes"], data)
        elif t0 == TOPIC_JOB_SUBMITTED_FROM_QUOTE and len(topics) == 3:
            job_index, caller, _ops, _price, inputs = decode(
                ["uint8", "address", "address[]", "uint256", "bytes"], data
            )
            from_quote = True
        else:
            raise TangleError(f"unexpected log layout: topic0 {t0[:10]}.. with {len(topics)} topics")
        if not 0 <= job_index < 256 or service_id >= 2**64 or call_id >= 2**64:
            raise TangleError("log fields out of range")
        return JobCall(
            service_id=service_id,
            call_id=call_id,
            job_index=int(job_index),
            caller=to_checksum_address(caller),
            inputs=bytes(inputs),
            block_number=int(str(entry["blockNumber"]), 16),
            block_hash=str(entry["blockHash"]),
            log_index=int(str(entry["logIndex"]), 16),
            tx_hash=str(entry.get("transactionHash", "")),
            from_quote=from_quote,
        )
    except TangleError:
        raise
    except Exception as exc:
        raise TangleError(f"undecodable job log: {type(exc).__name__}: {str(exc)[:120]}") from exc


class _Stopped(Exception):
    """Internal: ``stop`` was set while waiting to retry."""


class Backoff:
    def __init__(self, base: float = 0.25, cap: float = 10.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures, 10))
        return float(delay * (0.5 + random.random() / 2))


class TangleProducer:
    """Feeds new job calls to ``deliver`` (the runner's bounded queue put) in chain order."""

    def __init__(
        self,
        rpc: JsonRpc,
        state: TangleState,
        *,
        contract: str,
        service_id: int,
        from_block: int | None = None,
        max_range: int = 1000,
        poll_interval: float = 1.0,
        confirmations: int = 0,
    ) -> None:
        self.rpc = rpc
        self.state = state
        self.contract = contract
        self.service_id = service_id
        self.from_block = from_block
        self.max_range = max(1, max_range)
        self.poll_interval = poll_interval
        self.confirmations = confirmations
        self.key = f"jobs:{contract.lower()}:{service_id}"
        self.caught_up = asyncio.Event()
        self.head_seen = -1

    async def _retry(self, what: str, fn: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> Any:
        backoff = Backoff()
        while True:
            try:
                return await fn()
            except RpcError as exc:
                delay = backoff.next()
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    continue
                raise _Stopped from None

    async def _start_block(self, head: int, stop: asyncio.Event) -> Cursor:
        saved = self.state.cursor(self.key)
        if saved is not None:
            if saved.last_hash and saved.next_block > 0:
                block = await self._retry("eth_getBlockByNumber", lambda: self.rpc.get_block(saved.next_block - 1), stop)
                if block is None or block.get("hash") != saved.last_hash:
                    rewind = max(0, saved.next_block - REORG_REWIND)
                    log.warning("block %d changed since the last run (reorg): rewinding to %d",
                                saved.next_block - 1, rewind)
                    return Cursor(rewind, None)
            log.info("resuming from persisted cursor at block %d", saved.next_block)
            return saved
        if self.from_block is not None:
            log.info("first start: scanning from block %d (--from-block)", self.from_block)
            return Cursor(self.from_block, None)
        activated = await self._find_activation(head, stop)
        if activated is not None:
            log.info("first start: scanning from block %d where service %d was activated", activated, self.service_id)
            return Cursor(activated, None)
        start = max(0, head - FRESH_LOOKBACK)
        log.info("first start: no activation log found for service %d; scanning from block %d",
                 self.service_id, start)
        return Cursor(start, None)

    async def _find_activation(self, head: int, stop: asyncio.Event) -> int | None:
        topics = [TOPIC_SERVICE_ACTIVATED, "0x" + self.service_id.to_bytes(32, "big").hex()]
        step = max(self.max_range, 10_000)
        hi = head
        while hi >= 0:
            lo = max(0, hi - step + 1)
            logs = await self._retry(
                "eth_getLogs(ServiceActivated)",
                functools.partial(self.rpc.get_logs, address=self.contract, topics=topics, from_block=lo, to_block=hi),
                stop,
            )
            if logs:
                return min(int(str(e["blockNumber"]), 16) for e in logs)
            hi = lo - 1
        return None

    async def run(self, deliver: Callable[[JobCall], Awaitable[None]], stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set, delivering calls in (block, log index) order."""
        try:
            await self._run(deliver, stop)
        except _Stopped:
            return

    async def _run(self, deliver: Callable[[JobCall], Awaitable[None]], stop: asyncio.Event) -> None:
        for row in self.state.unfinished():
            await deliver(JobCall.from_row(row))
        head = await self._retry("eth_blockNumber", self.rpc.block_number, stop)
        cursor = await self._start_block(head, stop)
        topics = [
            [TOPIC_JOB_SUBMITTED, TOPIC_JOB_SUBMITTED_FROM_QUOTE],
            "0x" + self.service_id.to_bytes(32, "big").hex(),
        ]
        while not stop.is_set():
            head = await self._retry("eth_blockNumber", self.rpc.block_number, stop)
            self.head_seen = head
            safe_head = head - self.confirmations
            if cursor.next_block > safe_head:
                self.caught_up.set()
                try:
                    await asyncio.wait_for(stop.wait(), self.poll_interval)
                except TimeoutError:
                    pass
                continue
            to_block = min(safe_head, cursor.next_block + self.max_range - 1)
            lo = cursor.next_block
            logs = await self._retry(
                "eth_getLogs",
                functools.partial(
                    self.rpc.get_logs, address=self.contract, topics=topics, from_block=lo, to_block=to_block
                ),
                stop,
            )
            last = await self._retry("eth_getBlockByNumber", functools.partial(self.rpc.get_block, to_block), stop)
            calls: list[JobCall] = []
            for entry in sorted(logs, key=lambda e: (int(str(e["blockNumber"]), 16), int(str(e["logIndex"]), 16))):
                if entry.get("removed"):
                    continue
                try:
                    call = decode_job_log(entry)
                except TangleError as exc:
                    log.warning("skipping a log: %s", exc)
                    continue
                if call.service_id == self.service_id:
                    calls.append(call)
            cursor = Cursor(to_block + 1, str(last.get("hash")) if last else None)
            fresh = self.state.advance(self.key, cursor, [c.to_row() for c in calls])
            if fresh:
                crash_point("producer.after_advance")
            for row in fresh:
                await deliver(JobCall.from_row(row))
            if to_block >= safe_head:
                self.caught_up.set()
