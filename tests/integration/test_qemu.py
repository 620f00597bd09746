"""Real QEMU microvm guests under TCG through the whole lifecycle (DESIGN.md §4, §5, §7)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.errors import ImageError, VmmTimeout
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus
from microvm_blueprint.runtime.store import Store

from ..qemu_support import ensure_image, qemu_pids, ticks
from ..waiting import until

pytestmark = pytest.mark.qemu


async def tick_of(lc: Lifecycle, vm_id: str) -> int:
    return ticks(await lc.console(vm_id, 65536))


async def test_lifecycle_pause_snapshot_restore(life: Lifecycle, tmp_path: Path) -> None:
    o = Origin()
    await life.create_vm("vm-a", None, o)
    assert await life.console("vm-a") == ""  # configured, not running: no guest output yet
    await life.start_vm("vm-a", o)
    assert "MICROVM-READY" in await life.console("vm-a")
    await until(lambda: _gt(life, "vm-a", 1), 30, "the guest clock to tick", every=0.1)
    await life.stop_vm("vm-a", o)
    frozen = await tick_of(life, "vm-a")
    # the paused guest's clock stays frozen: wait until a running guest would have ticked twice
    waited = time.monotonic()
    while time.monotonic() - waited < 2.5:
        assert await tick_of(life, "vm-a") == frozen
        await asyncio.sleep(0.25)
    await life.start_vm("vm-a", o)
    await until(lambda: _gt(life, "vm-a", frozen), 30, "the guest clock to go on after resume", every=0.1)
    snap = await life.snapshot_vm("vm-a", "s1", o)
    assert snap.vm_status is VmStatus.RUNNING and snap.size_bytes > 1_000_000
    at_snapshot = await tick_of(life, "vm-a")
    assert (await life.get_vm("vm-a")).status is VmStatus.RUNNING
    await until(lambda: _gt(life, "vm-a", at_snapshot), 30, "the source to keep running after the snapshot", every=0.1)
    restored = await life.restore_vm("vm-a", "s1", "vm-b", o)
    assert restored.status is VmStatus.RUNNING
    await until(lambda: _gt(life, "vm-b", 0), 30, "the restored guest to tick", every=0.1)
    first = await tick_of(life, "vm-b")
    assert first >= at_snapshot - 1, (first, at_snapshot)  # continues from the snapshot, not from zero
    # its own disk: destroying the source leaves the restored guest running
    disks = {p.resolve() for p in (tmp_path / "state" / "vms").rglob("disk.qcow2")}
    assert len(disks) == 2
    await life.destroy_vm("vm-a", o)
    assert (await life.get_vm("vm-a")).status is VmStatus.DESTROYED
    now = await tick_of(life, "vm-b")
    await until(lambda: _gt(life, "vm-b", now), 30, "the restored guest to keep running", every=0.1)
    assert (await life.get_vm("vm-a")).snapshots == ("s1",)  # snapshots outlive destroy


async def _gt(lc: Lifecycle, vm_id: str, n: int) -> bool:
    return await tick_of(lc, vm_id) > n


async def test_stopped_and_created_snapshots_restore_in_their_status(life: Lifecycle) -> None:
    o = Origin()
    await life.create_vm("c", VmSpec(vcpus=1, mem_mib=128, image=""), o)
    await life.snapshot_vm("c", "cold", o)
    await life.start_vm("c", o)
    await life.stop_vm("c", o)
    await life.snapshot_vm("c", "paused", o)
    v1 = await life.restore_vm("c", "cold", "c-cold", o)
    v2 = await life.restore_vm("c", "paused", "c-paused", o)
    assert (v1.status, v2.status) == (VmStatus.CREATED, VmStatus.STOPPED)
    await life.start_vm("c-paused", o)  # a stopped restore resumes
    await until(lambda: _gt(life, "c-paused", 0), 30, "the resumed restore to tick", every=0.1)
    await life.start_vm("c-cold", o)  # a created restore boots
    assert "MICROVM-READY" in await life.console("c-cold")


async def test_two_vms_are_independent(life: Lifecycle) -> None:
    o = Origin()
    await life.create_vm("one", None, o)
    await life.create_vm("two", None, o)
    await asyncio.gather(life.start_vm("one", o), life.start_vm("two", o))
    await life.stop_vm("one", o)
    frozen = await tick_of(life, "one")
    now = await tick_of(life, "two")
    await until(lambda: _gt(life, "two", now + 1), 30, "the other VM to keep ticking", every=0.1)
    assert await tick_of(life, "one") == frozen


async def test_killed_qemu_is_failed_and_destroy_cleans_up(life: Lifecycle) -> None:
    o = Origin()
    await life.create_vm("victim", None, o)
    await life.start_vm("victim", o)
    pid = life.store.get_vm("victim").handle.pid  # type: ignore[union-attr]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def failed() -> bool:
        return (await life.get_vm("victim")).status is VmStatus.FAILED

    await until(failed, 15, "the killed VM to be marked failed", every=0.1)
    assert "exited unexpectedly" in ((await life.get_vm("victim")).error or "")
    with pytest.raises(Exception, match="failed -> running"):
        await life.start_vm("victim", o)
    await life.destroy_vm("victim", o)


async def test_missing_image_is_a_clear_error_before_spawning(life: Lifecycle) -> None:
    before = qemu_pids(life.state_dir)
    with pytest.raises(ImageError, match="image 'nonexistent' is not built"):
        await life.create_vm("x", VmSpec(vcpus=1, mem_mib=256, image="nonexistent"), Origin())
    assert qemu_pids(life.state_dir) == before
    assert await life.list_vms() == []


async def test_boot_deadline_is_a_failed_start_with_console(tmp_path: Path) -> None:
    image_dir = ensure_image()
    # a deadline no TCG boot of this kernel can meet (it takes seconds): the start must fail, not hang
    driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg", boot_timeout=0.5))
    lc = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    await lc.create_vm("slow", None, Origin())
    with pytest.raises(VmmTimeout, match="ready line"):
        await lc.start_vm("slow", Origin())
    view = await lc.get_vm("slow")
    assert view.status is VmStatus.FAILED and "ready line" in (view.error or "")
    await lc.destroy_vm("slow", Origin())
    await lc.close(stop_vms=True)


async def test_accel_auto_falls_back_to_tcg_here(tmp_path: Path) -> None:
    image_dir = ensure_image()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm: auto trivially picks TCG")
    driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="auto", kvm_probe_timeout=8))
    from microvm_blueprint.runtime import images

    verdict = await driver.accel(images.resolve_image("default", image_dir))
    assert verdict in {"kvm", "tcg"}
    if Path("/sys/module/kvm_pvm").exists():
        assert verdict == "tcg"  # nested PVM cannot boot an ordinary guest
