"""Every job-call log layout meets the producer on a real chain: the dev contract emits the deployed
3-topic JobSubmitted, the published 4-topic one, and JobSubmittedFromQuote (the real deployment only
emits the first)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector

from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle, send_unlocked
from microvm_blueprint.tangle.producer import TangleProducer
from microvm_blueprint.tangle.rpc import JsonRpc
from microvm_blueprint.tangle.state import TangleState

from .tangle_chain import producer_running, wait_for

pytestmark = pytest.mark.chain


async def test_the_producer_reads_every_layout(anvil: Anvil, tmp_path: Path) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    rpc = JsonRpc(anvil.rpc_url)
    state = TangleState(tmp_path / "t.sqlite3")
    producer = TangleProducer(rpc, state, contract=d.contract, service_id=d.service_id, poll_interval=0.05)
    try:
        async with producer_running(producer) as got:
            sends = [
                ("submitJob(uint64,uint8,bytes)", [0, 1, b"deployed"], ["uint64", "uint8", "bytes"], 3),
                ("submitJobIndexedLayout(uint64,uint8,bytes)", [0, 2, b"indexed"], ["uint64", "uint8", "bytes"], 4),
                ("submitJobFromQuote(uint64,uint8,bytes,address[],uint256)", [0, 3, b"quoted", [d.operator], 5],
                 ["uint64", "uint8", "bytes", "address[]", "uint256"], 3),
            ]
            receipts = []
            for signature, args, types, topics in sends:
                receipt = await send_unlocked(rpc, d.customer, d.contract,
                                              function_signature_to_4byte_selector(signature) + encode(types, args))
                assert len(receipt["logs"][0]["topics"]) == topics
                receipts.append(receipt)
            await wait_for(lambda: len(got) == 3, 20, "three calls")
            assert [(c.call_id, c.job_index, c.inputs, c.from_quote, c.caller) for c in got] == [
                (0, 1, b"deployed", False, d.customer),
                (1, 2, b"indexed", False, d.customer),
                (2, 3, b"quoted", True, d.customer),
            ]
            assert [c.tx_hash for c in got] == [r["transactionHash"] for r in receipts]
            cursor = state.cursor(producer.key)
            assert cursor is not None and cursor.next_block > max(c.block_number for c in got)
    finally:
        await rpc.aclose()
