"""FirecrackerDriver against the spec-checking stand-in (no Firecracker binary can run here)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from microvm_blueprint.runtime.adapters.firecracker import FirecrackerSettings, map_http_error
from microvm_blueprint.runtime.errors import ImageError, InvalidInput, VmmApiError, VmmError, VmmTimeout
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmStatus
from microvm_blueprint.runtime.store import Store

from ..fakes.firecracker_support import stand_in_driver


def _life(tmp: Path, *extra: str, **kw: object) -> Lifecycle:
    return Lifecycle(stand_in_driver(tmp / "fc", *extra, **kw), Store(tmp / "s.sqlite3"), state_dir=tmp / "state")


def ticks(text: str) -> int:
    found = re.findall(r"tick (\d+)", text)
    return int(found[-1]) if found else 0


async def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_full_lifecycle_and_restores(tmp_path: Path, shared: Path) -> None:
    life = _life(tmp_path)
    o = Origin()
    await life.create_vm("a", None, o)
    await life.start_vm("a", o)
    assert "MICROVM-READY" in await life.console("a")

    async def ticked() -> bool:
        return ticks(await life.console("a")) > 2

    await wait_for(ticked, 10, "ticks")
    await life.stop_vm("a", o)
    await life.start_vm("a", o)
    await life.snapshot_vm("a", "hot", o)  # running: the driver pauses first (the stand-in refuses otherwise)
    assert (await life.get_vm("a")).status is VmStatus.RUNNING
    await life.stop_vm("a", o)
    await life.snapshot_vm("a", "cold", o)
    at = ticks(await life.console("a"))
    hot = await life.restore_vm("a", "hot", "b", o)
    cold = await life.restore_vm("a", "cold", "c", o)
    assert (hot.status, cold.status) == (VmStatus.RUNNING, VmStatus.STOPPED)

    async def restored_ticks() -> bool:
        return ticks(await life.console("b")) > 0

    await wait_for(restored_ticks, 10, "restored ticks")
    assert ticks(await life.console("b")) >= at - 10  # carries on from the snapshot's count
    await life.create_vm("fresh", None, o)
    await life.snapshot_vm("fresh", "config-only", o)
    d = await life.restore_vm("fresh", "config-only", "d", o)
    assert d.status is VmStatus.CREATED
    await life.start_vm("d", o)
    for vm in ("a", "b", "c", "d", "fresh"):
        await life.destroy_vm(vm, o)
    await life.close(stop_vms=True)
    assert list((tmp_path / "state" / "vms").iterdir()) == []


async def test_unknown_field_surfaces_as_api_error(tmp_path: Path, shared: Path) -> None:
    life = _life(tmp_path)
    await life.create_vm("a", None, Origin())
    driver = life.driver
    vm = driver._vms["a"]  # type: ignore[attr-defined]
    with pytest.raises(VmmApiError, match="invalid body") as err:
        await driver._api(vm, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1})  # type: ignore[attr-defined]
    assert err.value.status == 400
    await life.destroy_vm("a", Origin())
    await life.close(stop_vms=True)


async def test_killed_process_is_failed_and_destroy_cleans_up(tmp_path: Path, shared: Path) -> None:
    life = _life(tmp_path)
    await life.create_vm("a", None, Origin())
    await life.start_vm("a", Origin())
    pid = life.store.get_vm("a").handle.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)

    async def failed() -> bool:
        return (await life.get_vm("a")).status is VmStatus.FAILED

    await wait_for(failed, 10, "failed status")
    await life.destroy_vm("a", Origin())
    assert (await life.get_vm("a")).status is VmStatus.DESTROYED
    assert list((tmp_path / "state" / "vms").iterdir()) == []


async def test_socket_never_appears_is_a_timeout_with_log_tail(tmp_path: Path, shared: Path) -> None:
    life = _life(tmp_path, "--never-listen", socket_ready_timeout_ms=300)
    with pytest.raises(VmmTimeout, match="did not appear"):
        await life.create_vm("a", None, Origin())
    assert await life.list_vms() == []
    assert list((tmp_path / "state" / "vms").iterdir()) == []


async def test_missing_binary_or_kernel_before_spawning(tmp_path: Path, shared: Path) -> None:
    life = _life(tmp_path, bin="/nonexistent/firecracker")
    with pytest.raises(ImageError, match="MICROVM_FIRECRACKER_BIN"):
        await life.create_vm("a", None, Origin())
    life = _life(tmp_path / "2", kernel="/nonexistent/vmlinux")
    with pytest.raises(ImageError, match="MICROVM_FIRECRACKER_KERNEL"):
        await life.create_vm("a", None, Origin())
    assert await life.list_vms() == []


def test_settings_from_env_name_the_bad_variable() -> None:
    s = FirecrackerSettings.from_env({"MICROVM_FIRECRACKER_BIN": "/x/fc", "MICROVM_FIRECRACKER_VCPU_COUNT": "4",
                                      "MICROVM_FIRECRACKER_ROOTFS_RO": "false"})
    assert (s.bin, s.vcpu_count, s.rootfs_ro, s.mem_mib, s.api_timeout_ms) == ("/x/fc", 4, False, 1024, 5000)
    with pytest.raises(InvalidInput, match="MICROVM_FIRECRACKER_MEM_MIB"):
        FirecrackerSettings.from_env({"MICROVM_FIRECRACKER_MEM_MIB": "lots"})
    with pytest.raises(InvalidInput, match="MICROVM_FIRECRACKER_ROOTFS_RO"):
        FirecrackerSettings.from_env({"MICROVM_FIRECRACKER_ROOTFS_RO": "maybe"})


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("refused"), VmmError),
        (httpx.ReadTimeout("slow"), VmmTimeout),
        (httpx.ConnectTimeout("slow"), VmmTimeout),
        (httpx.RemoteProtocolError("garbage"), VmmError),
        (httpx.ReadError("reset"), VmmError),
        (FileNotFoundError("no socket"), VmmError),
        (ConnectionRefusedError("refused"), VmmError),
        (ValueError("Expecting value"), VmmApiError),
    ],
)
def test_every_foreign_error_is_mapped(exc: Exception, expected: type[Exception]) -> None:
    mapped = map_http_error(exc, "PUT /x")
    assert type(mapped) is expected
    assert "PUT /x" in str(mapped)
