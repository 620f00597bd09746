"""The provider contract suite runs against every driver that can run here.

Each entry of ``DRIVERS`` builds a fresh ``Lifecycle`` over one driver; drivers that need
something this machine lacks skip with the reason.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.driver import VmmDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import HostLimits, NetworkMode, NetworkSettings, Origin
from microvm_blueprint.runtime.store import Store

DriverFactory = Callable[[Path], VmmDriver]


def _in_memory(tmp: Path) -> VmmDriver:
    return InMemoryDriver()


def _firecracker(tmp: Path) -> VmmDriver:
    from ..conftest import shared_dir
    from ..fakes.firecracker_support import stand_in_driver

    spec = shared_dir() / "firecracker" / "firecracker.yaml"
    if not spec.is_file():  # the stand-in checks every request against it: no spec, no stand-in
        pytest.skip(f"the Firecracker API spec is not at {spec} (set MICROVM_SHARED_DIR)")
    return stand_in_driver(tmp / "fc")


def _firecracker_jailer(tmp: Path) -> VmmDriver:
    """The stand-in under the stand-in jailer (as the VMM user 999:995): every file in its chroot."""
    import tempfile

    from ..fakes.firecracker_support import fake_jailer

    driver = _firecracker(tmp)
    assert isinstance(driver, FirecrackerDriver)
    base = tempfile.mkdtemp(prefix="jl-")  # short: the API socket is under it; removed by the fixture
    return FirecrackerDriver(dataclasses.replace(driver.settings, jailer=str(fake_jailer(tmp / "jail-bin")),
                                                 chroot_base=base, jailer_uid=999, jailer_gid=995))


def _qemu(tmp: Path) -> VmmDriver:
    from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings

    from ..qemu_support import ensure_image

    return QemuDriver(QemuSettings(image_dir=ensure_image(), accel="tcg", boot_timeout=120))


DRIVERS: dict[str, DriverFactory] = {"in-memory": _in_memory, "firecracker-spec": _firecracker,
                                     "firecracker-jailer": _firecracker_jailer, "qemu": _qemu}
#: each driver's own network mode, as the operator's settings default it (Firecracker: TAP only, so none here)
NETWORKS: dict[str, NetworkMode] = {
    "in-memory": NetworkMode.USER, "firecracker-spec": NetworkMode.NONE, "firecracker-jailer": NetworkMode.NONE,
    "qemu": NetworkMode.USER,
}
PORT_RANGE = (45000, 45999)
#: the service's owner on the chain (DESIGN.md §9): may act on every VM
SERVICE_OWNER = "0x00000000000000000000000000000000000000Ee"


@pytest.fixture(
    params=[
        "in-memory",
        "firecracker-spec",
        "firecracker-jailer",
        pytest.param("qemu", marks=[pytest.mark.qemu]),
    ]
)
async def provider(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lifecycle]:
    driver = DRIVERS[request.param](tmp_path)
    network = NetworkSettings(mode=NETWORKS[request.param], port_range=PORT_RANGE)
    life = Lifecycle(driver, Store(tmp_path / "state.sqlite3"), state_dir=tmp_path / "state", limits=HostLimits(),
                     network=network, service_owner=SERVICE_OWNER)
    try:
        yield life
    finally:
        for vm in await life.list_vms():
            if vm.status.value in ("created", "running", "stopped", "failed"):
                await life.destroy_vm(vm.vm_id, _anon())
        await life.close(stop_vms=True)
        if isinstance(driver, FirecrackerDriver) and driver.settings.jailer:
            shutil.rmtree(driver.settings.chroot_base, ignore_errors=True)


def _anon() -> Origin:
    return Origin()
