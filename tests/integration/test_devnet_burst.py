"""The devnet chain mines a burst of 2,000 transactions sent at once (issue 13, item 7).

anvil 1.7.1 at its default ``--max-transactions`` (1,000) stalled for good under such a burst, its
memory growing ~45 MB/s: with 1,000 or more ready transactions its node loop queued the same batch
again on every wake while a block was mined, then mined the stale batches as empty blocks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.client import TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import ANVIL_KEYS, Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.environment import Secret

from ..waiting import until

pytestmark = pytest.mark.chain

BURST = 2_000
RSS_BOUND_MIB = 1_024  # ~70 MiB after a burst here; the stall passed 3 GiB within a minute


def anvil_pid(wrapper_pid: int) -> int:
    """The anvil binary under the npm wrapper (``node .../anvil``) that :class:`Anvil` spawns."""
    pending = [wrapper_pid]
    while pending:
        pid = pending.pop()
        if Path(f"/proc/{pid}/comm").read_text().strip() == "anvil":
            return pid
        for task in Path(f"/proc/{pid}/task").iterdir():
            pending += [int(c) for c in (task / "children").read_text().split()]
    raise AssertionError(f"no anvil process under {wrapper_pid}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_the_devnet_chain_mines_a_burst_of_2000_transactions(anvil: Anvil) -> None:
    assert anvil.child is not None
    pid = anvil_pid(anvil.child.pid)
    deployment = await deploy_dev_tangle(anvil.rpc_url)
    customer = TangleCustomer(anvil.rpc_url, deployment.contract, deployment.service_id, Secret(ANVIL_KEYS[0]))
    try:
        job = JOBS_BY_NAME["start_vm"]
        first = await customer.rpc.nonce(customer.address)
        raws = [await customer.sign(job, encode_args(job.arg_types, [f"vm-{i}"])) for i in range(BURST)]
        height = await customer.rpc.block_number()
        rss_before = rss_mib(pid)
        started = time.monotonic()
        hashes = await customer.send_signed(raws)  # JSON-RPC batches of 50, as fast as anvil takes them
        assert len(hashes) == BURST

        async def all_mined() -> bool:
            mined = await customer.rpc.call("eth_getTransactionCount", [customer.address, "latest"])
            return int(str(mined), 16) == first + BURST

        await until(all_mined, 180, f"{BURST} transactions mined", every=0.2)
        seconds = time.monotonic() - started
        rss_after = rss_mib(pid)
        receipts = await customer.rpc.batch([("eth_getTransactionReceipt", [h]) for h in hashes])
        assert all(r is not None and int(str(r["status"]), 16) == 1 for r in receipts)
        blocks = await customer.rpc.block_number() - height
        print(f"burst of {BURST}: mined in {seconds:.1f} s in {blocks} blocks; anvil RSS "
              f"{rss_before:.0f} -> {rss_after:.0f} MiB")
        assert rss_after < RSS_BOUND_MIB, (rss_before, rss_after)
        # at most a block per transaction: the stall's signature was thousands of empty blocks
        assert blocks <= BURST, blocks
    finally:
        await customer.aclose()
