"""What every :class:`~microvm_blueprint.runtime.driver.VmmDriver` answers about itself, below the
lifecycle core: the owner a VM's TAP device must have (``VmmDriver.tap_owner``), and that the operator's
``build_provider`` takes it from the driver into the network settings bridge mode uses."""

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

#: an unprivileged VMM user that need not exist: ``tap_owner`` only reads settings
UID, GID = 4321, 4322


def _confined_qemu() -> VmmDriver:
    confine = Confinement(None, cgroups=False)
    confine.user = VmmUser("vmm-test", UID, GID)  # as resolve_user would give a root operator
    return QemuDriver(QemuSettings(confine=confine))


#: driver -> (how to build it, the TAP owner it must report)
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
    assert make().tap_owner() == owner


@pytest.mark.parametrize("case", list(CASES))
async def test_build_provider_gives_the_drivers_tap_owner_to_the_network(case: str, tmp_path: Path) -> None:
    make, owner = CASES[case]
    driver = make()
    life = build_provider(OperatorSettings.from_env({}, tmp_path / "data"), driver)
    try:
        assert life.network.tap_owner == owner == driver.tap_owner()
    finally:
        await life.close()
