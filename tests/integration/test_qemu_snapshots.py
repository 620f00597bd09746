"""More real-QEMU cases: repeated snapshots of a paused guest, snapshots outliving their VM, and the
cost of create not depending on the base image's size (qcow2 overlays)."""

from __future__ import annotations

import asyncio
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
