"""WS_RPC_URL against anvil: a job is seen as its log is announced, not at the producer's next poll,
and a new block without a job log costs the node no request (an idle operator's requests do not grow
with the block rate)."""

from __future__ import annotations

import asyncio

import pytest
from bench.rpc_counter import CountingProxy

from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.heads import NewHeads
from microvm_blueprint.tangle.rpc import JsonRpc

from ..waiting import until
from .conftest import HarnessFactory, RunningOperator

pytestmark = pytest.mark.chain


async def test_a_job_log_wakes_the_operator_long_before_its_poll(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    # a 60 s poll interval: within the 20 s deadline below only a log notification can see the job
    op = await h.start_operator(env={"WS_RPC_URL": anvil.ws_url, "POLL_INTERVAL": "60"})
    (heads,) = [s for s in op.operator.runner.services if isinstance(s, NewHeads)]
    await asyncio.wait_for(heads.subscribed.wait(), 10)
    await asyncio.wait_for(op.operator.runner.producer.caught_up.wait(), 10)
    for name in ("woken-1", "woken-2"):
        outcome = await h.job("create_vm", name, timeout=20)
        assert outcome.result is True
    assert heads.heads >= 2
    assert heads.logs >= 2  # the job logs' notifications, not the blocks', woke the poll


async def test_without_a_websocket_nothing_subscribes(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    op = await h.start_operator()
    assert not [s for s in op.operator.runner.services if isinstance(s, NewHeads)]
    assert op.operator.runner.producer.wake is None
    assert (await h.job("create_vm", "polled", timeout=30)).result is True


def _the_heads(op: RunningOperator) -> NewHeads:
    (heads,) = [s for s in op.operator.runner.services if isinstance(s, NewHeads)]
    return heads


async def _mine(rpc_url: str, blocks: int, per_second: float) -> None:
    """``blocks`` empty blocks at about ``per_second`` (evm_mine straight to anvil, not through the proxy)."""
    rpc = JsonRpc(rpc_url)
    try:
        for _ in range(blocks):
            await rpc.call("evm_mine", [])
            await asyncio.sleep(1 / per_second)  # pacing a block rate, not waiting for a condition
    finally:
        await rpc.aclose()


async def test_blocks_without_job_logs_cost_an_idle_operator_no_request(
    anvil: Anvil, harness_for: HarnessFactory
) -> None:
    """Counted, not timed: 40 blocks at ~10 a second, no job. Before the log subscription each
    announced block woke a poll (2 requests a block: ~80 here); now the blocks are only counted, and
    the result sender (its outbox empty) asks nothing either."""
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    async with CountingProxy(anvil.rpc_url) as proxy:
        h.rpc_url = proxy.url  # the operator's HTTP requests all pass through the counter
        op = await h.start_operator(env={"WS_RPC_URL": anvil.ws_url, "POLL_INTERVAL": "60"})
        heads = _the_heads(op)
        await asyncio.wait_for(heads.subscribed.wait(), 10)
        await asyncio.wait_for(op.operator.runner.producer.caught_up.wait(), 10)
        before, seen = proxy.counts(), heads.heads
        await _mine(anvil.rpc_url, 40, per_second=10)
        await until(lambda: heads.heads >= seen + 40, 20, "the 40 blocks announced")
        spent = proxy.counts() - before
        assert spent.requests <= 2, spent  # 0 expected (the 60 s poll is not due); slack for one poll
        assert spent.methods["eth_getLogs"] <= 1, spent
        # the job path still works after the idle stretch (the log notification wakes the poll)...
        assert (await h.job("create_vm", "after-idle", timeout=20)).result is True
        await until(lambda: op.operator.runner.consumer.idle, 20, "the result sender idle again")
        # ...and once its log is read (the producer tells the hint), blocks are free again
        before, seen = proxy.counts(), heads.heads
        await _mine(anvil.rpc_url, 20, per_second=10)
        await until(lambda: heads.heads >= seen + 20, 20, "the 20 blocks announced")
        spent = proxy.counts() - before
        assert spent.requests <= 2, spent
        await op.stop()


async def test_a_log_waits_for_its_confirmations_then_the_block_that_brings_them_wakes_the_poll(
    anvil: Anvil, harness_for: HarnessFactory
) -> None:
    """CONFIRMATIONS=2 and a 60 s poll: the job's log is announced in block B but may be read only at
    B+2, so the head subscription (a hint that costs nothing otherwise) wakes the poll at B+2."""
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    op = await h.start_operator(env={"WS_RPC_URL": anvil.ws_url, "POLL_INTERVAL": "60", "CONFIRMATIONS": "2"})
    heads = _the_heads(op)
    producer = op.operator.runner.producer
    await asyncio.wait_for(heads.subscribed.wait(), 10)
    await asyncio.wait_for(producer.caught_up.wait(), 10)
    job = JOBS_BY_NAME["create_vm"]
    sub = await h.customer.submit(job, encode_args(job.arg_types, ["deep-enough"]))
    await until(lambda: heads.logs >= 1, 10, "the job log announced")
    cursor = op.operator.state.cursor(producer.key)
    assert cursor is None or cursor.next_block <= sub.block_number  # not read yet: 2 blocks short
    await _mine(anvil.rpc_url, 2, per_second=10)
    outcome = await h.customer.wait_result(sub, timeout=20, api_url=op.api_url)
    assert outcome.result is True
