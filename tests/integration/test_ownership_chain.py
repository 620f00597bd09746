"""DESIGN.md §9 on a real chain: the service owner comes from ``getService`` (the dev contract and the
real Tangle deployment), and a second permitted caller cannot touch the first one's VMs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from eth_abi import encode
from eth_utils import keccak

from microvm_blueprint.blueprint.client import Outcome, TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, ANVIL_KEYS, Anvil, deploy_dev_tangle, send_unlocked
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.rpc import ContractRevert, JsonRpc
from microvm_blueprint.tangle.service import ServiceOwner, read_service_owner

from ..waiting import until
from .conftest import HarnessFactory, RealTangleChain, api_get

pytestmark = pytest.mark.chain


async def test_the_service_owner_is_read_from_the_real_tangle(real_tangle: RealTangleChain) -> None:
    rpc = JsonRpc(real_tangle.rpc_url)
    try:
        assert (await read_service_owner(rpc, real_tangle.tangle, real_tangle.service_id)).lower() == (
            real_tangle.customer.lower()  # the replayed deployment's service was requested by key #0
        )
    finally:
        await rpc.aclose()


async def test_a_second_caller_cannot_touch_the_first_ones_vms(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    rpc = JsonRpc(anvil.rpc_url)
    try:
        assert await read_service_owner(rpc, d.contract, d.service_id) == ANVIL_ADDRESSES[0]
        with pytest.raises(ContractRevert):
            await read_service_owner(rpc, d.contract, 99)
        unknown = ServiceOwner(rpc, d.contract, 99)
        await unknown.run(asyncio.Event())  # no such service: settled, no service owner
        assert unknown.get() is None
        # anvil key #2 becomes a permitted caller of the service (a second customer)
        sel = keccak(text="addPermittedCaller(uint64,address)")[:4]
        await send_unlocked(rpc, ANVIL_ADDRESSES[0], d.contract,
                            sel + encode(["uint64", "address"], [d.service_id, ANVIL_ADDRESSES[2]]))
    finally:
        await rpc.aclose()
    h = await harness_for(d)  # its customer is key #0: the service owner
    op = await h.start_operator()
    await until(lambda: op.operator.provider._service_owner() is not None, what="the service owner")
    other = TangleCustomer(d.rpc_url, d.contract, d.service_id, Secret(ANVIL_KEYS[2]))
    try:
        async def as_other(name: str, *args: Any) -> Outcome:
            job = JOBS_BY_NAME[name]
            sub = await other.submit(job, encode_args(job.arg_types, list(args)))
            return await other.wait_result(sub, timeout=60, api_url=op.api_url)

        assert (await as_other("create_vm", "theirs")).result is True
        assert (await h.job("create_vm", "owners")).result is True
        refused = await as_other("destroy_vm", "owners")
        assert refused.result is None and refused.job_status is not None
        assert refused.job_status["status"] == "failed"
        assert refused.job_status["error"] == "vm 'owners' belongs to another caller"
        cloned = await as_other("restore_vm", "owners", "s", "clone")
        assert cloned.job_status is not None and cloned.job_status["error"] == "vm 'owners' belongs to another caller"
        # the service owner may act on the other customer's VM
        assert (await h.job("start_vm", "theirs")).result is True
        _, view = await api_get(f"{op.api_url}/vms/owners")
        assert view["status"] == "created" and view["owner"] == ANVIL_ADDRESSES[0]
        assert [(e["action"], e["caller"]) for e in view["history"]][1:] == [
            ("refused:destroy_vm", ANVIL_ADDRESSES[2]), ("refused:restore_vm", ANVIL_ADDRESSES[2]),
        ]
        _, theirs = await api_get(f"{op.api_url}/vms/theirs")
        assert (theirs["status"], theirs["owner"]) == ("running", ANVIL_ADDRESSES[2])
    finally:
        await other.aclose()
