"""WS_RPC_URL against anvil: a job is seen as its block arrives, not at the producer's next poll."""

from __future__ import annotations

import asyncio

import pytest

from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.heads import NewHeads

from .conftest import HarnessFactory

pytestmark = pytest.mark.chain


async def test_a_new_block_wakes_the_operator_long_before_its_poll(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    # a 60 s poll interval: within the 20 s deadline below only a new-block wake-up can see the job
    op = await h.start_operator(env={"WS_RPC_URL": anvil.ws_url, "POLL_INTERVAL": "60"})
    (heads,) = [s for s in op.operator.runner.services if isinstance(s, NewHeads)]
    await asyncio.wait_for(heads.subscribed.wait(), 10)
    await asyncio.wait_for(op.operator.runner.producer.caught_up.wait(), 10)
    for name in ("woken-1", "woken-2"):
        outcome = await h.job("create_vm", name, timeout=20)
        assert outcome.result is True
    assert heads.heads >= 2


async def test_without_a_websocket_nothing_subscribes(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    op = await h.start_operator()
    assert not [s for s in op.operator.runner.services if isinstance(s, NewHeads)]
    assert op.operator.runner.producer.wake is None
    assert (await h.job("create_vm", "polled", timeout=30)).result is True
