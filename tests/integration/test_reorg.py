"""Real reorgs on anvil (``anvil_reorg``) under a running operator:

* blocks it has already read are replaced by blocks carrying a call the old ones did not have: it
  notices the changed hash at its next poll, reads the new blocks again and answers the call; a call
  it had already handled is not run twice;
* a reorg drops our result transaction but keeps the call: the result is sent again, and the chain
  ends with exactly one result for the call;
* a reorg takes the call away too: the result is dropped (JobCallNotFound), nothing is sent;
* a reorg gives the call id to another call: the old result never answers the new call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from eth_utils import keccak

from microvm_blueprint.blueprint.client import Outcome
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.contracts import TOPIC_JOB_SUBMITTED
from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.rpc import JsonRpc
from microvm_blueprint.tangle.runner import BlueprintRunner

from ..waiting import until
from .conftest import Harness, HarnessFactory, RunningOperator, result_counts

CREATE = JOBS_BY_NAME["create_vm"]


@dataclass
class Chain:
    """A running operator on anvil, and what the tests need of it."""

    h: Harness
    running: RunningOperator
    rpc: JsonRpc
    service_id: int
    contract: str

    @property
    def runner(self) -> BlueprintRunner:
        return self.running.operator.runner

    def outbox(self, call_id: int) -> tuple[str, str | None] | None:
        return self.runner.state.outbox_status(self.service_id, call_id)

    async def answered(self, vm_id: str) -> Outcome:
        """``create_vm`` answered on-chain, and the operator has seen its receipt."""
        out = await self.h.job("create_vm", vm_id)
        assert out.result is True and out.result_tx is not None
        await until(lambda: self.outbox(out.call_id) == ("done", out.result_tx), 20, "the operator to see its receipt")
        return out

    async def results(self, call_id: int) -> int | None:
        return (await result_counts(self.h.rpc_url, self.contract)).get(call_id)

    async def block_of_call(self, call_id: int) -> int:
        logs = await self.rpc.get_logs(
            address=self.contract, topics=[TOPIC_JOB_SUBMITTED, None, "0x" + call_id.to_bytes(32, "big").hex()],
            from_block=0, to_block=await self.rpc.block_number(),
        )
        assert len(logs) == 1
        return int(logs[0]["blockNumber"], 16)

    async def reorg_from(self, block: int, raw_txs: Sequence[bytes] = ()) -> None:
        """Replace ``block`` and every block after it (same height), the first new one carrying ``raw_txs``."""
        depth = await self.rpc.block_number() - block + 1
        await self.rpc.call("anvil_reorg", [depth, [["0x" + raw.hex(), 0] for raw in raw_txs]])


@pytest.fixture
async def chain(anvil: Anvil, harness_for: HarnessFactory) -> AsyncIterator[Chain]:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    running = await h.start_operator()
    rpc = JsonRpc(anvil.rpc_url)
    try:
        yield Chain(h, running, rpc, d.service_id, d.contract)
    finally:
        await rpc.aclose()


async def test_a_reorg_under_the_cursor_is_read_again(chain: Chain) -> None:
    await chain.answered("vm-before")
    await chain.rpc.call("anvil_mine", ["0x5"])
    head = await chain.rpc.block_number()

    def cursor_past(block: int) -> bool:
        cursor = chain.runner.state.cursor(chain.runner.producer.key)
        return cursor is not None and cursor.next_block > block

    await until(lambda: cursor_past(head), 20, "the operator to read past the head")
    # three blocks deep: the new first block carries a call the replaced blocks did not have
    raw = await chain.h.customer.sign(CREATE, encode_args(CREATE.arg_types, ["vm-in-the-fork"]))
    await chain.reorg_from(head - 2, [raw])
    assert await chain.rpc.block_number() == head
    sub = await chain.h.customer.wait_submitted("0x" + keccak(raw).hex(), timeout=10)
    assert sub.block_number == head - 2  # below the operator's cursor
    out = await chain.h.customer.wait_result(sub, timeout=30, api_url=chain.running.api_url)
    assert out.result is True
    assert (await chain.running.operator.provider.get_vm("vm-in-the-fork")).vm_id == "vm-in-the-fork"
    assert chain.runner.handled == 2  # the call handled before the reorg was not handed over again


async def test_a_result_the_reorg_dropped_is_sent_again(chain: Chain) -> None:
    out = await chain.answered("vm-a")
    receipt = await chain.rpc.receipt(str(out.result_tx))
    assert receipt is not None
    await chain.reorg_from(int(receipt["blockNumber"], 16))  # the result's block and after: empty
    assert await chain.rpc.receipt(str(out.result_tx)) is None
    assert await chain.results(out.call_id) is None  # the call is open again
    # the same result, nonce and gas again: often the very same transaction, mined once more
    async def one_result() -> bool:
        return await chain.results(out.call_id) == 1

    await until(one_result, 30, "the result to be sent again", every=0.05)
    await until(lambda: (chain.outbox(out.call_id) or ("",))[0] == "done", 20, "the operator to see the new receipt")
    assert await chain.results(out.call_id) == 1
    assert chain.runner.handled == 1  # the job itself did not run again


async def test_a_result_whose_call_the_reorg_took_away_is_dropped(chain: Chain) -> None:
    out = await chain.answered("vm-gone")
    await chain.reorg_from(await chain.block_of_call(out.call_id))
    await until(lambda: (chain.outbox(out.call_id) or ("",))[0] == "dropped", 30, "the result to be dropped")
    assert "JobCallNotFound" in (chain.runner.state.outbox_reason(chain.service_id, out.call_id) or "")
    assert await chain.results(out.call_id) is None


async def test_a_call_id_the_reorg_gives_to_another_call_is_not_answered_with_the_old_result(chain: Chain) -> None:
    nonce_a = await chain.rpc.nonce(chain.h.customer.address)
    out = await chain.answered("vm-a")
    # the call's block and everything after it replaced; the new first block carries another
    # customer call with the same nonce, which the contract numbers as the old one was
    raw = await chain.h.customer.sign(CREATE, encode_args(CREATE.arg_types, ["vm-b"]), nonce=nonce_a)
    await chain.reorg_from(await chain.block_of_call(out.call_id), [raw])
    sub = await chain.h.customer.wait_submitted("0x" + keccak(raw).hex(), timeout=10)
    assert sub.call_id == out.call_id  # the same id, another call
    await until(lambda: chain.outbox(out.call_id) == ("dropped", out.result_tx), 30, "the old result to be dropped")
    runner = chain.runner
    await until(lambda: runner.producer.reorgs >= 1 and not runner.state.reorg_pending(runner.producer.key),
                30, "the re-scan to be back")
    assert await chain.results(out.call_id) is None  # no wrong answer
    assert runner.handled == 1  # vm-b was not created under vm-a's call
