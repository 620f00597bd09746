"""The tangle layer's producer and consumer against the REAL Tangle contracts (tnt-core LocalTestnet
deployment from ../shared/tangle, replayed onto one anvil per session; each test reverts its changes).
The whole operator as a process against the same contracts: test_real_tangle_operator_process.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from eth_abi import encode

from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.abi import encode_result
from microvm_blueprint.tangle.calls import JobCall
from microvm_blueprint.tangle.consumer import submit_results_data
from microvm_blueprint.tangle.producer import TangleProducer
from microvm_blueprint.tangle.rpc import ContractRevert, JsonRpc
from microvm_blueprint.tangle.state import TangleState
from microvm_blueprint.tangle.transact import GAS_MULTIPLIER

from .conftest import RealTangleChain
from .tangle_chain import (
    Pipeline,
    job_call,
    operator_key,
    producer_running,
    results_on_chain,
    submit_job,
    submit_result_directly,
    transactions_from,
    wait_for,
)

pytestmark = pytest.mark.chain

TRUE = encode_result("bool", True)


def vm_args(name: str) -> bytes:
    return encode(["string"], [name])


@pytest.fixture
async def rpc(real_tangle: RealTangleChain) -> AsyncIterator[JsonRpc]:
    client = JsonRpc(real_tangle.rpc_url)
    yield client
    await client.aclose()


async def test_job_call_seen_and_result_submitted(real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path) -> None:
    chain = real_tangle
    start = await rpc.block_number()
    pipe = await Pipeline(chain, chain.rpc_url, tmp_path / "tangle.sqlite3", operator_key(tmp_path, chain.operator_key),
                          from_block=start, answer=lambda c: TRUE).start()
    try:
        call_id, receipt = await submit_job(rpc, chain, 0, vm_args("vm-1"))
        await wait_for(lambda: call_id in pipe.recorder.submitted, 20, "the result transaction")
        # the producer decoded the deployed contract's 3-topic layout
        (call,) = pipe.received
        log = next(e for e in receipt["logs"] if e["topics"][0] == contracts.TOPIC_JOB_SUBMITTED)
        assert len(log["topics"]) == 3
        assert call == JobCall(
            service_id=0, call_id=call_id, job_index=0, caller=chain.customer, inputs=vm_args("vm-1"),
            block_number=int(receipt["blockNumber"], 16), block_hash=receipt["blockHash"],
            log_index=int(log["logIndex"], 16), tx_hash=receipt["transactionHash"], from_quote=False,
        )
        # on-chain: exactly one JobResultSubmitted by our operator, and the call is completed
        assert (await results_on_chain(rpc, chain, start))[call_id] == [TRUE]
        tx_hash = pipe.recorder.submitted[call_id]
        result_receipt = await rpc.receipt(tx_hash)
        assert result_receipt is not None and result_receipt["status"] == "0x1"
        by_us = [e for e in result_receipt["logs"] if e["topics"][0] == contracts.TOPIC_JOB_RESULT_SUBMITTED]
        assert int(by_us[0]["topics"][3], 16) == int(chain.operator, 16)
        assert any(e["topics"][0] == contracts.TOPIC_JOB_COMPLETED for e in result_receipt["logs"])
        assert (await job_call(rpc, chain, call_id))[4] is True
        # gas: the estimate x 1.3, not the SDK's 8,000,000 floor
        tx = await rpc.call("eth_getTransactionByHash", [tx_hash])
        gas_limit, gas_used = int(tx["gas"], 16), int(result_receipt["gasUsed"], 16)
        assert gas_used < gas_limit <= gas_used * GAS_MULTIPLIER * 1.5 and gas_limit < 8_000_000
        assert pipe.state.outbox_status(0, call_id) == ("done", tx_hash)
    finally:
        await pipe.close()


async def test_several_pending_results_go_in_one_submit_results(
    real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path
) -> None:
    chain = real_tangle
    start = await rpc.block_number()
    ids = [(await submit_job(rpc, chain, 0, vm_args(f"vm-{i}")))[0] for i in range(3)]
    pipe = Pipeline(chain, chain.rpc_url, tmp_path / "t.sqlite3", operator_key(tmp_path, chain.operator_key))
    for call_id in ids:
        pipe.finish(call_id, TRUE)
    pipe.finish(ids[0], b"\x02")  # queued once only: the first result stays
    assert [(r.call_id, r.output) for r in pipe.state.pending(10)] == [(i, TRUE) for i in ids]
    await pipe.start()
    try:
        await wait_for(lambda: len(pipe.recorder.submitted) == 3, 20, "three results")
        assert len(set(pipe.recorder.submitted.values())) == 1  # one submitResults transaction
        sent = await transactions_from(rpc, chain.operator, start)
        assert len(sent) == 1 and sent[0][0]["input"][:10] == contracts.selector(contracts.SUBMIT_RESULTS)
        assert await results_on_chain(rpc, chain, start) == {i: [TRUE] for i in ids}
    finally:
        await pipe.close()


async def test_duplicates_are_success_without_a_paid_failure(
    real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path
) -> None:
    """A result already on-chain (replay, race, a restart after sending) is success: no transaction,
    no failed paid one — alone and inside a batch with an open call."""
    chain = real_tangle
    start = await rpc.block_number()
    done_a = (await submit_job(rpc, chain, 0, vm_args("a")))[0]
    done_b = (await submit_job(rpc, chain, 0, vm_args("b")))[0]
    open_c = (await submit_job(rpc, chain, 0, vm_args("c")))[0]
    await submit_result_directly(rpc, chain, done_a, TRUE)
    await submit_result_directly(rpc, chain, done_b, TRUE)
    # the real contract reverts a whole batch when one call in it is completed
    batch = submit_results_data(0, [done_b, open_c], [TRUE, TRUE])
    with pytest.raises(ContractRevert) as reverted:
        await rpc.estimate_gas(chain.tangle, batch, chain.operator)
    assert reverted.value.name == "JobAlreadyCompleted"
    nonce_before = await rpc.nonce(chain.operator)

    pipe = Pipeline(chain, chain.rpc_url, tmp_path / "t.sqlite3", operator_key(tmp_path, chain.operator_key))
    pipe.finish(done_a, TRUE)
    await pipe.start()
    try:
        await wait_for(lambda: pipe.state.outbox_status(0, done_a) == ("done", None), 20, "call a settled")
        assert await rpc.nonce(chain.operator) == nonce_before  # nothing sent for it
        pipe.finish(done_b, TRUE)
        pipe.finish(open_c, TRUE)
        await wait_for(lambda: open_c in pipe.recorder.submitted, 20, "call c sent")
        await wait_for(lambda: pipe.consumer.idle, 20, "the outbox drained")
        assert pipe.state.outbox_status(0, done_b) == ("done", None)
        assert set(pipe.recorder.submitted) == {open_c} and not pipe.recorder.dropped
        sent = await transactions_from(rpc, chain.operator, start)
        assert all(receipt["status"] == "0x1" for _, receipt in sent)  # no paid failure, ever
        assert await rpc.nonce(chain.operator) == nonce_before + 1
        assert await results_on_chain(rpc, chain, start) == {done_a: [TRUE], done_b: [TRUE], open_c: [TRUE]}
    finally:
        await pipe.close()


async def test_permanent_reverts_are_dropped(real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path) -> None:
    chain = real_tangle
    start = await rpc.block_number()
    unknown = 1_000_000
    pipe = Pipeline(chain, chain.rpc_url, tmp_path / "t.sqlite3", operator_key(tmp_path, chain.operator_key))
    pipe.finish(unknown, TRUE)
    await pipe.start()
    try:
        await wait_for(lambda: unknown in pipe.recorder.dropped, 20, "the unknown call dropped")
        assert pipe.recorder.dropped[unknown] == "JobCallNotFound"
        assert pipe.state.outbox_status(0, unknown) == ("dropped", None)
    finally:
        await pipe.close()

    # a key that is not an operator of the service: OperatorNotInService, dropped, nothing sent
    call_id = (await submit_job(rpc, chain, 0, vm_args("x")))[0]
    stranger = tmp_path / "stranger"
    pipe = Pipeline(chain, chain.rpc_url, tmp_path / "s.sqlite3", operator_key(stranger, chain.stranger_key))
    pipe.finish(call_id, TRUE)
    await pipe.start()
    try:
        await wait_for(lambda: call_id in pipe.recorder.dropped, 20, "the result dropped")
        assert pipe.recorder.dropped[call_id] == "OperatorNotInService"
        assert await transactions_from(rpc, chain.stranger, start) == []
        assert (await job_call(rpc, chain, call_id))[4] is False
    finally:
        await pipe.close()


async def test_dry_run_sends_nothing(real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    chain = real_tangle
    start = await rpc.block_number()
    call_id = (await submit_job(rpc, chain, 0, vm_args("dry")))[0]
    caplog.set_level(logging.INFO, logger="microvm_blueprint.tangle")
    pipe = Pipeline(chain, chain.rpc_url, tmp_path / "t.sqlite3", None, from_block=start, answer=lambda c: TRUE,
                    dry_run=True)
    await pipe.start()
    try:
        await wait_for(lambda: pipe.state.outbox_status(0, call_id) == ("done", None), 20, "dry-run outcome")
        assert "dry run: result for call" in caplog.text
        assert await results_on_chain(rpc, chain, start) == {}
    finally:
        await pipe.close()


async def test_cursor_persists_across_a_restart(real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path) -> None:
    """Stop, submit while down, start again: nothing missed, nothing handed over twice; a call handed
    over but never acknowledged comes back once."""
    chain = real_tangle
    start = await rpc.block_number()
    db = tmp_path / "tangle.sqlite3"
    acked: set[int] = set()

    def answer_first_only(call: JobCall) -> bytes | None:
        if not acked:  # acknowledge the first call only
            acked.add(call.call_id)
            return TRUE
        return None

    first = await Pipeline(chain, chain.rpc_url, db, None, from_block=start, answer=answer_first_only).start(
        consumer=False)
    j1 = (await submit_job(rpc, chain, 0, vm_args("j1")))[0]
    j2 = (await submit_job(rpc, chain, 1, vm_args("j2")))[0]
    await wait_for(lambda: first.ids() == [j1, j2], 20, "j1 and j2")
    await first.close()

    j3 = (await submit_job(rpc, chain, 2, vm_args("j3")))[0]
    j4 = (await submit_job(rpc, chain, 0, vm_args("j4")))[0]
    # from_block would say "start over": the persisted cursor wins
    second = await Pipeline(chain, chain.rpc_url, db, None, from_block=start, answer=lambda c: TRUE).start(
        consumer=False)
    try:
        await wait_for(lambda: second.ids() == [j2, j3, j4], 20, "j2 again (never acknowledged), then j3, j4")
        head = await rpc.block_number()
        await wait_for(lambda: second.producer.caught_up.is_set() and second.producer.head_seen >= head, 20,
                       "the producer caught up")
        assert second.ids() == [j2, j3, j4]
        assert [c.job_index for c in second.received] == [1, 2, 0]
        cursor = second.state.cursor(second.producer.key)
        assert cursor is not None and cursor.next_block == second.producer.head_seen + 1
        block = await rpc.get_block(cursor.next_block - 1)
        assert block is not None and cursor.last_hash == block["hash"]
    finally:
        await second.close()
    state = TangleState(db)
    try:
        assert state.unfinished() == []
    finally:
        state.close()


async def test_a_reorg_found_at_start_rewinds(real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path) -> None:
    """The persisted block hash no longer matches (anvil evm_revert + new blocks): the producer rewinds,
    forgets the unhandled call from the orphaned branch and reads the canonical one."""
    chain = real_tangle
    start = await rpc.block_number()
    db = tmp_path / "tangle.sqlite3"
    fork = await rpc.call("evm_snapshot", [])
    first = await Pipeline(chain, chain.rpc_url, db, None, from_block=start).start(consumer=False)
    orphan = (await submit_job(rpc, chain, 0, vm_args("orphaned")))[0]
    await wait_for(lambda: first.ids() == [orphan], 20, "the orphaned call")
    await first.close()

    assert await rpc.call("evm_revert", [fork]) is True
    canonical = (await submit_job(rpc, chain, 0, vm_args("canonical")))[0]
    assert canonical == orphan  # same call id, different job
    await rpc.call("anvil_mine", ["0x3"])
    second = await Pipeline(chain, chain.rpc_url, db, None, from_block=start).start(consumer=False)
    try:
        await wait_for(lambda: len(second.received) == 1, 20, "the canonical call")
        head = await rpc.block_number()
        await wait_for(lambda: second.producer.caught_up.is_set() and second.producer.head_seen >= head, 20,
                       "the producer caught up")
        (call,) = second.received
        assert call.inputs == vm_args("canonical")
    finally:
        await second.close()


async def test_first_start_scans_from_the_service_activation(
    real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path
) -> None:
    chain = real_tangle
    logs = await rpc.get_logs(address=chain.tangle, topics=[contracts.TOPIC_SERVICE_ACTIVATED, "0x" + "00" * 32],
                              from_block=0, to_block=await rpc.block_number())
    activation = int(logs[0]["blockNumber"], 16)
    call_id = (await submit_job(rpc, chain, 0, vm_args("early")))[0]
    await rpc.call("anvil_mine", ["0x40"])  # far beyond the SDK's ~9-block look-back
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(rpc, state, contract=chain.tangle, service_id=0, max_range=7, poll_interval=0.05)
    async with producer_running(producer) as got:
        await wait_for(lambda: producer.caught_up.is_set(), 20, "the producer caught up")
        assert [c.call_id for c in got] == [call_id]
    fresh = TangleState(tmp_path / "fresh.sqlite3")
    try:
        p2 = TangleProducer(rpc, fresh, contract=chain.tangle, service_id=0, max_range=7)
        assert (await p2._start_block(await rpc.block_number(), asyncio.Event())).next_block == activation
    finally:
        fresh.close()


async def test_other_services_and_contracts_are_ignored(
    real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path
) -> None:
    """A producer for service 7 sees nothing of service 0's calls."""
    chain = real_tangle
    start = await rpc.block_number()
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(rpc, state, contract=chain.tangle, service_id=7, from_block=start, poll_interval=0.05)
    async with producer_running(producer) as got:
        await submit_job(rpc, chain, 0, vm_args("not-ours"))
        head = await rpc.block_number()
        await wait_for(lambda: producer.caught_up.is_set() and producer.head_seen >= head, 20, "caught up")
        assert got == []


async def test_the_contract_reverts_as_classified(real_tangle: RealTangleChain, rpc: JsonRpc) -> None:
    """The deployed contract's reverts carry the selectors our contracts module classifies."""
    chain = real_tangle
    submit = contracts.selector_bytes(contracts.SUBMIT_JOB)
    with pytest.raises(ContractRevert) as bad_index:
        await rpc.estimate_gas(chain.tangle, submit + encode(["uint64", "uint8", "bytes"], [0, 200, b""]),
                               chain.customer)
    assert bad_index.value.name == "InvalidJobIndex"
    with pytest.raises(ContractRevert) as not_permitted:
        await rpc.estimate_gas(chain.tangle, submit + encode(["uint64", "uint8", "bytes"], [0, 0, b""]),
                               chain.stranger)
    assert not_permitted.value.name == "NotPermittedCaller"
    call_id = (await submit_job(rpc, chain, 0, vm_args("x")))[0]
    result = submit_results_data(0, [call_id], [TRUE])
    with pytest.raises(ContractRevert) as not_operator:
        await rpc.estimate_gas(chain.tangle, result, chain.stranger)
    assert not_operator.value.name == "OperatorNotInService"
    await submit_result_directly(rpc, chain, call_id, TRUE)
    with pytest.raises(ContractRevert) as again:
        await rpc.estimate_gas(chain.tangle, result, chain.operator)
    assert again.value.name in contracts.ALREADY_DONE


async def test_a_result_sent_before_a_crash_is_watched_not_sent_again(
    real_tangle: RealTangleChain, rpc: JsonRpc, tmp_path: Path
) -> None:
    """The outbox says "sent in tx T" but the receipt was never seen (the process died): the next
    consumer waits for T's receipt and reports it; it sends nothing itself."""
    chain = real_tangle
    call_id = (await submit_job(rpc, chain, 0, vm_args("sent-before")))[0]
    receipt = await submit_result_directly(rpc, chain, call_id, TRUE)  # what the dead process had sent
    db = tmp_path / "t.sqlite3"
    state = TangleState(db)
    state.finish(0, call_id, TRUE)
    state.mark(0, [call_id], "sent", tx_hash=receipt["transactionHash"])
    state.close()
    nonce = await rpc.nonce(chain.operator)
    pipe = await Pipeline(chain, chain.rpc_url, db, operator_key(tmp_path, chain.operator_key)).start()
    try:
        await wait_for(lambda: call_id in pipe.recorder.submitted, 20, "the earlier transaction's receipt")
        assert pipe.recorder.submitted[call_id] == receipt["transactionHash"]
        assert pipe.state.outbox_status(0, call_id) == ("done", receipt["transactionHash"])
        assert await rpc.nonce(chain.operator) == nonce
    finally:
        await pipe.close()
