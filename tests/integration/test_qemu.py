"""Real QEMU microvm guests under TCG through the whole lifecycle (DESIGN.md §4, §5, §7)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.errors import ImageError, VmError, VmmTimeout
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


async def test_a_frozen_qemu_during_stop_is_a_vmm_error_and_a_failed_vm(tmp_path: Path) -> None:
    """A QMP failure inside stop_vm is a VmmError (not a foreign error that becomes "internal error"),
    and the core's ``_after_driver_error`` marks the VM failed because its VMM no longer answers."""
    image_dir = ensure_image()
    driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg", boot_timeout=120, qmp_timeout=3))
    lc = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    o = Origin(call_id=7)
    try:
        await lc.create_vm("frozen", None, Origin())
        await lc.start_vm("frozen", Origin())
        pid = lc.store.get_vm("frozen").handle.pid  # type: ignore[union-attr]
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # QEMU stops answering QMP, as a hung or dying VMM does
        try:
            with pytest.raises(VmmTimeout, match="qemu did not answer stop") as info:
                await lc.stop_vm("frozen", o)
            assert isinstance(info.value, VmError)
            view = await lc.get_vm("frozen")
            assert view.status is VmStatus.FAILED, view  # _after_driver_error ran: the VMM is not alive
            assert "did not answer stop" in (view.error or "")
            done = lc.store.get_call(7)  # the failure is the call's recorded outcome, for replays
            assert done is not None and not done.ok and "did not answer stop" in (done.error or "")
        finally:
            os.kill(pid, signal.SIGCONT)
        await lc.destroy_vm("frozen", Origin())
    finally:
        await lc.close(stop_vms=True)
    assert qemu_pids(tmp_path) == set()


async def _cont_and_drain_the_console(workdir: Path, timeout: float) -> str:
    """What an operator killed mid-start had done: ``cont``, and read the guest's output out of QEMU
    (until its ready line) without ever writing it down."""
    dirfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    qmp = QMPClient("crashed-operator")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/qmp.sock")
        await asyncio.wait_for(qmp.connect(sock), 10)
        await asyncio.wait_for(qmp.execute("cont"), 10)
        seen: list[str] = []

        async def drained_ready() -> bool:
            args = {"device": "console", "size": 65536, "format": "utf8"}
            seen.append(str(await asyncio.wait_for(qmp.execute("ringbuf-read", args), 10)))
            return images.READY_LINE in "".join(seen)

        await until(drained_ready, timeout, "the guest to print its ready line", every=0.1)
        return "".join(seen)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), 5)
        sock.close()
        os.close(dirfd)


async def test_console_output_survives_an_operator_killed_before_writing_it(tmp_path: Path) -> None:
    """Guest output an operator had read but not yet kept when it died is not lost: the replayed
    start finds the ready line the guest printed, instead of waiting out its boot timeout."""
    image_dir = ensure_image()

    def make(boot_timeout: float) -> Lifecycle:
        driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg", boot_timeout=boot_timeout))
        return Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")

    first = make(120)
    await first.create_vm("keep", None, Origin())
    workdir = Path(first.store.get_vm("keep").workdir)  # type: ignore[union-attr]
    await first.close(stop_vms=False)  # the operator is gone; its QEMU is not
    # the guest prints its ready line once: the new operator must find it, not wait for it (20 s is
    # ample to read a file, and short of a wait for a line that will never come again)
    second = make(20)
    try:
        drained = await _cont_and_drain_the_console(workdir, 120)
        assert images.READY_LINE in drained
        assert (await second.reconcile()).startswith("reconciled: 1 vm(s) re-adopted")
        assert (await second.get_vm("keep")).status is VmStatus.CREATED  # the start was never recorded
        view = await second.start_vm("keep", Origin())  # the replayed start
        assert view.status is VmStatus.RUNNING
        assert drained in await second.console("keep")  # all of what the dead operator had read
        await second.destroy_vm("keep", Origin())
    finally:
        with contextlib.suppress(VmError):  # a failed test leaves the VM; its QEMU is found by pid file
            await second.destroy_vm("keep", Origin())
        await second.close(stop_vms=True)
    assert qemu_pids(tmp_path) == set()
