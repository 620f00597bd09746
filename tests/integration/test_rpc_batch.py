"""JSON-RPC batches against a real anvil: one request, one answer per call in order, each error mapped
to our tree (a revert to ContractRevert, anything else to RpcError) without hiding the other answers."""

from __future__ import annotations

import pytest

from microvm_blueprint.tangle.consumer import submit_result_data
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.errors import RpcError, RpcUnavailable
from microvm_blueprint.tangle.rpc import ContractRevert, JsonRpc


async def test_a_batch_answers_each_call_and_maps_each_error(anvil: Anvil) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    rpc = JsonRpc(anvil.rpc_url)
    try:
        head = await rpc.block_number()
        unknown_call = submit_result_data(0, 999_999, b"\x01")
        answers = await rpc.batch([
            ("eth_blockNumber", []),
            ("eth_estimateGas", [{"to": d.contract, "data": "0x" + unknown_call.hex(), "from": ANVIL_ADDRESSES[1]}]),
            ("eth_getTransactionReceipt", ["0x" + "00" * 32]),
            ("no_such_method", []),
        ])
        assert len(answers) == 4
        assert int(answers[0], 16) == head
        assert isinstance(answers[1], ContractRevert) and answers[1].name == "JobCallNotFound"
        assert answers[2] is None
        assert isinstance(answers[3], RpcError) and "no_such_method" in str(answers[3])
        # each keeps what was asked and answered; a revert is told by its code (3) or its data
        assert answers[1].method == "eth_estimateGas" and answers[1].code == 3
        assert answers[3].method == "no_such_method" and answers[3].code == -32601
        empty, broke = await rpc.batch([
            ("eth_call", [{"to": d.contract, "data": "0xdeadbeef"}, "latest"]),  # no such function: bare revert
            ("eth_estimateGas", [{"to": d.contract, "data": "0x", "from": ANVIL_ADDRESSES[1], "value": hex(2**130)}]),
        ])
        assert isinstance(empty, ContractRevert) and empty.code == 3 and empty.name is None
        assert type(broke) is RpcError and broke.method == "eth_estimateGas" and broke.code not in (None, 3)
        assert await rpc.batch([]) == []
        receipts = await rpc.receipts(["0x" + "00" * 32, "0xnot-a-hash"])
        assert receipts[0] is None and isinstance(receipts[1], RpcError)
    finally:
        await rpc.aclose()


async def test_a_batch_to_an_unreachable_chain_raises_unavailable() -> None:
    rpc = JsonRpc("http://127.0.0.1:9", timeout=2)
    try:
        with pytest.raises(RpcUnavailable):
            await rpc.batch([("eth_blockNumber", [])])
    finally:
        await rpc.aclose()
