"""A full host disk under a running guest (DESIGN.md §9, issue #13 item 6), with a real `debian` guest
under TCG: the operator's DATA_DIR (store and VM folders) is a 200 MiB tmpfs and the guest's disk is far
larger, so the guest's writes outgrow the qcow2 overlay's room on the host.

What must hold: the guest gets an I/O error (``werror=report,rerror=report``) and keeps running: QEMU is
never paused in ``io-error`` behind the API's back; the VM view shows the disk error while it says
``running``; SSH answers; and once the host has room again the guest writes again. Every wait has a
deadline; the console is kept as evidence when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.adapters.qemu.argv import CONSOLE_LOG
from microvm_blueprint.runtime.errors import VmError
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import NetworkMode, NetworkSettings, Origin, VmStatus
from microvm_blueprint.runtime.store import Store

from ..conftest import tmpfs_dir
from ..qemu_support import qemu_pids
from ..waiting import until
from .test_guest_access import BOOT_TIMEOUT, _debian_image, _keygen, host_port, ssh, ssh_ok, submit_job8, wait_ssh

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

TMPFS_MIB = 200
DISK_MIB = 2048  # the guest's disk: far more than the tmpfs can hold of its overlay
WRITE_DEADLINE = 600.0  # dd of 400 MiB from /dev/urandom under TCG on a loaded 2-core machine
ERROR_DEADLINE = 300.0
# a raw write far past anything the guest's file system has touched: its clusters are new to the overlay,
# so it needs room on the host (the root file system itself goes read-only once ext4's journal write fails)
def raw_write(at_mib: int) -> str:
    return ("dd if=/dev/urandom of=/dev/shm/chunk bs=1M count=8 2>/dev/null && "
            f"dd if=/dev/shm/chunk of=/dev/vda bs=1M seek={at_mib} oflag=direct conv=fsync 2>&1 && "
            f"dd if=/dev/vda of=/dev/shm/back bs=1M skip={at_mib} count=8 iflag=direct 2>/dev/null && "
            "cmp /dev/shm/chunk /dev/shm/back && echo raw-write-ok")


RAW_WRITE = raw_write(1900)


def _fill(path: Path) -> None:
    """Take every free byte of the file system of ``path`` (a file there, grown until the file system says no)."""
    with path.open("wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        for size in (1 << 20, 1 << 12):
            chunk = chunk[:size]
            with contextlib.suppress(OSError):
                while True:
                    f.write(chunk)


def _grow_tmpfs(path: Path, size: str) -> None:
    """Give the tmpfs at ``path`` room again (a remount with a larger size keeps its files)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"remount,size={size}", "tmpfs", str(path)], check=True, timeout=30)


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_dir(tmp_path, f"{TMPFS_MIB}m") as mnt:
        yield mnt


class Operator:
    def __init__(self, data: Path, image_dir: Path) -> None:
        self.driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg", boot_timeout=BOOT_TIMEOUT))
        self.life = Lifecycle(self.driver, Store(data / "runtime.sqlite3"), state_dir=data / "state",
                              network=NetworkSettings(mode=NetworkMode.USER), min_free_mib=0)

    async def boot(self, vm_id: str, tmp_path: Path) -> tuple[Path, int]:
        """A running ``debian`` VM with a disk far larger than the tmpfs, reachable over SSH: the key and
        the host port of its SSH."""
        key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
        await submit_job8(self.life, vm_id, 1, 512, DISK_MIB, "debian", [key.with_suffix(".pub").read_text().strip()],
                          [22])
        port = host_port(self.life, vm_id, 22)
        await self.life.start_vm(vm_id, Origin())
        await wait_ssh(key, port)
        return key, port

    async def qemu_status(self, vm_id: str) -> str:
        """QEMU's own run state (QMP ``query-status``), not what the store says."""
        stored = self.life.store.get_vm(vm_id)
        assert stored is not None
        return await self.driver.vmm_status(self.life._record(stored))


@pytest.fixture
async def operator(small_data_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Operator]:
    op = Operator(small_data_dir, _debian_image())
    yield op
    life = op.life
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:  # keep the evidence outside the tmpfs, which goes away
        for stored in life.store.list_vms():
            log = Path(stored.workdir) / CONSOLE_LOG
            if log.exists():
                text = log.read_text(errors="replace")[-12000:]
                (tmp_path / f"console-{stored.vm_id}.log").write_text(text)
                print(f"--- console of {stored.vm_id} ---\n{text}")
    for vm in await life.list_vms():
        if vm.status is not VmStatus.DESTROYED:
            with contextlib.suppress(VmError):
                await life.destroy_vm(vm.vm_id, Origin())
    await life.close(stop_vms=True)
    assert qemu_pids(tmp_path) == set(), "a QEMU process was left behind"


async def test_a_full_host_disk_reaches_the_guest_and_the_view_and_the_guest_runs_on(
        operator: Operator, small_data_dir: Path, tmp_path: Path) -> None:
    life = operator.life
    key, port = await operator.boot("full-1", tmp_path)
    assert await operator.qemu_status("full-1") == "running"
    view = await life.get_vm("full-1")
    assert view.status is VmStatus.RUNNING and view.error is None

    # ---- the guest writes more than the host has room for -------------------------------------------
    writer = asyncio.create_task(ssh(key, port, "dd if=/dev/urandom of=/big bs=1M count=400 conv=fsync",
                                     timeout=WRITE_DEADLINE))
    try:
        async def disk_error_shown() -> bool:
            v = await life.get_vm("full-1")
            return v.error is not None

        await until(disk_error_shown, ERROR_DEADLINE, "the disk error in the VM view", every=0.5)
        view = await life.get_vm("full-1")
        assert view.status is VmStatus.RUNNING, view
        assert view.error is not None and "disk" in view.error and "I/O error" in view.error, view.error
        assert "No space left on device" in view.error, view.error  # QEMU said why: no room on the host
        # QEMU runs on: the error went to the guest, it was not paused in io-error
        assert await operator.qemu_status("full-1") == "running"
        result = await writer
    finally:
        if not writer.done():
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
    assert result.returncode != 0, f"dd succeeded on a full host disk: {result.stdout}{result.stderr}"
    assert "Input/output error" in result.stderr or "Read-only file system" in result.stderr, result.stderr
    assert await operator.qemu_status("full-1") == "running"
    view = await life.get_vm("full-1")
    assert view.status is VmStatus.RUNNING, view
    assert view.error is not None and "No space left on device" in view.error, view
    assert (await ssh_ok(key, port, "echo alive")).strip() == "alive"
    # while the host is still full, a write to fresh clusters fails in the guest (and QEMU runs on)
    still_full = await ssh(key, port, RAW_WRITE, timeout=120)
    assert still_full.returncode != 0 and "raw-write-ok" not in still_full.stdout, still_full
    assert await operator.qemu_status("full-1") == "running"

    # ---- the host has room again: the guest writes again -----------------------------------------------
    _grow_tmpfs(small_data_dir, "1g")
    out = await ssh_ok(key, port, RAW_WRITE, timeout=120)
    assert "raw-write-ok" in out, out  # written to the disk, and read back from it the same
    assert await operator.qemu_status("full-1") == "running"
    assert (await life.get_vm("full-1")).status is VmStatus.RUNNING


async def test_a_disk_error_stays_through_stop_and_start_and_a_second_one_is_seen(
        operator: Operator, small_data_dir: Path, tmp_path: Path) -> None:
    """The error stays in the view through a stop and a start while the host is still full, is cleared by
    a start once the host has room, and a second disk error after that is seen again (QEMU's
    ``BLOCK_IO_ERROR`` watch used to report only the first of a QEMU process, and a stop cleared the view)."""
    life = operator.life
    key, port = await operator.boot("full-2", tmp_path)

    async def disk_error_shown() -> bool:
        return (await life.get_vm("full-2")).error is not None

    filler = small_data_dir / "filler"
    # ---- the host is full (filled from the host side: quicker than the guest filling it) ---------------
    await asyncio.to_thread(_fill, filler)
    full = await ssh(key, port, raw_write(1900), timeout=120)
    assert full.returncode != 0 and "raw-write-ok" not in full.stdout, full
    await until(disk_error_shown, ERROR_DEADLINE, "the first disk error in the VM view", every=0.5)
    first = (await life.get_vm("full-2")).error
    assert first is not None and "No space left on device" in first, first
    # room for the store's own few pages, not for the guest's 8 MiB of fresh clusters (nor the 1 MiB a start
    # needs to count the host as having room again, with MICROVM_MIN_FREE_MIB=0)
    os.truncate(filler, max(0, filler.stat().st_size - (256 << 10)))

    # a stop and a start while the host is still full: the error stays
    view = await life.stop_vm("full-2", Origin())
    assert view.status is VmStatus.STOPPED and view.error == first, view
    view = await life.start_vm("full-2", Origin())
    assert view.status is VmStatus.RUNNING and view.error == first, view

    # ---- the host has room again: a stop and a start clear it ----------------------------------------------
    filler.unlink()
    assert (await ssh_ok(key, port, raw_write(1800), timeout=120)).strip().endswith("raw-write-ok")
    assert (await life.get_vm("full-2")).error == first  # no start yet: nothing cleared it
    await life.stop_vm("full-2", Origin())
    view = await life.start_vm("full-2", Origin())
    assert view.status is VmStatus.RUNNING and view.error is None, view

    # ---- full again: the second error is seen too ------------------------------------------------------------
    try:
        await asyncio.to_thread(_fill, filler)
        again = await ssh(key, port, raw_write(1700), timeout=120)
        assert again.returncode != 0 and "raw-write-ok" not in again.stdout, again
        await until(disk_error_shown, ERROR_DEADLINE, "the second disk error in the VM view", every=0.5)
        second = (await life.get_vm("full-2")).error
        assert second is not None and "No space left on device" in second, second
        assert await operator.qemu_status("full-2") == "running"
    finally:
        filler.unlink(missing_ok=True)
    assert (await life.get_vm("full-2")).error == second  # kept (and now written) once the store has room
    assert (await ssh_ok(key, port, "echo alive")).strip() == "alive"
