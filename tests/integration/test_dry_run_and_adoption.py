"""--dry-run runs jobs without sending anything; VMs outlive the operator and are re-adopted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmStatus
from microvm_blueprint.runtime.store import Store
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, Anvil, deploy_dev_tangle
from microvm_blueprint.tangle.rpc import JsonRpc

from ..qemu_support import ensure_image, qemu_pids, ticks
from .conftest import HarnessFactory, api_get


@pytest.mark.chain
async def test_dry_run_sends_nothing(anvil: Anvil, harness_for: HarnessFactory) -> None:
    d = await deploy_dev_tangle(anvil.rpc_url)
    h = await harness_for(d)
    op = await h.start_operator(env={"DRY_RUN": "true"})
    job = JOBS_BY_NAME["create_vm"]
    sub = await h.customer.submit(job, encode_args(job.arg_types, ["dry"]))
    deadline = asyncio.get_running_loop().time() + 30
    while (await api_get(f"{op.api_url}/jobs/{sub.call_id}"))[1].get("status") != "done":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    while not op.operator.runner.consumer.idle:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    rpc = JsonRpc(anvil.rpc_url)
    try:
        assert await rpc.nonce(ANVIL_ADDRESSES[1]) == 1  # only its registration, made at deploy time
    finally:
        await rpc.aclose()
    assert (await api_get(f"{op.api_url}/vms/dry"))[1]["status"] == "created"


@pytest.mark.qemu
async def test_qemu_vm_outlives_the_operator_and_is_readopted(tmp_path: Path) -> None:
    image_dir = ensure_image()

    def make() -> Lifecycle:
        driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg", boot_timeout=120))
        return Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")

    first = make()
    await first.create_vm("keep", None, Origin())
    await first.start_vm("keep", Origin())
    await first.close(stop_vms=False)  # the operator goes away; the guest does not
    assert len(qemu_pids(tmp_path)) == 1
    second = make()
    summary = await second.reconcile()
    assert summary.startswith("reconciled: 1 vm(s) re-adopted")
    assert "MICROVM-READY" in await second.console("keep")  # the console survived the restart
    before = ticks(await second.console("keep"))
    deadline = time.monotonic() + 30
    while ticks(await second.console("keep")) <= before:
        assert time.monotonic() < deadline, "the re-adopted guest stopped ticking"
        await asyncio.sleep(0.2)
    await second.stop_vm("keep", Origin())  # and it is fully controllable again
    assert (await second.get_vm("keep")).status is VmStatus.STOPPED
    await second.destroy_vm("keep", Origin())
    await second.close(stop_vms=True)
    assert qemu_pids(tmp_path) == set()
