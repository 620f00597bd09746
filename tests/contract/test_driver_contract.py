"""What every :class:`~microvm_blueprint.runtime.driver.VmmDriver` answers about itself, below the
lifecycle core: whether it runs each VMM as a uid it is handed (``VmmDriver.isolates_users``), the owner
a VM's TAP device must have (``VmmDriver.tap_owner``: the VM's own uid, else the shared VMM user), and
that the operator's ``build_provider`` gives such a driver's VMs uids of their own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.operator import build_provider
from microvm_blueprint.blueprint.settings import OperatorSettings
from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver, FirecrackerSettings
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.confine import Confinement, VmmUser
from microvm_blueprint.runtime.driver import VmmDriver
from microvm_blueprint.runtime.model import VmRecord, VmSpec, VmStatus

#: an unprivileged VMM user that need not exist: ``tap_owner`` only reads settings
UID, GID = 4321, 4322


def _confined_qemu() -> VmmDriver:
    confine = Confinement(None, cgroups=False)
    confine.user = VmmUser("vmm-test", UID, GID)  # as resolve_user would give a root operator
    return QemuDriver(QemuSettings(confine=confine))


#: a VM with a uid of its own (MICROVM_VMM_UID_RANGE) and one from before per-VM uids
OWN_UID = 200_123
OWN = VmRecord("own", VmStatus.CREATED, VmSpec(), "/nonexistent", vmm_uid=OWN_UID)
SHARED = VmRecord("shared", VmStatus.CREATED, VmSpec(), "/nonexistent")

#: driver -> (how to build it, the TAP owner it must report for a VM without a uid of its own)
CASES: dict[str, tuple[Callable[[], VmmDriver], tuple[int, int] | None]] = {
    "in-memory": (InMemoryDriver, None),
    "qemu-as-operator": (lambda: QemuDriver(QemuSettings()), None),
    "qemu-confined": (_confined_qemu, (UID, GID)),
    "firecracker-unjailed": (lambda: FirecrackerDriver(FirecrackerSettings()), None),
    "firecracker-jailed": (lambda: FirecrackerDriver(FirecrackerSettings(jailer="/usr/bin/jailer", jailer_uid=UID,
                                                                         jailer_gid=GID)), (UID, GID)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_driver_names_the_owner_of_its_taps(case: str) -> None:
    make, owner = CASES[case]
    driver = make()
    assert driver.isolates_users() == (owner is not None)
    assert driver.tap_owner(SHARED) == owner
    # a VM with a uid of its own has its TAP made for that uid, where the driver switches users at all
    assert driver.tap_owner(OWN) == ((OWN_UID, OWN_UID) if owner is not None else None)


@pytest.mark.parametrize("case", list(CASES))
async def test_build_provider_gives_per_vm_uids_where_the_driver_switches_users(case: str, tmp_path: Path) -> None:
    make, owner = CASES[case]
    driver = make()
    life = build_provider(OperatorSettings.from_env({}, tmp_path / "data"), driver)
    try:
        assert life.vmm_uids == ((0x70000000, 0x7000FFFF) if owner is not None else None)
    finally:
        await life.close()
    off = build_provider(OperatorSettings.from_env({"MICROVM_VMM_UID_RANGE": "off"}, tmp_path / "off"), make())
    try:
        assert off.vmm_uids is None
    finally:
        await off.close()
