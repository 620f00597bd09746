"""Consumer paths a local chain cannot easily produce: an unclassified revert (held back with a growing
delay, dropped in the end), results whose transactions keep failing, a refused gas estimate, and
callbacks that raise. The real-chain paths are in tests/integration/test_real_tangle_producer_consumer.py."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
import rlp
from eth_abi import encode
from eth_utils import keccak

from microvm_blueprint.tangle import consumer as consumer_mod
from microvm_blueprint.tangle.consumer import GAS_FALLBACK, TangleConsumer
from microvm_blueprint.tangle.errors import RpcError
from microvm_blueprint.tangle.keystore import import_key
from microvm_blueprint.tangle.rpc import ContractRevert
from microvm_blueprint.tangle.state import TangleState

CONTRACT = "0x0165878A594ca255338adfa4d48449f69242Eb8F"
SERVICE_NOT_ACTIVE = "0x" + keccak(text="ServiceNotActive(uint64)")[:4].hex()


class FakeChain:
    def __init__(self, *, estimate: Any = 100_000, receipt_status: str = "0x1") -> None:
        self.estimate = estimate  # an int, or an exception to raise
        self.receipt_status = receipt_status
        self.sent: list[dict[str, Any]] = []
        self.nonce_value = 0
        self.mined = True  # False: no receipt yet

    async def eth_call(self, to: str, data: bytes, sender: str | None = None, block: str = "latest") -> bytes:
        # getJobCall: the call exists and is open
        return encode(["(uint8,address,uint64,uint32,bool,bool,uint256)"], [(0, "0x" + "11" * 20, 5, 0, False, False, 0)])

    async def estimate_gas(self, to: str, data: bytes, sender: str) -> int:
        if isinstance(self.estimate, BaseException):
            raise self.estimate
        return int(self.estimate)

    async def chain_id(self) -> int:
        return 31337

    async def nonce(self, address: str, block: str = "pending") -> int:
        return self.nonce_value

    async def gas_price(self) -> int:
        return 0

    async def send_raw(self, raw: bytes) -> str:
        from eth_account import Account

        tx = Account.recover_transaction(raw)
        self.sent.append({"raw": raw, "from": tx})
        return "0x" + f"{len(self.sent):064x}"

    async def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        if not self.mined:
            return None
        return {"status": self.receipt_status, "transactionHash": tx_hash}

    async def receipts(self, tx_hashes: list[str]) -> list[dict[str, Any] | None]:
        return [await self.receipt(h) for h in tx_hashes]


class Observer:
    """Hears what the sender reports (the journal, in the operator)."""

    def __init__(self, explode: bool = False) -> None:
        self.explode = explode
        self.submitted: dict[int, str] = {}
        self.dropped: dict[int, str] = {}

    def on_received(self, call: Any, job: str) -> None: ...
    def on_done(self, call: Any, output: bytes) -> None: ...
    def on_failed(self, call: Any, error: str) -> None: ...

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        self.submitted[call_id] = tx_hash
        if self.explode:
            raise RuntimeError("journal is gone")

    def on_dropped(self, call_id: int, reason: str) -> None:
        self.dropped[call_id] = reason


def finish(consumer: TangleConsumer, call_id: int, output: bytes = b"\x01") -> None:
    """What the runner does with a job's result: record the call handled (queueing its result in the
    same transaction) and wake the sender."""
    consumer.state.finish(0, call_id, output)
    consumer.wake()


def make(tmp: Path, chain: FakeChain, **kw: Any) -> tuple[TangleConsumer, TangleState]:
    state = TangleState(tmp / "t.sqlite3")
    key = import_key(tmp / "keystore", "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")
    return TangleConsumer(chain, state, key, contract=CONTRACT, backoff_cap=0.01, **kw), state  # type: ignore[arg-type]


async def run_until(consumer: TangleConsumer, cond: Any, timeout: float = 10) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            assert not task.done(), task
            await asyncio.sleep(0.005)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_an_unclassified_revert_is_held_back_then_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_mod, "MAX_UNKNOWN_REVERTS", 3)
    monkeypatch.setattr(consumer_mod, "HOLD_CAP", 0.02)
    chain = FakeChain(estimate=ContractRevert("execution reverted", SERVICE_NOT_ACTIVE + "00" * 32))
    observer = Observer()
    dropped = observer.dropped
    consumer, state = make(tmp_path, chain, observer=observer)
    finish(consumer, 7)
    await run_until(consumer, lambda: 7 in dropped)
    assert dropped[7] == "ServiceNotActive (after 3 attempts)"
    assert chain.sent == [] and state.outbox_status(0, 7) == ("dropped", None)


async def test_a_result_whose_transactions_keep_failing_is_dropped(tmp_path: Path) -> None:
    chain = FakeChain(receipt_status="0x0")
    observer = Observer()
    dropped = observer.dropped
    consumer, _ = make(tmp_path, chain, observer=observer)
    finish(consumer, 1)
    await run_until(consumer, lambda: 1 in dropped)
    assert len(chain.sent) == consumer_mod.MAX_SEND_ATTEMPTS
    assert "failed on-chain" in dropped[1]


async def test_a_refused_estimate_falls_back_to_a_fixed_limit_for_an_open_call(tmp_path: Path) -> None:
    from eth_account import Account

    chain = FakeChain(estimate=RpcError("eth_estimateGas: method not supported"))
    observer = Observer()
    submitted = observer.submitted
    consumer, _ = make(tmp_path, chain, observer=observer)
    finish(consumer, 3)
    await run_until(consumer, lambda: 3 in submitted)
    fields = rlp.decode(chain.sent[0]["raw"])
    assert int.from_bytes(fields[2], "big") == GAS_FALLBACK  # [nonce, gasPrice, gas, to, value, data, v, r, s]
    assert chain.sent[0]["from"] == Account.from_key(
        "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d").address


def _outbox_done(state: TangleState, call_id: int) -> bool:
    status = state.outbox_status(0, call_id)
    return status is not None and status[0] == "done"


async def test_callbacks_that_raise_do_not_stop_the_sender(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    chain = FakeChain()

    consumer, state = make(tmp_path, chain, observer=Observer(explode=True))
    finish(consumer, 1)
    await run_until(consumer, lambda: _outbox_done(state, 1))
    finish(consumer, 2)
    await run_until(consumer, lambda: _outbox_done(state, 2))
    assert "job observer failed on on_submitted of call 1" in caplog.text
    assert [int.from_bytes(rlp.decode(s["raw"])[0], "big") for s in chain.sent] == [0, 1]  # local nonces


async def test_results_linger_to_share_one_transaction(tmp_path: Path) -> None:
    chain = FakeChain()
    consumer, state = make(tmp_path, chain, linger=0.2)
    started = asyncio.get_running_loop().time()
    for call_id in (1, 2, 3):
        finish(consumer, call_id)
    await run_until(consumer, lambda: all((state.outbox_status(0, c) or ("",))[0] == "done" for c in (1, 2, 3)))
    assert len(chain.sent) == 1  # submitResults with all three
    assert rlp.decode(chain.sent[0]["raw"])[5][:4] == consumer_mod.SEL_SUBMIT_RESULTS
    assert asyncio.get_running_loop().time() - started >= 0.2


async def test_a_full_batch_does_not_linger(tmp_path: Path) -> None:
    chain = FakeChain()
    consumer, _ = make(tmp_path, chain, linger=60.0, batch_max=2)
    finish(consumer, 1)
    finish(consumer, 2)
    await run_until(consumer, lambda: len(chain.sent) == 1, timeout=10)  # 60 s of lingering would time out
    assert rlp.decode(chain.sent[0]["raw"])[5][:4] == consumer_mod.SEL_SUBMIT_RESULTS


class Clock:
    """The consumer's clock (its own ``time`` binding only: the event loop keeps the real one)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_receipts_are_looked_for_ever_less_often_while_none_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(consumer_mod, "time", clock)
    chain = FakeChain()
    chain.mined = False
    consumer, state = make(tmp_path, chain, linger=0)
    finish(consumer, 1)
    await consumer._round()
    assert len(chain.sent) == 1
    asked: list[float] = []
    for _ in range(400):  # 4 s of rounds, one every 10 ms
        clock.now += 0.01
        before = consumer.receipt_requests
        await consumer._collect()
        if consumer.receipt_requests > before:
            asked.append(clock.now)
    # polling every 20 ms would have asked 200 times; the wait doubles from 20 ms up to the cap
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert 6 <= len(asked) <= 9
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(gaps))  # never sooner than before
    assert gaps[0] < 0.1 and consumer_mod.COLLECT_CAP - 0.02 <= gaps[-1] <= consumer_mod.COLLECT_CAP + 0.02
    # once mined, the receipt is seen at the next look, and a new send is looked for soon again
    chain.mined = True
    clock.now += consumer_mod.COLLECT_CAP
    await consumer._collect()
    assert state.outbox_status(0, 1) == ("done", "0x" + f"{1:064x}")


async def test_a_new_block_is_looked_at_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(consumer_mod, "time", clock)
    chain = FakeChain()
    chain.mined = False
    blocks = [0]
    consumer, state = make(tmp_path, chain, linger=0, blocks=lambda: blocks[0])
    finish(consumer, 1)
    await consumer._round()
    for _ in range(200):  # 2 s without a block: the wait has grown to the cap
        clock.now += 0.01
        await consumer._collect()
    asked = consumer.receipt_requests
    clock.now += 0.01
    await consumer._collect()
    assert consumer.receipt_requests == asked  # nothing due yet without a new block...
    chain.mined = True
    blocks[0] += 1  # ...but a block is announced: looked at now, not a second later
    clock.now += consumer_mod.COLLECT_INTERVAL
    await consumer._collect()
    assert consumer.receipt_requests == asked + 1
    assert state.outbox_status(0, 1) == ("done", "0x" + f"{1:064x}")


class Counted:
    """The chain, with every method the consumer touches counted (an idle sender must touch none)."""

    def __init__(self, inner: FakeChain) -> None:
        self.inner = inner
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.asked.append(name)
        return getattr(self.inner, name)


async def test_blocks_cost_an_empty_outbox_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With WS_RPC_URL every block is announced to the sender (it looks for receipts at a new block):
    with nothing in flight, 500 blocks ask the chain nothing, before a result and after it is done."""
    clock = Clock()
    monkeypatch.setattr(consumer_mod, "time", clock)
    chain = Counted(FakeChain())
    blocks = [0]
    consumer, state = make(tmp_path, chain, linger=0, blocks=lambda: blocks[0])  # type: ignore[arg-type]

    async def idle_blocks(n: int) -> None:
        for _ in range(n):
            blocks[0] += 1
            clock.now += 0.1
            assert await consumer._round() is False

    await idle_blocks(500)
    assert chain.asked == [] and consumer.receipt_requests == 0
    finish(consumer, 1)
    await consumer._round()  # sent
    blocks[0] += 1
    clock.now += consumer_mod.COLLECT_INTERVAL
    await consumer._round()  # its receipt, at the next block
    assert state.outbox_status(0, 1) == ("done", "0x" + f"{1:064x}")
    asked = len(chain.asked)
    await idle_blocks(500)
    assert len(chain.asked) == asked and consumer.receipt_requests == 1


async def test_after_a_reorg_the_nonce_is_read_from_the_chain_again(tmp_path: Path) -> None:
    chain = FakeChain()
    consumer, state = make(tmp_path, chain, linger=0)
    finish(consumer, 1)
    await run_until(consumer, lambda: (state.outbox_status(0, 1) or ("",))[0] == "done")
    chain.nonce_value = 0  # the reorg took our transaction with nonce 0 away
    consumer.chain_reorged()
    finish(consumer, 2)
    await run_until(consumer, lambda: (state.outbox_status(0, 2) or ("",))[0] == "done")
    assert [int.from_bytes(rlp.decode(s["raw"])[0], "big") for s in chain.sent] == [0, 0]  # not 1
