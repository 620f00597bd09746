"""The producer's log decoding (both JobSubmitted layouts and JobSubmittedFromQuote; hostile logs) and
its windowing against an RPC that refuses wide ranges or fails for a while — conditions a local anvil
cannot produce (the chain tests in tests/integration/test_tangle_*.py cover the rest for real)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode
from hypothesis import given, settings
from hypothesis import strategies as st

from microvm_blueprint.tangle.calls import JobCall
from microvm_blueprint.tangle.contracts import (
    TOPIC_JOB_SUBMITTED,
    TOPIC_JOB_SUBMITTED_FROM_QUOTE,
    TOPIC_SERVICE_ACTIVATED,
)
from microvm_blueprint.tangle.errors import RpcError, RpcUnavailable, TangleError
from microvm_blueprint.tangle.producer import TangleProducer, decode_job_log
from microvm_blueprint.tangle.state import TangleState

CONTRACT = "0x0165878A594ca255338adfa4d48449f69242Eb8F"
CALLER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def word(n: int) -> str:
    return "0x" + n.to_bytes(32, "big").hex()


def log_entry(topics: list[str], data: bytes, block: int = 5, index: int = 0) -> dict[str, Any]:
    return {
        "address": CONTRACT.lower(), "topics": topics, "data": "0x" + data.hex(),
        "blockNumber": hex(block), "blockHash": "0x" + f"{block:064x}", "logIndex": hex(index),
        "transactionHash": "0x" + "ab" * 32, "removed": False,
    }


def submitted(service: int, call_id: int, job: int, inputs: bytes, *, block: int = 5, index: int = 0,
              layout: str = "deployed") -> dict[str, Any]:
    if layout == "deployed":  # jobIndex not indexed: 3 topics
        return log_entry([TOPIC_JOB_SUBMITTED, word(service), word(call_id)],
                         encode(["uint8", "address", "bytes"], [job, CALLER, inputs]), block, index)
    if layout == "indexed":  # the published interface: 4 topics
        return log_entry([TOPIC_JOB_SUBMITTED, word(service), word(call_id), word(job)],
                         encode(["address", "bytes"], [CALLER, inputs]), block, index)
    return log_entry(
        [TOPIC_JOB_SUBMITTED_FROM_QUOTE, word(service), word(call_id)],
        encode(["uint8", "address", "address[]", "uint256", "bytes"], [job, CALLER, [CALLER], 10**18, inputs]),
        block, index,
    )


@pytest.mark.parametrize("layout", ["deployed", "indexed", "quote"])
def test_each_layout_decodes(layout: str) -> None:
    call = decode_job_log(submitted(3, 42, 6, b"\x01\x02", block=9, index=4, layout=layout))
    assert call == JobCall(
        service_id=3, call_id=42, job_index=6, caller=CALLER, inputs=b"\x01\x02", block_number=9,
        block_hash="0x" + f"{9:064x}", log_index=4, tx_hash="0x" + "ab" * 32, from_quote=layout == "quote",
    )


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (log_entry([TOPIC_JOB_SUBMITTED, word(0)], b""), "unexpected log layout"),
        (log_entry([TOPIC_JOB_SUBMITTED, word(0), word(1)], b"\x00" * 10), "undecodable job log"),
        (log_entry([TOPIC_JOB_SUBMITTED, word(0), word(1), word(300)], encode(["address", "bytes"], [CALLER, b""])),
         "out of range"),
        (log_entry([TOPIC_JOB_SUBMITTED, word(2**64), word(1)], encode(["uint8", "address", "bytes"], [0, CALLER, b""])),
         "out of range"),
        (log_entry(["0x" + "00" * 32, word(0), word(1)], b""), "unexpected log layout"),
        ({"topics": "nope"}, "undecodable job log"),
        ({}, "undecodable job log"),
    ],
)
def test_bad_logs_are_tangle_errors(entry: dict[str, Any], reason: str) -> None:
    with pytest.raises(TangleError, match=reason):
        decode_job_log(entry)


_topic = st.one_of(st.sampled_from([TOPIC_JOB_SUBMITTED, TOPIC_JOB_SUBMITTED_FROM_QUOTE, word(0), word(2**64)]),
                   st.binary(max_size=40).map(lambda b: "0x" + b.hex()), st.text(max_size=10))


@settings(max_examples=500, deadline=None)
@given(st.fixed_dictionaries({
    "topics": st.lists(_topic, max_size=5),
    "data": st.one_of(st.binary(max_size=300).map(lambda b: "0x" + b.hex()), st.text(max_size=5), st.none()),
    "blockNumber": st.one_of(st.just("0x5"), st.text(max_size=4), st.integers()),
    "blockHash": st.just("0x" + "11" * 32),
    "logIndex": st.one_of(st.just("0x0"), st.none()),
}))
def test_fuzz_hostile_logs_only_raise_tangle_errors(entry: dict[str, Any]) -> None:
    try:
        decode_job_log(entry)
    except TangleError:
        pass


class FakeChain:
    """Just enough of JsonRpc for the producer: blocks with logs, a getLogs range limit, outages."""

    def __init__(self, head: int, logs: list[dict[str, Any]], *, max_range: int | None = None,
                 wide_refused: bool = False) -> None:
        self.head = head
        self.logs = logs
        self.max_range = max_range
        self.wide_refused = wide_refused
        self.down = 0  # number of calls still to fail
        self.requests: list[tuple[int, int]] = []
        self.blocks_read = 0  # eth_getBlockByNumber of one block, beside the polls' head_block

    def _maybe_fail(self) -> None:
        if self.down > 0:
            self.down -= 1
            raise RpcUnavailable("connection refused")

    async def block_number(self) -> int:
        self._maybe_fail()
        return self.head

    forked_from: int | None = None  # blocks from here on were replaced (a reorg): other hashes

    def hash_of(self, n: int) -> str:
        fork = self.forked_from is not None and n >= self.forked_from
        return "0x" + f"{n + (1 << 200 if fork else 0):064x}"

    async def head_block(self) -> tuple[int, str]:
        self._maybe_fail()
        return self.head, self.hash_of(self.head)

    async def head_and_hash(self, number: int) -> tuple[tuple[int, str], str | None]:
        head = await self.head_block()
        return head, self.hash_of(number) if number <= head[0] else None

    async def get_block(self, number: int | str) -> dict[str, Any] | None:
        self._maybe_fail()
        self.blocks_read += 1
        return {"number": hex(int(number)), "hash": self.hash_of(int(number))}

    async def get_logs(self, *, address: str, topics: list[Any], from_block: int, to_block: int) -> list[dict[str, Any]]:
        self._maybe_fail()
        self.requests.append((from_block, to_block))
        if self.max_range is not None and to_block - from_block + 1 > self.max_range:
            raise RpcError("eth_getLogs: block range too large")
        t0 = topics[0] if isinstance(topics[0], list) else [topics[0]]
        return [e for e in self.logs if e["topics"][0] in t0 and e["topics"][1] == topics[1]
                and from_block <= int(e["blockNumber"], 16) <= to_block]


async def collect(producer: TangleProducer, until_count: int, timeout: float = 10) -> list[JobCall]:
    got: list[JobCall] = []
    stop = asyncio.Event()

    async def deliver(call: JobCall) -> None:
        got.append(call)
        if len(got) >= until_count:
            stop.set()

    task = asyncio.create_task(producer.run(deliver, stop))
    deadline = asyncio.get_running_loop().time() + timeout
    while not (stop.is_set() or (until_count == 0 and producer.caught_up.is_set())):
        assert asyncio.get_running_loop().time() < deadline, f"got {len(got)} of {until_count}"
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.wait_for(task, 10)
    return got


async def test_a_refused_wide_window_is_narrowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logs = [submitted(0, i, 0, b"x", block=100 + 40 * i) for i in range(5)]
    logs.insert(2, log_entry([TOPIC_JOB_SUBMITTED, word(0), word(99)], b"\x00" * 7, block=150))  # undecodable
    logs.append(submitted(1, 50, 0, b"other service", block=120))
    chain = FakeChain(400, logs, max_range=25)
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=90,  # type: ignore[arg-type]
                              max_range=1000, poll_interval=0.01, backoff_cap=0.01)
    with caplog.at_level(logging.WARNING, logger="microvm_blueprint.tangle.producer"):
        got = await collect(producer, 5)
    assert [c.call_id for c in got] == [0, 1, 2, 3, 4]
    assert "skipping a log at block 0x96" in caplog.text
    assert max(hi - lo + 1 for lo, hi in chain.requests[-5:]) <= 25 * 2  # shrank, then grows back at most 2x
    state.close()


async def test_an_outage_is_retried_with_backoff(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    chain = FakeChain(50, [submitted(0, 0, 0, b"a", block=10), submitted(0, 1, 0, b"b", block=40)])
    chain.down = 7
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=0,  # type: ignore[arg-type]
                              poll_interval=0.01, backoff_cap=0.01)
    with caplog.at_level(logging.WARNING, logger="microvm_blueprint.tangle.producer"):
        got = await collect(producer, 2)
    assert [c.call_id for c in got] == [0, 1]
    assert caplog.text.count("retrying in") >= 7
    state.close()


async def test_the_activation_block_is_found_in_windows_when_a_wide_query_is_refused(tmp_path: Path) -> None:
    activated = log_entry([TOPIC_SERVICE_ACTIVATED, word(0), word(0), word(0)], encode(["uint8"], [0]), block=1234)
    chain = FakeChain(5000, [activated, submitted(0, 0, 0, b"a", block=1300)], max_range=500)
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, max_range=500,  # type: ignore[arg-type]
                              poll_interval=0.01, backoff_cap=0.01)
    got = await collect(producer, 1)
    assert [c.call_id for c in got] == [0]
    found_at = chain.requests.index((1001, 1500))  # searched backwards from the head, window by window
    assert chain.requests[0] == (0, 5000) and chain.requests[1] == (4501, 5000)
    assert chain.requests[found_at + 1] == (1234, 1733)  # then scanned forwards from the activation
    state.close()


async def test_no_activation_log_falls_back_to_a_short_look_back(tmp_path: Path) -> None:
    chain = FakeChain(5000, [submitted(0, 0, 0, b"a", block=4995)])
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0,  # type: ignore[arg-type]
                              poll_interval=0.01, backoff_cap=0.01)
    got = await collect(producer, 1)
    assert [c.call_id for c in got] == [0]
    state.close()


async def test_confirmations_hold_back_the_newest_blocks(tmp_path: Path) -> None:
    chain = FakeChain(100, [submitted(0, 0, 0, b"a", block=97), submitted(0, 1, 0, b"b", block=99)])
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=90,  # type: ignore[arg-type]
                              poll_interval=0.01, confirmations=2)
    got = await collect(producer, 0)
    assert [c.call_id for c in got] == [0]  # block 99 is not 2 blocks deep yet
    cursor = state.cursor(producer.key)
    assert cursor is not None and cursor.next_block == 99
    state.close()


class BusyChain(FakeChain):
    """A chain that mines a block between any two polls (anvil's automine under load)."""

    def __init__(self) -> None:
        super().__init__(10, [])
        self.polls: list[float] = []

    async def head_block(self) -> tuple[int, str]:
        self.polls.append(asyncio.get_running_loop().time())
        self.head += 1
        return await super().head_block()


async def test_a_caught_up_producer_polls_once_per_interval_on_a_busy_chain(tmp_path: Path) -> None:
    chain = BusyChain()
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=5,  # type: ignore[arg-type]
                              poll_interval=0.1)
    stop = asyncio.Event()

    async def deliver(call: JobCall) -> None:
        return None

    task = asyncio.create_task(producer.run(deliver, stop))
    deadline = asyncio.get_running_loop().time() + 10
    while len(chain.polls) < 6:
        assert asyncio.get_running_loop().time() < deadline and not task.done()
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 10)
    gaps = [b - a for a, b in zip(chain.polls[1:], chain.polls[2:], strict=False)]  # the first poll finds a backlog
    assert min(gaps) >= 0.1 * 0.99, gaps
    state.close()


async def test_a_producer_behind_the_head_does_not_wait_between_windows(tmp_path: Path) -> None:
    chain = FakeChain(1000, [submitted(0, i, 0, b"x", block=100 * i + 50) for i in range(10)])
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=1,  # type: ignore[arg-type]
                              max_range=100, poll_interval=30.0)
    got = await collect(producer, 10, timeout=10)  # ten windows: a wait per window would take 5 minutes
    assert [c.call_id for c in got] == list(range(10))
    state.close()


async def test_a_poll_reaching_the_head_reads_no_block_beside_it(tmp_path: Path) -> None:
    """Caught up on a chain that mines between polls, each poll is two requests (head, then logs): the
    window ends at the head, whose hash the poll already has; a window short of it reads its block."""
    chain = BusyChain()
    chain.logs = [submitted(0, i, 0, b"x", block=11 + i) for i in range(5)]
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=5,  # type: ignore[arg-type]
                              poll_interval=0.01)
    got = await collect(producer, 5, timeout=10)
    assert [c.call_id for c in got] == list(range(5))
    assert len(chain.requests) >= 5 and chain.blocks_read == 0
    cursor = state.cursor(producer.key)
    assert cursor is not None and cursor.last_hash == "0x" + f"{cursor.next_block - 1:064x}"  # the head's hash
    state.close()

    state = TangleState(tmp_path / "c.sqlite3")
    chain2 = FakeChain(50, [])
    producer = TangleProducer(chain2, state, contract=CONTRACT, service_id=0, from_block=5,  # type: ignore[arg-type]
                              confirmations=3, poll_interval=0.01)
    stop = asyncio.Event()

    async def deliver(call: JobCall) -> None:
        return None

    task = asyncio.create_task(producer.run(deliver, stop))
    await asyncio.wait_for(producer.caught_up.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)
    cursor = state.cursor(producer.key)
    assert chain2.blocks_read >= 1 and cursor is not None
    assert cursor.next_block == 48 and cursor.last_hash == "0x" + f"{47:064x}"
    state.close()


async def test_new_blocks_wake_the_poll_but_no_sooner_than_the_wake_gap(tmp_path: Path) -> None:
    """Blocks announced every 5 ms (anvil in a burst): the producer polls well before its 30 s
    interval, yet never twice within ``wake_gap``."""
    chain = BusyChain()
    state = TangleState(tmp_path / "t.sqlite3")
    wake = asyncio.Event()
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=5,  # type: ignore[arg-type]
                              poll_interval=30.0, wake=wake, wake_gap=0.1)
    stop = asyncio.Event()

    async def deliver(call: JobCall) -> None:
        return None

    async def announce() -> None:
        while True:
            wake.set()
            await asyncio.sleep(0.005)

    task = asyncio.create_task(producer.run(deliver, stop))
    announcer = asyncio.create_task(announce())
    deadline = asyncio.get_running_loop().time() + 10
    while len(chain.polls) < 6:  # with the 30 s interval alone this would take 2.5 minutes
        assert asyncio.get_running_loop().time() < deadline and not task.done()
        await asyncio.sleep(0.01)
    announcer.cancel()
    stop.set()
    await asyncio.wait_for(task, 10)
    gaps = [b - a for a, b in zip(chain.polls[1:], chain.polls[2:], strict=False)]
    assert min(gaps) >= 0.1 * 0.99, gaps
    assert max(gaps) < 5, gaps
    state.close()


async def reorg_while_running(tmp_path: Path, reorg: Any, expect: int) -> tuple[list[JobCall], TangleProducer]:
    """Run a producer to the head of a 30-block chain holding calls 0 and 1, apply ``reorg`` to the chain,
    and collect until ``expect`` calls were delivered in all."""
    chain = FakeChain(30, [submitted(0, 0, 0, b"a", block=10), submitted(0, 1, 0, b"b", block=26)])
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(chain, state, contract=CONTRACT, service_id=0, from_block=5,  # type: ignore[arg-type]
                              poll_interval=0.01)
    got: list[JobCall] = []
    stop = asyncio.Event()

    async def deliver(call: JobCall) -> None:
        got.append(call)

    task = asyncio.create_task(producer.run(deliver, stop))
    try:
        await asyncio.wait_for(producer.caught_up.wait(), 10)
        cursor = state.cursor(producer.key)
        assert cursor is not None and cursor.next_block == 31 and len(got) == 2
        reorg(chain)
        deadline = asyncio.get_running_loop().time() + 10
        while len(got) < expect or producer.reorgs == 0:
            assert asyncio.get_running_loop().time() < deadline, f"got {len(got)} of {expect}"
            assert not task.done(), task
            await asyncio.sleep(0.005)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        state.close()
    return got, producer


async def test_a_reorg_while_running_reads_the_replaced_blocks_again(tmp_path: Path) -> None:
    def fork(chain: FakeChain) -> None:  # blocks 28.. replaced; the new 28 carries call 2
        chain.forked_from = 28
        chain.logs.append(submitted(0, 2, 0, b"fork", block=28))

    got, producer = await reorg_while_running(tmp_path, fork, 3)
    assert [c.call_id for c in got] == [0, 1, 2]  # 0 and 1 (read again) are not handed over twice
    assert got[2].inputs == b"fork" and producer.reorgs == 1


async def test_a_chain_that_got_shorter_is_a_reorg_too(tmp_path: Path) -> None:
    def shorten(chain: FakeChain) -> None:  # rolled back to block 27, then a new 28 with call 2
        chain.head = 28
        chain.forked_from = 28
        chain.logs.append(submitted(0, 2, 0, b"short", block=28))

    got, producer = await reorg_while_running(tmp_path, shorten, 3)
    assert [c.call_id for c in got] == [0, 1, 2] and producer.reorgs >= 1
