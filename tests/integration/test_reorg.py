"""A real reorg on anvil (``anvil_reorg``) while the operator runs. Blocks it has already read are
replaced by blocks carrying a call the old ones did not have: it notices the changed hash at its
next poll, reads the new blocks again, and answers the call; a call it had already handled is not
run twice. And a reorg that drops our result transaction but keeps the call: the result is sent
again, and the chain ends with exactly one result for the call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from eth_utils import keccak

from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.rpc import JsonRpc

from .conftest import HarnessFactory, result_counts

CREATE = JOBS_BY_NAME["create_vm"]


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_reorg_under_the_cursor_is_read_again(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    running = await h.start_operator()
    runner = running.operator.runner
    rpc = JsonRpc(anvil.rpc_url)
    try:
        before = await h.job("create_vm", "vm-before")
        assert before.result is True
        await rpc.call("anvil_mine", ["0x5"])
        head = await rpc.block_number()

        def cursor_past(block: int) -> bool:
            cursor = runner.state.cursor(runner.producer.key)
            return cursor is not None and cursor.next_block > block

        await until(lambda: cursor_past(head), 20, "the operator to read past the head")
        # three blocks deep: the new first block carries a call the replaced blocks did not have
        raw = await h.customer.sign(CREATE, encode_args(CREATE.arg_types, ["vm-in-the-fork"]))
        await rpc.call("anvil_reorg", [3, [["0x" + raw.hex(), 0]]])
        assert await rpc.block_number() == head
        sub = await h.customer.wait_submitted("0x" + keccak(raw).hex(), timeout=10)
        assert sub.block_number == head - 2  # below the operator's cursor
        out = await h.customer.wait_result(sub, timeout=30, api_url=running.api_url)
        assert out.result is True
        assert (await running.operator.provider.get_vm("vm-in-the-fork")).vm_id == "vm-in-the-fork"
        # the call handled before the reorg was not handed over again
        assert runner.handled == 2
    finally:
        await rpc.aclose()


async def test_a_result_the_reorg_dropped_is_sent_again(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    running = await h.start_operator()
    runner = running.operator.runner
    rpc = JsonRpc(anvil.rpc_url)
    try:
        out = await h.job("create_vm", "vm-a")
        assert out.result is True and out.result_tx is not None
        receipt = await rpc.receipt(out.result_tx)
        assert receipt is not None
        mined_in = int(receipt["blockNumber"], 16)
        await until(lambda: runner.state.outbox_status(d.service_id, out.call_id) == ("done", out.result_tx),
                    20, "the operator to see its receipt")
        head = await rpc.block_number()
        await rpc.call("anvil_reorg", [head - mined_in + 1, []])  # the result's block and after: empty
        assert await rpc.receipt(out.result_tx) is None
        assert (await result_counts(anvil.rpc_url, d.contract)).get(out.call_id) is None  # the call is open again

        # the same result, nonce and gas again: often the very same transaction, mined once more
        deadline = time.monotonic() + 30
        while (await result_counts(anvil.rpc_url, d.contract)).get(out.call_id) != 1:
            assert time.monotonic() < deadline, "the result was not sent again"
            await asyncio.sleep(0.05)
        await until(lambda: (runner.state.outbox_status(d.service_id, out.call_id) or ("",))[0] == "done",
                    20, "the operator to see the new receipt")
        assert (await result_counts(anvil.rpc_url, d.contract)).get(out.call_id) == 1
        assert runner.handled == 1  # the job itself did not run again
    finally:
        await rpc.aclose()


async def test_a_call_id_the_reorg_gives_to_another_call_is_not_answered_with_the_old_result(
    anvil: Anvil, harness_for: HarnessFactory
) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    running = await h.start_operator()
    runner = running.operator.runner
    rpc = JsonRpc(anvil.rpc_url)
    try:
        nonce_a = await rpc.nonce(h.customer.address)
        out = await h.job("create_vm", "vm-a")
        assert out.result is True
        await until(lambda: runner.state.outbox_status(d.service_id, out.call_id) == ("done", out.result_tx),
                    20, "the operator to see its receipt")
        # replace the call's block and everything after it; the new first block carries another
        # customer call, which the contract numbers as the old one was
        head = await rpc.block_number()
        sub_block = await _call_block(rpc, d.contract, out.call_id)
        raw = await h.customer.sign(CREATE, encode_args(CREATE.arg_types, ["vm-b"]), nonce=nonce_a)
        await rpc.call("anvil_reorg", [head - sub_block + 1, [["0x" + raw.hex(), 0]]])
        sub = await h.customer.wait_submitted("0x" + keccak(raw).hex(), timeout=10)
        assert sub.call_id == out.call_id  # the same id, another call
        await until(lambda: runner.state.outbox_status(d.service_id, out.call_id) == ("dropped", out.result_tx),
                    30, "the old result to be dropped")
        await until(lambda: runner.producer.reorgs >= 1 and not runner.state.reorg_pending(runner.producer.key),
                    30, "the re-scan to be back")
        assert (await result_counts(anvil.rpc_url, d.contract)).get(out.call_id) is None  # no wrong answer
        assert runner.handled == 1  # vm-b was not created under vm-a's call
    finally:
        await rpc.aclose()


async def _call_block(rpc: JsonRpc, contract: str, call_id: int) -> int:
    from microvm_blueprint.tangle.contracts import TOPIC_JOB_SUBMITTED

    logs = await rpc.get_logs(address=contract, topics=[TOPIC_JOB_SUBMITTED, None, "0x" + call_id.to_bytes(32, "big").hex()],
                              from_block=0, to_block=await rpc.block_number())
    assert len(logs) == 1
    return int(logs[0]["blockNumber"], 16)


async def test_a_result_whose_call_the_reorg_took_away_is_dropped(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    running = await h.start_operator()
    runner = running.operator.runner
    rpc = JsonRpc(anvil.rpc_url)
    try:
        out = await h.job("create_vm", "vm-gone")
        await until(lambda: runner.state.outbox_status(d.service_id, out.call_id) == ("done", out.result_tx),
                    20, "the operator to see its receipt")
        head = await rpc.block_number()
        await rpc.call("anvil_reorg", [head - await _call_block(rpc, d.contract, out.call_id) + 1, []])
        await until(lambda: (runner.state.outbox_status(d.service_id, out.call_id) or ("",))[0] == "dropped",
                    30, "the result to be dropped")
        assert "JobCallNotFound" in (runner.state.outbox_reason(d.service_id, out.call_id) or "")
        assert (await result_counts(anvil.rpc_url, d.contract)).get(out.call_id) is None
    finally:
        await rpc.aclose()
