"""TangleProducer: ``JobSubmitted`` / ``JobSubmittedFromQuote`` logs -> :class:`JobCall` (DESIGN.md §3, §7).

Polls ``eth_getLogs`` on the Tangle address, topic0 in {JobSubmitted, JobSubmittedFromQuote} and
topic1 = our service id; both JobSubmitted layouts (3 topics: the deployed contract; 4 topics: the
published interface) and JobSubmittedFromQuote are decoded, and a log that does not decode is logged
and skipped.

Start: the persisted cursor; else ``--from-block``/``FROM_BLOCK``; else the block where the service
was activated (``ServiceActivated``: one wide query, else windows backwards from the head); else the
head minus a small look-back. Reads wide windows (``MAX_GETLOGS_RANGE``) while behind, narrow ones
once caught up; a window the RPC refuses is halved and grows back after. The cursor carries the hash
of its last block; a changed hash rewinds :data:`REORG_REWIND` blocks (reorg): at start, and at every
poll while running (checked in the same request as the head).

Durability ("never lose or repeat a call"): each window's calls are written to the inbox in the same
SQLite transaction that moves the cursor, *before* they are handed over; a call stays ``new`` until
the runner records its outcome (``TangleState.finish``, the durable acknowledgement) and ``new`` calls
are handed over again at the next start. So the cursor may run ahead of the acknowledgements without
losing anything, and the inbox's primary key means no call is handed over twice in a run.
RPC errors are retried with capped exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eth_abi import decode
from eth_utils import to_checksum_address

from ..crashpoints import crash_point
from .aio import wait_first
from .calls import JobCall
from .contracts import TOPIC_JOB_SUBMITTED, TOPIC_JOB_SUBMITTED_FROM_QUOTE, TOPIC_SERVICE_ACTIVATED
from .errors import TangleError
from .rpc import JsonRpc
from .state import Cursor, TangleState

log = logging.getLogger(__name__)

REORG_REWIND = 64
FRESH_LOOKBACK = 9
#: How far back from the head a first start looks for ServiceActivated when the RPC refuses one wide query.
ACTIVATION_SCAN_LIMIT = 1_000_000


def job_topics(service_id: int) -> list[Any]:
    """The ``topics`` filter of our job logs: JobSubmitted or JobSubmittedFromQuote, for ``service_id``
    (``eth_getLogs`` here, ``eth_subscribe("logs")`` in ``heads``)."""
    return [[TOPIC_JOB_SUBMITTED, TOPIC_JOB_SUBMITTED_FROM_QUOTE], "0x" + service_id.to_bytes(32, "big").hex()]


def _word(topic: str) -> int:
    return int(topic, 16)


def decode_job_log(entry: dict[str, Any]) -> JobCall:
    """Decode one log of either JobSubmitted layout or JobSubmittedFromQuote. Raises TangleError."""
    try:
        topics = [str(t) for t in entry["topics"]]
        data = bytes.fromhex(str(entry["data"])[2:])
        t0 = topics[0].lower() if topics else ""
        if t0 not in (TOPIC_JOB_SUBMITTED, TOPIC_JOB_SUBMITTED_FROM_QUOTE) or len(topics) not in (3, 4):
            raise TangleError(f"unexpected log layout: topic0 {t0[:10]}.. with {len(topics)} topics")
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
    """Capped exponential backoff with jitter (delays in [d/2, d])."""

    def __init__(self, base: float = 0.25, cap: float = 10.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures, 10))
        return float(delay * (0.5 + random.random() / 2))


def _log_position(entry: dict[str, Any]) -> tuple[int, int]:
    try:
        return int(str(entry["blockNumber"]), 16), int(str(entry["logIndex"]), 16)
    except (KeyError, TypeError, ValueError):
        return (-1, -1)  # decoding rejects it below


class TangleProducer:
    """Feeds new job calls to ``deliver`` (e.g. a bounded ``asyncio.Queue``'s ``put``) in chain order;
    ``deliver`` blocking is the back-pressure. See the module doc for durability."""

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
        backoff_cap: float = 10.0,
        wake: asyncio.Event | None = None,
        wake_gap: float = 0.05,
        read_to: Callable[[int], None] | None = None,
        on_reorg: Callable[[], None] | None = None,
    ) -> None:
        self.rpc = rpc
        self.on_reorg = on_reorg  # told of a reorg noticed while running (the result sender's nonce)
        self.wake = wake  # set when a job log is announced (heads.NewHeads): poll now, not at the interval
        self.wake_gap = wake_gap
        self.read_to = read_to  # told the cursor after each poll (heads.NewHeads.read_to: what is still unread)
        self.state = state
        self.contract = contract
        self.service_id = service_id
        self.from_block = from_block
        self.max_range = max(1, max_range)
        self.poll_interval = poll_interval
        self._last_poll = float("-inf")
        self._behind = True  # the last poll did not reach the head: poll again at once
        self.confirmations = confirmations
        self.backoff_cap = backoff_cap
        self.key = f"jobs:{contract.lower()}:{service_id}"
        self.caught_up = asyncio.Event()
        self.head_seen = -1
        self.reorgs = 0  # reorgs noticed while running
        self._reorg_pending = False  # results to reopen once the re-scan is back (state.reopen_due)
        self._window = self.max_range
        self._topics = job_topics(service_id)

    async def _retry(self, what: str, fn: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> Any:
        backoff = Backoff(cap=self.backoff_cap)
        while True:
            try:
                return await fn()
            except TangleError as exc:  # RpcError, a revert-shaped answer, a database hiccup
                await self._pause(backoff, what, exc, stop)

    async def _pause(self, backoff: Backoff, what: str, exc: BaseException, stop: asyncio.Event) -> None:
        delay = backoff.next()
        log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            return
        raise _Stopped from None

    async def _start_block(self, head: int, stop: asyncio.Event) -> Cursor:
        saved = self.state.cursor(self.key)
        if saved is not None:
            if saved.last_hash and saved.next_block > 0:
                block = await self._retry(
                    "eth_getBlockByNumber", functools.partial(self.rpc.get_block, saved.next_block - 1), stop
                )
                if block is None or block.get("hash") != saved.last_hash:
                    rewind = max(0, saved.next_block - REORG_REWIND)
                    forgotten = self.state.rewind(self.key, self.service_id, rewind)
                    log.warning("block %d changed since the last run (reorg): rewinding to %d "
                                "(%d unhandled call(s) from there on are read again)",
                                saved.next_block - 1, rewind, forgotten)
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
        log.warning("first start: no ServiceActivated log found for service %d; scanning from block %d "
                    "(set FROM_BLOCK to scan from further back)", self.service_id, start)
        return Cursor(start, None)

    async def _find_activation(self, head: int, stop: asyncio.Event) -> int | None:
        """The block of our service's ``ServiceActivated`` log: one wide query, else chunks backwards."""
        topics = [TOPIC_SERVICE_ACTIVATED, "0x" + self.service_id.to_bytes(32, "big").hex()]
        try:
            logs = await self.rpc.get_logs(address=self.contract, topics=topics, from_block=0, to_block=head)
            found = [b for b, _ in map(_log_position, logs) if b >= 0]
            return min(found) if found else None
        except TangleError as exc:
            log.info("wide ServiceActivated query refused (%s); searching in windows of %d blocks",
                     exc, self.max_range)
        hi = head
        floor = max(0, head - ACTIVATION_SCAN_LIMIT)
        while hi >= floor:
            lo = max(floor, hi - self.max_range + 1)
            logs = await self._retry(
                "eth_getLogs(ServiceActivated)",
                functools.partial(self.rpc.get_logs, address=self.contract, topics=topics, from_block=lo, to_block=hi),
                stop,
            )
            found = [b for b, _ in map(_log_position, logs) if b >= 0]
            if found:
                return min(found)
            hi = lo - 1
        return None

    async def run(self, deliver: Callable[[JobCall], Awaitable[None]], stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set, delivering calls in (block, log index) order."""
        try:
            await self._run(deliver, stop)
        except _Stopped:
            return

    async def _get_logs(
        self, lo: int, hi: int, stop: asyncio.Event, head: tuple[int, str]
    ) -> tuple[int, str | None, list[dict[str, Any]]]:
        """``(to_block, hash of to_block, logs of [lo, to_block])`` with ``to_block <= hi``.

        The block is read *before* its logs: a reorg in between leaves a stale hash in the cursor and the
        next poll rewinds (the safe side), never the other way round. When the window ends at ``head``
        (the poll's newest block, read just before) its hash is already known: one request, not two.
        A refused window is halved (provider range or result limits) and retried with backoff; a good
        answer lets it grow back.
        """
        backoff = Backoff(cap=self.backoff_cap)
        while True:
            to_block = min(hi, lo + self._window - 1)
            try:
                if to_block == head[0]:
                    block_hash: str | None = head[1]
                else:
                    block = await self.rpc.get_block(to_block)
                    block_hash = str(block.get("hash")) if block else None
                logs = await self.rpc.get_logs(
                    address=self.contract, topics=self._topics, from_block=lo, to_block=to_block
                )
            except TangleError as exc:
                if self._window > 1:
                    self._window = max(1, self._window // 2)
                await self._pause(backoff, f"eth_getLogs [{lo}, {to_block}]", exc, stop)
                continue
            self._window = min(self.max_range, self._window * 2)
            return to_block, block_hash, logs

    def _decode_window(self, logs: list[dict[str, Any]]) -> list[JobCall]:
        calls: list[JobCall] = []
        for entry in sorted(logs, key=_log_position):
            if entry.get("removed"):
                continue
            if str(entry.get("address", self.contract)).lower() != self.contract.lower():
                continue
            try:
                call = decode_job_log(entry)
            except TangleError as exc:
                log.warning("skipping a log at block %s index %s (tx %s): %s", entry.get("blockNumber"),
                            entry.get("logIndex"), entry.get("transactionHash"), exc)
                continue
            if call.service_id == self.service_id:
                calls.append(call)
        return calls

    async def _run(self, deliver: Callable[[JobCall], Awaitable[None]], stop: asyncio.Event) -> None:
        head = await self._retry("eth_blockNumber", self.rpc.block_number, stop)
        cursor = await self._start_block(head, stop)  # first: a reorg forgets unhandled orphaned calls
        self._reorg_pending = self.state.reorg_pending(self.key)  # this start's, or one a crash interrupted
        for call in self.state.unfinished():  # recorded earlier but never acknowledged: hand over again
            if stop.is_set():
                return
            await deliver(call)
        backoff = Backoff(cap=self.backoff_cap)
        while not stop.is_set():
            try:
                cursor = await self._step(cursor, deliver, stop)
                if self.read_to is not None:
                    self.read_to(cursor.next_block)
                backoff.reset()
            except _Stopped:
                raise
            except Exception as exc:  # a bug or a surprise must not take the service down: log, back off
                log.exception("job producer: unexpected error at block %d", cursor.next_block)
                await self._pause(backoff, "job producer", exc, stop)

    async def _until_due(self, stop: asyncio.Event) -> None:
        """Wait for the next poll: ``poll_interval`` after the last one, or as soon as ``wake`` is set
        (a job log announced: heads.NewHeads) but no sooner than ``wake_gap`` after the last poll (a
        burst of jobs, one a block, would otherwise cost two requests a block), or until ``stop``."""
        while not stop.is_set():
            woken = self.wake is not None and self.wake.is_set()
            due = self._last_poll + (min(self.poll_interval, self.wake_gap) if woken else self.poll_interval)
            left = due - time.monotonic()
            if left <= 0:
                return
            await self._idle(left, stop, wakeable=not woken)

    async def _idle(self, seconds: float, stop: asyncio.Event, *, wakeable: bool) -> None:
        """Sleep up to ``seconds``, less if stopped or (``wakeable``) woken by an announced job log."""
        if self.wake is None or not wakeable:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            return
        await wait_first(stop.wait(), self.wake.wait(), timeout=seconds)

    async def _poll_head(self, cursor: Cursor) -> tuple[tuple[int, str], bool]:
        """The newest block's ``(number, hash)``, and whether the block the cursor read last has
        changed (a reorg), in one request."""
        last = cursor.next_block - 1
        if cursor.last_hash is None or last < 0:
            return await self.rpc.head_block(), False
        head, last_hash = await self.rpc.head_and_hash(last)
        return head, last_hash != cursor.last_hash

    async def _step(
        self, cursor: Cursor, deliver: Callable[[JobCall], Awaitable[None]], stop: asyncio.Event
    ) -> Cursor:
        # one poll per interval once caught up, or when a job log is announced with WS_RPC_URL (a busy
        # chain mines a block per transaction: polling again at once would cost the node 2 requests a block)
        if not self._behind:
            await self._until_due(stop)
            if stop.is_set():
                return cursor
        if self.wake is not None:
            self.wake.clear()  # logs announced from here on wake the next poll
        self._last_poll = time.monotonic()
        head, changed = await self._retry(
            "eth_getBlockByNumber(latest)", functools.partial(self._poll_head, cursor), stop
        )
        self.head_seen = head[0]
        if changed:
            # the block read last is no longer on the chain: read the blocks before it again. Calls
            # already recorded stay (the inbox knows them); a call only the new blocks carry is new;
            # our results mined in those blocks are checked again once the re-scan is back (state.py)
            rewind = max(0, cursor.next_block - REORG_REWIND)
            self.state.rewind_cursor(self.key, rewind)
            self._reorg_pending = True
            log.warning("block %d changed under the cursor (reorg): reading again from block %d; our results "
                        "mined from there on are checked again once it is back", cursor.next_block - 1, rewind)
            cursor = Cursor(rewind, None)
            self.reorgs += 1
            self._tell_reorg()
            self._behind = True
            return cursor
        safe_head = head[0] - self.confirmations
        if cursor.next_block > safe_head:
            self._behind = False
            self.caught_up.set()
            self._maybe_reopen(cursor)
            return cursor
        to_block, last_hash, logs = await self._get_logs(cursor.next_block, safe_head, stop, head)
        calls = self._decode_window(logs)
        cursor = Cursor(to_block + 1, last_hash)
        fresh = self.state.advance(self.key, cursor, calls)
        if fresh:
            crash_point("producer.after_advance")
        for call in fresh:
            await deliver(call)
        self._behind = to_block < safe_head
        if not self._behind:
            self.caught_up.set()
        self._maybe_reopen(cursor)
        return cursor

    def _maybe_reopen(self, cursor: Cursor) -> None:
        """After a reorg, once the re-scan is back where it was (or at the head of a chain that got
        shorter), reopen the results mined in the replaced range (``TangleState.reopen_due``)."""
        if not self._reorg_pending:
            return
        reopened = self.state.reopen_due(self.key, cursor.next_block, caught_up=not self._behind)
        if reopened is not None:
            self._reorg_pending = False
            log.warning("reorg: re-read up to block %d; %d result(s) mined in the replaced range are checked "
                        "again and sent again if gone", cursor.next_block - 1, reopened)
            self._tell_reorg()

    def _tell_reorg(self) -> None:
        if self.on_reorg is not None:
            try:
                self.on_reorg()
            except Exception:  # the listener's bug is not the producer's: it goes on reading
                log.exception("reorg listener failed")
