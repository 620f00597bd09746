"""Per-VM disk I/O limits (``MICROVM_DISK_BPS``/``_IOPS``: settings, validation, QEMU's argv) and the rule
for a guest disk error in the VM view: it stays through stop and start until a start finds the host with
room again, and an error after that is shown again (README, Security model: Disks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.operator import make_driver
from microvm_blueprint.blueprint.settings import OperatorSettings, ProviderKind
from microvm_blueprint.errors import ConfigError
from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.adapters.qemu import QemuDriver
from microvm_blueprint.runtime.adapters.qemu import argv as qemu
from microvm_blueprint.runtime.driver import ExitListener
from microvm_blueprint.runtime.errors import InvalidInput
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import (
    DEFAULT_DISK_BPS,
    DEFAULT_DISK_IOPS,
    MAX_DISK_RATE,
    DiskLimits,
    Origin,
    VmRecord,
    VmStatus,
)
from microvm_blueprint.runtime.store import Store

# ---- settings -----------------------------------------------------------------------------------------


def test_disk_limits_default_to_a_cloud_disks_baseline(tmp_path: Path) -> None:
    s = OperatorSettings.from_env({}, tmp_path)
    assert s.disk_limits == DiskLimits(bps=125 * 1024 * 1024, iops=3000)
    assert (DEFAULT_DISK_BPS, DEFAULT_DISK_IOPS) == (131_072_000, 3000)
    s = OperatorSettings.from_env({"MICROVM_DISK_BPS": "10485760", "MICROVM_DISK_IOPS": " 200 "}, tmp_path)
    assert s.disk_limits == DiskLimits(bps=10 * 1024 * 1024, iops=200)
    off = OperatorSettings.from_env({"MICROVM_DISK_BPS": "0", "MICROVM_DISK_IOPS": "0"}, tmp_path).disk_limits
    assert off == DiskLimits(0, 0) and not off.limited


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("MICROVM_DISK_BPS", "-1", "MICROVM_DISK_BPS='-1' must be between 0 and 1000000000000000"),
        ("MICROVM_DISK_IOPS", "-5", "MICROVM_DISK_IOPS='-5' must be between 0 and 1000000000000000"),
        ("MICROVM_DISK_BPS", "100M", "MICROVM_DISK_BPS='100M' is not an integer"),
        ("MICROVM_DISK_BPS", "1.5", "MICROVM_DISK_BPS='1.5' is not an integer"),
        ("MICROVM_DISK_IOPS", "lots", "MICROVM_DISK_IOPS='lots' is not an integer"),
        ("MICROVM_DISK_BPS", str(MAX_DISK_RATE + 1), "must be between 0 and 1000000000000000"),
        ("MICROVM_DISK_IOPS", "9" * 30, "must be between 0 and 1000000000000000"),
    ],
)
def test_a_bad_disk_limit_is_a_config_error_naming_it(tmp_path: Path, name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        OperatorSettings.from_env({name: raw}, tmp_path)
    assert not isinstance(err.value, InvalidInput) and "\n" not in str(err.value)


def test_disk_limits_built_by_hand_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=re.escape("MICROVM_DISK_BPS=-1 must be between 0")):
        DiskLimits(bps=-1)
    with pytest.raises(ConfigError, match="MICROVM_DISK_IOPS=True is not an integer"):
        DiskLimits(iops=True)
    with pytest.raises(ConfigError, match=re.escape(f"MICROVM_DISK_IOPS={MAX_DISK_RATE * 2} must be between")):
        DiskLimits(iops=MAX_DISK_RATE * 2)
    assert DiskLimits(bps=MAX_DISK_RATE, iops=0).limited


def test_the_qemu_driver_gets_the_operators_disk_limits(tmp_path: Path) -> None:
    s = OperatorSettings.from_env({"MICROVM_PROVIDER": "qemu", "MICROVM_DISK_IOPS": "77"}, tmp_path)
    assert s.provider is ProviderKind.QEMU
    driver = make_driver(s)
    assert isinstance(driver, QemuDriver)
    assert driver.settings.disk_limits == DiskLimits(bps=DEFAULT_DISK_BPS, iops=77)


def test_the_firecracker_driver_gets_the_operators_disk_limits(tmp_path: Path) -> None:
    from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver
    from microvm_blueprint.runtime.adapters.firecracker.driver import rate_limiter

    s = OperatorSettings.from_env({"MICROVM_PROVIDER": "firecracker", "MICROVM_DISK_BPS": "1048576",
                                   "MICROVM_DISK_IOPS": "0"}, tmp_path)
    driver = make_driver(s)
    assert isinstance(driver, FirecrackerDriver)
    assert driver.settings.disk_limits == DiskLimits(bps=1 << 20, iops=0)
    assert rate_limiter(DiskLimits(bps=5, iops=7)) == {"bandwidth": {"size": 5, "refill_time": 1000},
                                                       "ops": {"size": 7, "refill_time": 1000}}
    assert rate_limiter(DiskLimits(bps=0, iops=7)) == {"ops": {"size": 7, "refill_time": 1000}}


# ---- QEMU's argv ----------------------------------------------------------------------------------------


def _manifest(tmp: Path) -> images.ImageManifest:
    folder = tmp / "img"
    folder.mkdir()
    files = {name: folder / name for name in ("bzImage", "vmlinux", "initramfs", "rootfs.ext4")}
    for path in files.values():
        path.write_bytes(b"x")
    return images.ImageManifest(
        name="default", root=str(folder), bzimage=str(files["bzImage"]), vmlinux=str(files["vmlinux"]),
        initramfs=str(files["initramfs"]), rootfs=str(files["rootfs.ext4"]), rootfs_size_mib=1,
        kernel_package="k", kernel_version="6.1", busybox_version="1", cmdline="console=ttyS0",
        ready_line=images.READY_LINE, created_at=1.0, sha256={},
    )


def _drives(argv: list[str]) -> dict[str, str]:
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    return {d.split(",", 1)[0]: d for d in drives}


def test_only_the_customer_disk_is_throttled(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    limits = DiskLimits(bps=50 * 1024 * 1024, iops=1500)
    argv = qemu.qemu_argv(qemu.QemuSettings(disk_limits=limits), manifest, vcpus=1, mem_mib=256, accel="tcg",
                          config_drive=True)
    drives = _drives(argv)
    root = drives["id=root"].split(",")
    assert "throttling.bps-total=52428800" in root and "throttling.iops-total=1500" in root, root
    assert "werror=report" in root and "rerror=report" in root  # the disk errors stay reported
    assert "throttling" not in drives["id=cidata"]  # the config drive, read once at boot, has none
    # the defaults throttle; 0 turns each limit off on its own; both 0: no throttling option at all
    default = _drives(qemu.qemu_argv(qemu.QemuSettings(), manifest, vcpus=1, mem_mib=256, accel="tcg"))["id=root"]
    assert f"throttling.bps-total={DEFAULT_DISK_BPS}" in default and f"iops-total={DEFAULT_DISK_IOPS}" in default
    only_iops = qemu.throttling(DiskLimits(bps=0, iops=10))
    assert only_iops == ",throttling.iops-total=10"
    assert qemu.throttling(DiskLimits(bps=0, iops=0)) == ""
    off = qemu.qemu_argv(qemu.QemuSettings(disk_limits=DiskLimits(0, 0)), manifest, vcpus=1, mem_mib=256, accel="tcg")
    assert "throttling" not in _drives(off)["id=root"]


# ---- a disk error in the view ---------------------------------------------------------------------------


class DiskErrorDriver(InMemoryDriver):
    """The in-memory VMM with a disk-error listener, as the QEMU driver has (its ``BLOCK_IO_ERROR`` watch)."""

    def __init__(self) -> None:
        super().__init__()
        self.error_listener: ExitListener | None = None
        self.error_during_resume: str | None = None

    def set_error_listener(self, listener: ExitListener) -> None:
        self.error_listener = listener

    def disk_error(self, vm_id: str, text: str) -> None:
        assert self.error_listener is not None
        self.error_listener(vm_id, text)

    async def resume(self, vm: VmRecord) -> None:
        await super().resume(vm)
        if self.error_during_resume is not None:
            self.disk_error(vm.vm_id, self.error_during_resume)


FULL = "guest disk error: write on root failed (No space left on device); the guest saw an I/O error"
NO_ROOM = 1 << 40  # MiB no host has free: "the disk is still full"


async def test_a_disk_error_stays_until_a_start_finds_room_and_a_later_one_shows_again(tmp_path: Path) -> None:
    driver = DiskErrorDriver()
    life = Lifecycle(driver, Store(tmp_path / "s.db"), state_dir=tmp_path / "st", min_free_mib=0)
    o = Origin()
    await life.create_vm("vm", None, o)
    await life.start_vm("vm", o)
    driver.disk_error("vm", FULL)
    assert (await life.get_vm("vm")).error == FULL

    # a stop keeps it (it used to clear it: the error was gone while the disk was still full)
    view = await life.stop_vm("vm", o)
    assert view.status is VmStatus.STOPPED and view.error == FULL
    # a start while the host has no room keeps it too
    life.min_free_mib = NO_ROOM
    view = await life.start_vm("vm", o)
    assert view.status is VmStatus.RUNNING and view.error == FULL
    # a start once the host has room clears it
    await life.stop_vm("vm", o)
    life.min_free_mib = 0
    view = await life.start_vm("vm", o)
    assert view.status is VmStatus.RUNNING and view.error is None
    # ... and the next error is shown again
    second = FULL.replace("write", "read")
    driver.disk_error("vm", second)
    assert (await life.get_vm("vm")).error == second
    # an error reported during a start is news: it stays even though the host has room
    await life.stop_vm("vm", o)
    driver.error_during_resume = FULL
    view = await life.start_vm("vm", o)
    assert view.error == FULL
    # the history says which change carried the error
    actions = [h.action for h in life.store.history("vm")]
    assert actions.count("disk_error") == 3, actions
    await life.close()


async def test_a_disk_error_the_store_could_not_take_is_cleared_by_a_start_with_room(tmp_path: Path) -> None:
    driver = DiskErrorDriver()
    life = Lifecycle(driver, Store(tmp_path / "s.db"), state_dir=tmp_path / "st", min_free_mib=0)
    o = Origin()
    await life.create_vm("vm", None, o)
    await life.start_vm("vm", o)
    life._unrecorded_errors["vm"] = FULL  # as when the store's own disk was full when QEMU reported it
    assert (await life.get_vm("vm")).error == FULL  # shown from memory (and written now: the store takes it)
    await life.stop_vm("vm", o)
    view = await life.start_vm("vm", o)
    assert view.error is None and "vm" not in life._unrecorded_errors
    await life.close()
