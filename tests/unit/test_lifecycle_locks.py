"""Per-VM locks: calls on one VM still run one at a time, and the lock table holds only VMs in use
(it does not keep a lock for every VM ever touched)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmRecord, VmStatus
from microvm_blueprint.runtime.store import Store

from ..waiting import until


class GatedDriver(InMemoryDriver):
    """The in-memory VMM, whose pause and resume wait for ``gate`` (and count who is inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.inside = 0
        self.most_inside = 0
        self.order: list[str] = []

    async def _through_gate(self, what: str) -> None:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await asyncio.wait_for(self.gate.wait(), 10)
            self.order.append(what)
        finally:
            self.inside -= 1

    async def pause(self, vm: VmRecord) -> None:
        await self._through_gate("pause")
        await super().pause(vm)

    async def resume(self, vm: VmRecord) -> None:
        await self._through_gate("resume")
        await super().resume(vm)


@pytest.fixture
def life(tmp_path: Path) -> Lifecycle:
    return Lifecycle(GatedDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")


async def test_the_lock_table_is_empty_after_many_vms(life: Lifecycle) -> None:
    call = iter(range(1, 10_000))
    for i in range(300):
        vm_id = f"vm-{i}"
        await life.create_vm(vm_id, None, Origin(next(call)))
        await life.snapshot_vm(vm_id, "s", Origin(next(call)))
        await life.restore_vm(vm_id, "s", f"copy-{i}", Origin(next(call)))
        await life.destroy_vm(vm_id, Origin(next(call)))
        await life.destroy_vm(f"copy-{i}", Origin(next(call)))
        assert len(life._locks) == 0
    with pytest.raises(Exception, match="not found"):  # a failed call leaves nothing behind either
        await life.start_vm("ghost", Origin(next(call)))
    assert life._locks == {}
    assert len(await life.list_vms()) == 600


async def test_calls_on_one_vm_are_still_serialised(life: Lifecycle) -> None:
    driver = life.driver
    assert isinstance(driver, GatedDriver)
    await life.create_vm("vm", None, Origin(1))
    driver.gate.set()
    await life.start_vm("vm", Origin(2))  # boot: not gated
    driver.gate.clear()

    stop = asyncio.create_task(life.stop_vm("vm", Origin(3)))
    await until(lambda: driver.inside == 1, what="stop inside the driver")
    start = asyncio.create_task(life.start_vm("vm", Origin(4)))
    other = asyncio.create_task(life.create_vm("other", None, Origin(5)))  # another VM is not held up
    await asyncio.wait_for(other, 10)
    await until(lambda: "vm" in life._locks and life._locks["vm"].users == 2, what="start waiting on the lock")
    assert not start.done() and driver.inside == 1  # the second call waits outside the driver
    assert (await life.get_vm("vm")).status is VmStatus.RUNNING

    driver.gate.set()
    await asyncio.wait_for(asyncio.gather(stop, start), 10)
    assert driver.most_inside == 1
    assert driver.order == ["pause", "resume"]
    assert [h.action for h in (await life.get_vm("vm")).history] == ["create", "start", "stop", "start"]
    assert life._locks == {}


async def test_a_cancelled_waiter_gives_its_place_back(life: Lifecycle) -> None:
    driver = life.driver
    assert isinstance(driver, GatedDriver)
    await life.create_vm("vm", None, Origin(1))
    driver.gate.set()
    await life.start_vm("vm", Origin(2))
    driver.gate.clear()

    stop = asyncio.create_task(life.stop_vm("vm", Origin(3)))
    await until(lambda: driver.inside == 1, what="stop inside the driver")
    waiter = asyncio.create_task(life.destroy_vm("vm", Origin(4)))
    await until(lambda: life._locks["vm"].users == 2, what="destroy waiting on the lock")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert life._locks["vm"].users == 1  # the holder keeps its lock; the waiter is gone
    driver.gate.set()
    await asyncio.wait_for(stop, 10)
    assert life._locks == {}
    assert (await life.get_vm("vm")).status is VmStatus.STOPPED
    assert life.store.get_call(4) is None  # the cancelled call was neither applied nor recorded
