"""Per-VM disk I/O limits on a real QEMU (issue #13, DESIGN.md §9): QEMU itself reports (QMP ``query-block``)
the customer disk throttled at ``MICROVM_DISK_BPS``/``_IOPS`` and the config drive not throttled. A check of
what QEMU enforces, not a timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import DiskLimits, Origin, VmSpec
from microvm_blueprint.runtime.store import Store

from ..qemu_support import ensure_image, qemu_pids

pytestmark = pytest.mark.qemu


async def _drives(life: Lifecycle, driver: QemuDriver, vm_id: str) -> dict[str, dict[str, Any]]:
    stored = life.store.get_vm(vm_id)
    assert stored is not None
    return {d["device"]: d for d in await driver.query_block(life._record(stored))}


async def test_qemu_reports_the_customer_disk_throttled_and_the_config_drive_not(tmp_path: Path) -> None:
    limits = DiskLimits(bps=20 * 1024 * 1024, iops=700)
    driver = QemuDriver(QemuSettings(image_dir=ensure_image(), accel="tcg", disk_limits=limits))
    life = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state", min_free_mib=0)
    unlimited = QemuDriver(QemuSettings(image_dir=ensure_image(), accel="tcg", disk_limits=DiskLimits(0, 0)))
    life_off = Lifecycle(unlimited, Store(tmp_path / "t.sqlite3"), state_dir=tmp_path / "state-off", min_free_mib=0)
    o = Origin()
    try:
        # created = QEMU is up and configured (-S): its drives are what the guest will get
        await life.create_vm("vm", VmSpec(vcpus=1, mem_mib=128), o)
        drives = await _drives(life, driver, "vm")
        assert set(drives) == {"root", "cidata"}, drives
        root = drives["root"]["inserted"]
        assert root["file"].endswith("disk.qcow2"), root
        assert (root["bps"], root["iops"]) == (20 * 1024 * 1024, 700), root
        # total only: no separate read/write limits
        assert (root["bps_rd"], root["bps_wr"], root["iops_rd"], root["iops_wr"]) == (0, 0, 0, 0), root
        cidata = drives["cidata"]["inserted"]
        assert (cidata["bps"], cidata["iops"]) == (0, 0), cidata
        assert cidata["ro"] is True

        await life_off.create_vm("off", VmSpec(vcpus=1, mem_mib=128), o)
        off = (await _drives(life_off, unlimited, "off"))["root"]["inserted"]
        assert (off["bps"], off["iops"]) == (0, 0), off  # 0 = no limit
    finally:
        await life.close(stop_vms=True)
        await life_off.close(stop_vms=True)
    assert qemu_pids(tmp_path) == set(), "a QEMU process was left behind"
