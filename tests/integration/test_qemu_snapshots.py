"""More real-QEMU cases: repeated snapshots of a paused guest, snapshots outliving their VM, and the
cost of create not depending on the base image's size (qcow2 overlays)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus

from ..qemu_support import ensure_image, ticks

pytestmark = pytest.mark.qemu
ORIGIN = Origin()


async def tick_of(lc: Lifecycle, vm_id: str) -> int:
    return ticks(await lc.console(vm_id, 65536))


async def ticks_past(lc: Lifecycle, vm_id: str, n: int, timeout: float = 30) -> int:
    """Wait (with a deadline) until the guest's counter passes ``n``; returns the counter."""
    deadline = time.monotonic() + timeout
    while (now := await tick_of(lc, vm_id)) <= n:
        assert time.monotonic() < deadline, f"{vm_id}: tick counter stuck at {now} (wanted > {n})"
        await asyncio.sleep(0.1)
    return now


async def test_a_paused_vm_snapshots_twice_then_resumes(life: Lifecycle) -> None:
    # QEMU 7.2 refuses to migrate a VM left 'postmigrate' by an earlier save: the driver reuses that save
    await life.create_vm("p", None, ORIGIN)
    await life.start_vm("p", ORIGIN)
    await ticks_past(life, "p", 1)
    await life.stop_vm("p", ORIGIN)
    frozen = await tick_of(life, "p")
    first = await life.snapshot_vm("p", "one", ORIGIN)
    second = await life.snapshot_vm("p", "two", ORIGIN)
    assert first.vm_status is second.vm_status is VmStatus.STOPPED
    assert second.size_bytes == first.size_bytes
    await life.delete_snapshot("p", "one", ORIGIN)  # the second must not depend on the first's files
    await life.start_vm("p", ORIGIN)
    await ticks_past(life, "p", frozen)
    third = await life.snapshot_vm("p", "three", ORIGIN)  # a fresh save once the guest has run again
    assert third.vm_status is VmStatus.RUNNING
    restored = await life.restore_vm("p", "two", "p2", ORIGIN)
    assert restored.status is VmStatus.STOPPED
    await life.start_vm("p2", ORIGIN)
    now = await ticks_past(life, "p2", 0)
    assert now >= frozen, (now, frozen)  # carries on from the save, not from zero


async def test_a_snapshot_outlives_its_vm_and_restores_twice(life: Lifecycle, tmp_path: Path) -> None:
    await life.create_vm("src", VmSpec(vcpus=1, mem_mib=128, image=""), ORIGIN)
    await life.start_vm("src", ORIGIN)
    at = await ticks_past(life, "src", 0)
    await life.snapshot_vm("src", "s", ORIGIN)
    await life.destroy_vm("src", ORIGIN)
    for new in ("r1", "r2"):
        view = await life.restore_vm("src", "s", new, ORIGIN)
        assert view.status is VmStatus.RUNNING
        assert await ticks_past(life, new, at) > at
    disks = sorted((tmp_path / "state" / "vms").rglob("disk.qcow2"))
    assert len(disks) == 2 and disks[0].stat().st_ino != disks[1].stat().st_ino  # each its own disk
    await life.stop_vm("r1", ORIGIN)
    frozen = await tick_of(life, "r1")
    other = await tick_of(life, "r2")
    await ticks_past(life, "r2", other + 1)
    assert await tick_of(life, "r1") == frozen  # independent guests


async def test_create_costs_the_same_for_a_4gib_base_image(life: Lifecycle, tmp_path: Path) -> None:
    image_dir = ensure_image()
    big = await asyncio.to_thread(images.build_image, "bench-4g", cache_dir=image_dir, rootfs_size_mib=4096)
    assert Path(big.rootfs).stat().st_size == 4096 * 1024 * 1024
    took: dict[str, float] = {}
    for vm_id, image in (("small", "default"), ("large", "bench-4g")):
        t0 = time.monotonic()
        await life.create_vm(vm_id, VmSpec(vcpus=1, mem_mib=256, image=image), ORIGIN)
        took[vm_id] = time.monotonic() - t0
    disks = [p.stat().st_size for p in (tmp_path / "state" / "vms").rglob("disk.qcow2")]
    assert len(disks) == 2 and max(disks) < 1024 * 1024, disks  # overlays, not copies
    print(f"create: 64 MiB base {took['small']:.3f}s, 4 GiB base {took['large']:.3f}s")
    assert took["large"] < took["small"] * 3 + 0.5, took
    await life.start_vm("large", ORIGIN)  # and the big one really boots
    assert images.READY_LINE in await life.console("large")


async def test_a_save_a_dead_operator_left_running_is_cancelled_when_its_vm_is_re_adopted(tmp_path: Path) -> None:
    """An operator killed while QEMU saves a snapshot's memory leaves that migration running in QEMU;
    reconciliation undoes the snapshot, and the re-adopted QEMU must not refuse the replayed call with
    "There's a migration process in progress" (a crash test's kill -9 found it)."""
    from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
    from microvm_blueprint.runtime.store import Store

    from ..qemu_support import qemu_pids

    image_dir = ensure_image()

    def make() -> tuple[QemuDriver, Lifecycle]:
        driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg"))
        return driver, Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")

    first_driver, first = make()
    await first.create_vm("m", None, ORIGIN)
    await first.start_vm("m", ORIGIN)
    q = first_driver._vm(first._record(first.store.get_vm("m")))  # type: ignore[arg-type]
    # a save as snapshot_vm starts one, slowed to 64 KiB/s so that it is still running when the operator dies
    default = (await q.execute("query-migrate-parameters"))["max-bandwidth"]
    await q.execute("migrate-set-parameters", {"max-bandwidth": 64 << 10})
    await q.execute("stop")
    await q.pass_fd(tmp_path / "cut-short.bin", "snapshot", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    await q.execute("migrate", {"uri": "fd:snapshot"})
    assert (await q.execute("query-migrate"))["status"] in ("setup", "active")
    await first.close(stop_vms=False)  # kill -9 of the operator, as far as QEMU can tell

    second_driver, second = make()
    try:
        assert (await second.reconcile()).startswith("reconciled: 1 vm(s) re-adopted")
        q2 = second_driver._vm(second._record(second.store.get_vm("m")))  # type: ignore[arg-type]
        assert (await q2.execute("query-migrate"))["status"] == "cancelled"
        assert await q2.status() == "running"  # back to what the store says
        await q2.execute("migrate-set-parameters", {"max-bandwidth": default})  # undo the test's slowing
        snap = await second.snapshot_vm("m", "s", ORIGIN)  # refused before the fix
        assert snap.vm_status is VmStatus.RUNNING
        await ticks_past(second, "m", await tick_of(second, "m"))  # and the guest runs on
        await second.destroy_vm("m", ORIGIN)
    finally:
        await second.close(stop_vms=True)
    assert qemu_pids(tmp_path) == set()
