"""The customer client's batched sends against a real anvil: calls signed beforehand go in, in order,
several to a request; one the node refuses is named, the ones before it stay taken, and the client
reads its nonce from the chain again afterwards."""

from __future__ import annotations

import pytest

from microvm_blueprint.blueprint.client import ClientError, TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import ANVIL_KEYS, Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.environment import Secret

CREATE = JOBS_BY_NAME["create_vm"]


async def test_signed_calls_go_in_batches_in_order(anvil: Anvil) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    customer = TangleCustomer(anvil.rpc_url, d.contract, 0, Secret(ANVIL_KEYS[0]))
    try:
        raws = [await customer.sign(CREATE, encode_args(CREATE.arg_types, [f"vm-{i}"])) for i in range(5)]
        hashes = await customer.send_signed(raws, per_request=2)
        assert len(hashes) == 5 and len(set(hashes)) == 5
        ids = [(await customer.wait_submitted(h)).call_id for h in hashes]
        assert ids == sorted(ids) and len(set(ids)) == 5  # taken in the order signed
        # a plain send after them takes the next nonce
        after = await customer.wait_submitted(await customer.send(CREATE, encode_args(CREATE.arg_types, ["next"])))
        assert after.call_id == ids[-1] + 1
    finally:
        await customer.aclose()


async def test_a_refused_transaction_is_named_and_the_nonce_read_again(anvil: Anvil) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    customer = TangleCustomer(anvil.rpc_url, d.contract, 0, Secret(ANVIL_KEYS[0]))
    try:
        n0 = await customer.rpc.nonce(customer.address)  # the deployment used this key too
        good = await customer.sign(CREATE, encode_args(CREATE.arg_types, ["ok"]))
        await customer.wait_submitted((await customer.send_signed([good]))[0])
        again = await customer.sign(CREATE, encode_args(CREATE.arg_types, ["fine"]))
        # the third is the first one again: the node refuses a nonce already used
        with pytest.raises(ClientError, match="transaction 2 of 3 refused"):
            await customer.send_signed([again, good, again], per_request=3)
        # the first of that batch went in; the client reads its nonce from the chain again
        assert await customer.rpc.nonce(customer.address) == n0 + 2
        last = await customer.wait_submitted(await customer.send(CREATE, encode_args(CREATE.arg_types, ["last"])))
        assert await customer.rpc.nonce(customer.address) == n0 + 3
        assert last.block_number > 0
    finally:
        await customer.aclose()
