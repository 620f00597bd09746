"""FirecrackerDriver against the spec-checking stand-in (no Firecracker binary can run here).

The stand-in refuses, as Firecracker does, every request that breaks the spec or its state rules
(snapshot only while paused, load first on a fresh process, no configuration after start ...), so a
lifecycle that completes here sent only requests Firecracker would accept."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from microvm_blueprint.errors import ConfigError
from microvm_blueprint.runtime.adapters.firecracker import (
    FirecrackerApi,
    FirecrackerDriver,
    FirecrackerSettings,
    api_refusal,
    map_api_error,
)
from microvm_blueprint.runtime.adapters.firecracker.driver import rate_limiter
from microvm_blueprint.runtime.configdrive import hostname_for
from microvm_blueprint.runtime.errors import (
    ImageError,
    InvalidInput,
    VmError,
    VmmApiError,
    VmmError,
    VmmTimeout,
)
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import (
    DiskLimits,
    NetworkMode,
    Origin,
    SnapshotRecord,
    VmNetwork,
    VmRecord,
    VmSpec,
    VmStatus,
    fs_name,
)
from microvm_blueprint.runtime.store import Store

from ..fakes.firecracker_support import (
    JOURNAL,
    config_drive_problems,
    fake_project_image,
    fake_stock_image,
    final_drives,
    instance_id,
    kill_stand_ins,
    short_socket_dir,
    stand_in_driver,
    stand_ins,
)
from ..waiting import until

ANON = Origin()


@pytest.fixture
def make(tmp_path: Path, shared: Path) -> Iterator[Callable[..., FirecrackerDriver]]:
    """Builds drivers over the stand-in; afterwards asserts that no stand-in process is left, and that
    every VMM any of them configured had exactly its root drive and a read-only config drive (a FAT
    ``CIDATA`` with an instance-id), no two with the same instance-id (DESIGN.md §8)."""
    made: list[tuple[FirecrackerDriver, Path]] = []

    def factory(*extra: str, sub: str = "fc", stock: bool = False, **overrides: object) -> FirecrackerDriver:
        driver = stand_in_driver(tmp_path / sub, *extra, stock=stock, **overrides)
        made.append((driver, tmp_path / sub))
        return driver

    yield factory
    leftovers = [pid for d, _ in made for pid in kill_stand_ins(d.settings.socket_dir)]
    assert leftovers == [], f"stand-in processes left running: {leftovers}"
    seen: dict[str, int] = {}
    for _, folder in made:
        for pid, drives in final_drives(folder / JOURNAL).items():
            assert config_drive_problems(drives) == [], f"stand-in {pid}: {drives}"
            iid = instance_id(drives[1]["found"]["meta-data"])
            assert iid not in seen, f"stand-ins {seen.get(iid)} and {pid} share instance-id {iid}"
            seen[iid] = pid


def life_over(driver: FirecrackerDriver, tmp: Path) -> Lifecycle:
    return Lifecycle(driver, Store(tmp / "state.sqlite3"), state_dir=tmp / "state")


def ticks(text: str) -> int:
    found = re.findall(r"tick (\d+)", text)
    return int(found[-1]) if found else 0


async def vm_api(driver: FirecrackerDriver, life: Lifecycle, vm_id: str, method: str, path: str,
                 body: dict[str, Any] | None = None) -> Any:
    """A request to a VM's own API socket, the way an operator would poke it."""
    vm = life.store.get_vm(vm_id)
    assert vm is not None and vm.handle is not None and vm.handle.control
    api = FirecrackerApi(vm.handle.control, 5000)
    try:
        return await api.call(method, path, body)
    finally:
        await api.aclose()


def record(tmp: Path, vm_id: str, status: VmStatus = VmStatus.CREATED, spec: VmSpec | None = None,
           network: VmNetwork | None = None) -> VmRecord:
    workdir = tmp / "vms" / fs_name(vm_id)
    workdir.mkdir(parents=True, exist_ok=True)
    return VmRecord(vm_id=vm_id, status=status, spec=spec or VmSpec(), workdir=str(workdir),
                    network=network or VmNetwork())


def read_cidata(image: Path) -> dict[str, Any]:
    """A config drive read back as a guest would: a FAT image labelled CIDATA (boot sector), its meta-data
    through ``mtype``."""
    head = image.read_bytes()[:512]
    assert head[510:512] == b"\x55\xaa" and head[54:62] in (b"FAT12   ", b"FAT16   "), "not a FAT image"
    assert head[43:54] == b"CIDATA     "
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}
    out = subprocess.run(["mtype", "-i", str(image), "::meta-data"], capture_output=True, text=True, timeout=30,
                         env=env, check=True).stdout
    meta: dict[str, Any] = json.loads(out)
    return meta


# ---- the lifecycle ------------------------------------------------------------------------------


async def test_full_lifecycle_snapshots_and_restores(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    driver = make()
    life = life_over(driver, tmp_path)
    await life.create_vm("a", VmSpec(vcpus=2, mem_mib=256), ANON)
    assert (await vm_api(driver, life, "a", "GET", "/"))["state"] == "Not started"  # created = configured only
    cfg = await vm_api(driver, life, "a", "GET", "/vm/config")
    assert cfg["machine-config"]["vcpu_count"] == 2 and cfg["machine-config"]["mem_size_mib"] == 256
    a_dir = Path(life.store.get_vm("a").workdir)  # type: ignore[union-attr]
    assert cfg["drives"][0]["path_on_host"] == str(a_dir / "rootfs.ext4")  # its own copy (rootfs_ro off)

    await life.start_vm("a", ANON)
    assert "MICROVM-READY" in await life.console("a")

    async def a_ticks() -> bool:
        return ticks(await life.console("a")) >= 2

    await until(a_ticks, 10, "ticks of a", every=0.05)
    await life.stop_vm("a", ANON)
    assert (await vm_api(driver, life, "a", "GET", "/"))["state"] == "Paused"
    await life.start_vm("a", ANON)
    assert (await vm_api(driver, life, "a", "GET", "/"))["state"] == "Running"

    await life.snapshot_vm("a", "hot", ANON)  # running: paused for the save (the stand-in refuses otherwise), resumed
    assert (await life.get_vm("a")).status is VmStatus.RUNNING
    assert (await vm_api(driver, life, "a", "GET", "/"))["state"] == "Running"
    cfg = await vm_api(driver, life, "a", "GET", "/vm/config")
    assert cfg["drives"][0]["path_on_host"] == str(a_dir / "rootfs.ext4")  # switched back to its own disk
    await life.stop_vm("a", ANON)
    await life.snapshot_vm("a", "cold", ANON)
    assert (await vm_api(driver, life, "a", "GET", "/"))["state"] == "Paused"  # a stopped VM stays paused
    at = ticks(await life.console("a"))

    await life.create_vm("fresh", None, ANON)
    await life.snapshot_vm("fresh", "config-only", ANON)  # created: configuration + disk only
    snap_dir = Path(life.store.get_snapshot("fresh", "config-only").path)  # type: ignore[union-attr]
    assert sorted(p.name for p in snap_dir.iterdir()) == ["manifest.json", "rootfs.ext4"]

    # Snapshots outlive their VM: restore after the source is destroyed (its disk is gone).
    await life.destroy_vm("a", ANON)
    await life.destroy_vm("fresh", ANON)
    hot = await life.restore_vm("a", "hot", "b", ANON)
    cold = await life.restore_vm("a", "cold", "c", ANON)
    created = await life.restore_vm("fresh", "config-only", "d", ANON)
    assert (hot.status, cold.status, created.status) == (VmStatus.RUNNING, VmStatus.STOPPED, VmStatus.CREATED)
    for vm_id, state in (("b", "Running"), ("c", "Paused"), ("d", "Not started")):
        assert (await vm_api(driver, life, vm_id, "GET", "/"))["state"] == state
        own = Path(life.store.get_vm(vm_id).workdir) / "rootfs.ext4"  # type: ignore[union-attr]
        cfg = await vm_api(driver, life, vm_id, "GET", "/vm/config")
        assert cfg["drives"][0]["path_on_host"] == str(own), vm_id  # each restored VM has its own disk

    async def b_ticks() -> bool:
        return ticks(await life.console("b")) > 0

    await until(b_ticks, 10, "ticks of the restored vm", every=0.05)
    assert ticks(await life.console("b")) >= 2  # it carries on from the snapshot's count
    assert ticks(await life.console("c")) == 0  # restored paused: no tick yet
    await life.start_vm("c", ANON)

    async def c_ticks() -> bool:
        return ticks(await life.console("c")) > at

    await until(c_ticks, 10, "ticks of the resumed restored vm", every=0.05)
    await life.start_vm("d", ANON)
    assert "MICROVM-READY" in await life.console("d")
    for vm_id in ("b", "c", "d"):
        await life.destroy_vm(vm_id, ANON)
    await life.close(stop_vms=True)
    assert list((tmp_path / "state" / "vms").iterdir()) == []
    assert list(Path(driver.settings.socket_dir).iterdir()) == []


async def test_every_vm_gets_a_config_drive_and_every_clone_a_new_instance_id(
        make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    """DESIGN.md §8: a read-only second drive in NoCloud format, a new instance-id for every VM and every
    restored clone. A live snapshot keeps a copy of the drive its saved state names (the load opens it,
    even after the source VM is gone); the clone's drive is then pointed at a new one of its own."""
    driver = make()
    life = life_over(driver, tmp_path)

    async def drives_of(vm_id: str) -> tuple[Path, list[dict[str, Any]]]:
        workdir = Path(life.store.get_vm(vm_id).workdir)  # type: ignore[union-attr]
        return workdir, (await vm_api(driver, life, vm_id, "GET", "/vm/config"))["drives"]

    ids: dict[str, str] = {}

    async def check(vm_id: str) -> None:
        workdir, drives = await drives_of(vm_id)
        assert [d["drive_id"] for d in drives] == ["rootfs", "cidata"], vm_id
        assert drives[0]["is_root_device"] is True and drives[0]["path_on_host"] == str(workdir / "rootfs.ext4")
        assert drives[1] == {"drive_id": "cidata", "path_on_host": str(workdir / "cidata.img"),
                             "is_root_device": False, "is_read_only": True}, vm_id
        meta = read_cidata(workdir / "cidata.img")
        assert meta["local-hostname"] == hostname_for(vm_id)
        assert meta["instance-id"] not in ids.values(), f"{vm_id} has the instance-id of another vm: {ids}"
        ids[vm_id] = meta["instance-id"]

    await life.create_vm("a", None, ANON)
    await life.create_vm("a2", None, ANON)
    await life.create_vm("fresh", None, ANON)
    for vm_id in ("a", "a2", "fresh"):
        await check(vm_id)
    await life.start_vm("a", ANON)
    await life.snapshot_vm("a", "hot", ANON)
    await life.stop_vm("a", ANON)
    await life.snapshot_vm("a", "cold", ANON)
    await life.snapshot_vm("fresh", "config-only", ANON)
    _, drives = await drives_of("a")
    assert drives[1]["path_on_host"].endswith("/cidata.img") and "/vms/" in drives[1]["path_on_host"]  # back
    hot_dir = Path(life.store.get_snapshot("a", "hot").path)  # type: ignore[union-attr]
    assert read_cidata(hot_dir / "cidata.img")["instance-id"] == ids["a"]  # the drive the saved state names
    config_only = Path(life.store.get_snapshot("fresh", "config-only").path)  # type: ignore[union-attr]
    assert not (config_only / "cidata.img").exists()  # a created VM's restore configures a new drive anyway
    await life.destroy_vm("a", ANON)
    await life.destroy_vm("fresh", ANON)
    await life.restore_vm("a", "hot", "b", ANON)
    await life.restore_vm("a", "cold", "c", ANON)
    await life.restore_vm("a", "hot", "b2", ANON)  # the same snapshot twice: two new instance-ids
    await life.restore_vm("fresh", "config-only", "d", ANON)
    for vm_id in ("b", "c", "b2", "d"):
        await check(vm_id)
    assert len(set(ids.values())) == 7
    await life.start_vm("d", ANON)
    (hot_dir / "cidata.img").unlink()
    with pytest.raises(VmmError, match=r"missing cidata\.img"):
        await life.restore_vm("a", "hot", "e", ANON)
    await life.close(stop_vms=True)


async def test_the_root_drive_has_the_disk_limits_as_its_rate_limiter(make: Callable[..., FirecrackerDriver],
                                                                       tmp_path: Path) -> None:
    """MICROVM_DISK_BPS/_IOPS reach Firecracker as the root drive's ``rate_limiter`` (token buckets of one
    second's worth, checked by the stand-in against the spec's ``RateLimiter``); the config drive has none,
    and with both limits 0 neither has one."""
    for limits, expected in ((DiskLimits(bps=20 << 20, iops=700),
                              {"bandwidth": {"size": 20 << 20, "refill_time": 1000},
                               "ops": {"size": 700, "refill_time": 1000}}),
                             (DiskLimits(bps=0, iops=0), None)):
        sub = f"fc{limits.iops}"
        driver = make(sub=sub, disk_limits=limits)
        life = life_over(driver, tmp_path / sub)
        await life.create_vm("a", None, ANON)
        await life.start_vm("a", ANON)
        drives = (await vm_api(driver, life, "a", "GET", "/vm/config"))["drives"]
        assert drives[0]["drive_id"] == "rootfs" and drives[0].get("rate_limiter") == expected
        assert "rate_limiter" not in drives[1]
        await life.destroy_vm("a", ANON)
        await life.close(stop_vms=True)


async def test_firecracker_refuses_user_mode_networking(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    driver = make()
    with pytest.raises(VmmError, match="network mode 'user' is not available with the firecracker provider"):
        await driver.create(record(tmp_path, "a", network=VmNetwork(NetworkMode.USER)))
    assert stand_ins(driver.settings.socket_dir) == []


async def test_read_only_rootfs_is_shared_not_copied(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    driver = make(rootfs_ro=True)
    life = life_over(driver, tmp_path)
    await life.create_vm("a", None, ANON)
    cfg = await vm_api(driver, life, "a", "GET", "/vm/config")
    assert cfg["drives"][0] == {"drive_id": "rootfs", "path_on_host": str(Path(driver.settings.rootfs).resolve()),
                                "is_root_device": True, "is_read_only": True,
                                "rate_limiter": rate_limiter(driver.settings.disk_limits)}  # the default limits
    assert not (Path(life.store.get_vm("a").workdir) / "rootfs.ext4").exists()  # type: ignore[union-attr]
    await life.start_vm("a", ANON)
    await life.snapshot_vm("a", "s", ANON)
    await life.destroy_vm("a", ANON)
    view = await life.restore_vm("a", "s", "b", ANON)
    assert view.status is VmStatus.RUNNING
    cfg = await vm_api(driver, life, "b", "GET", "/vm/config")
    assert cfg["drives"][0]["is_read_only"] is True
    await life.destroy_vm("b", ANON)
    await life.close(stop_vms=True)


async def test_boot_waits_for_the_ready_line_with_a_deadline(make: Callable[..., FirecrackerDriver],
                                                              tmp_path: Path) -> None:
    silent = make(sub="silent", boot_args="quiet", boot_timeout_ms=600)  # no console=ttyS0: no serial output
    vm = record(tmp_path / "silent", "a")
    await silent.create(vm)
    try:
        with pytest.raises(VmmTimeout, match="ready line 'MICROVM-READY'") as err:
            await silent.boot(vm)
        assert "Running Firecracker" in err.value.log_tail
    finally:
        await silent.destroy(vm)
    no_line = make(sub="noline", boot_args="quiet", ready_line="")  # ready = GET / says Running
    vm = record(tmp_path / "noline", "a")
    await no_line.create(vm)
    await no_line.boot(vm)
    await no_line.boot(vm)  # a replayed start of a VM already running is answered, not refused
    await no_line.destroy(vm)
    assert not Path(vm.workdir).exists()


async def test_a_stock_rootfs_is_ready_when_the_vmm_says_running(make: Callable[..., FirecrackerDriver],
                                                                 tmp_path: Path) -> None:
    """A distribution image never prints MICROVM-READY: its guest is ready on the VMM's own word."""
    driver = make(sub="stock", stock=True, boot_timeout_ms=3000)
    assert driver.settings.ready_line is None  # MICROVM_FIRECRACKER_READY_LINE unset
    vm = record(tmp_path / "stock", "a")
    await driver.create(vm)
    try:
        assert json.loads((Path(vm.workdir) / "vm.json").read_text())["ready_line"] == ""
        started = time.monotonic()
        await driver.boot(vm)  # before: waited for MICROVM-READY and failed after the boot timeout
        assert time.monotonic() - started < 3
        assert await driver.alive(vm)

        async def prompt() -> bool:
            return "localhost login:" in await driver.console(vm, 4000)

        await until(prompt, 10, "the stock guest's login prompt", every=0.05)
        console = await driver.console(vm, 4000)
        assert "MICROVM-READY" not in console and "Run /sbin/init" not in console  # quiet: no transcript
    finally:
        await driver.destroy(vm)


async def test_a_set_ready_line_is_waited_for(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    found = make(sub="found", stock=True, boot_args="console=ttyS0 reboot=k panic=1 pci=off",
                 ready_line="localhost login:")
    vm = record(tmp_path / "found", "a")
    await found.create(vm)
    try:
        await found.boot(vm)  # returns once the line is on the console
        console = await found.console(vm, 4000)
        assert "localhost login:" in console and "Run /sbin/init as init process" in console  # the transcript
    finally:
        await found.destroy(vm)
    absent = make(sub="absent", stock=True, ready_line="Welcome to my distro", boot_timeout_ms=800)
    vm = record(tmp_path / "absent", "a")
    await absent.create(vm)
    try:
        with pytest.raises(VmmTimeout, match="ready line 'Welcome to my distro' within 800 ms") as err:
            await absent.boot(vm)
        assert "localhost login:" in err.value.log_tail  # the console tail says what the guest printed
    finally:
        await absent.destroy(vm)
    assert stand_ins(absent.settings.socket_dir) == []


def test_which_ready_line_a_rootfs_gets(tmp_path: Path) -> None:
    kernel, project = fake_project_image(tmp_path / "image")
    _, stock = fake_stock_image(tmp_path / "stock")
    copy = tmp_path / "copy.ext4"
    copy.write_bytes(project.read_bytes())  # the same bytes, but not the image's own file
    base = FirecrackerSettings(kernel=str(kernel), rootfs=str(project))
    assert base.guest_ready_line() == "MICROVM-READY"  # this project's image keeps its ready line
    assert base.guest_ready_line(str(stock)) == "" and base.guest_ready_line(str(copy)) == ""
    assert replace(base, rootfs=str(stock)).guest_ready_line() == ""
    assert replace(base, ready_line="login:").guest_ready_line() == "login:"  # the setting wins
    assert replace(base, ready_line="").guest_ready_line() == ""
    assert FirecrackerSettings.from_env({"MICROVM_FIRECRACKER_READY_LINE": "login:"}).ready_line == "login:"
    assert FirecrackerSettings.from_env({"MICROVM_FIRECRACKER_READY_LINE": " "}).ready_line is None
    env = {"MICROVM_FIRECRACKER_KERNEL": str(kernel), "MICROVM_FIRECRACKER_ROOTFS": str(project)}
    assert FirecrackerSettings.from_env(env).guest_ready_line() == "MICROVM-READY"


async def test_a_restored_vm_keeps_the_ready_line_of_its_rootfs(make: Callable[..., FirecrackerDriver],
                                                                tmp_path: Path) -> None:
    """The ready line is decided when a VM is created (by the rootfs it boots) and travels with its
    snapshot: restored by an operator now configured for this project's image, a created stock VM
    still boots on the VMM's word."""
    stock = make(sub="stock", stock=True)
    vm = record(tmp_path, "a")
    await stock.create(vm)
    out = _snapdir(tmp_path)
    size = await stock.snapshot(vm, str(out))
    assert json.loads((out / "manifest.json").read_text())["ready_line"] == ""
    await stock.destroy(vm)
    project = make(sub="project", boot_timeout_ms=3000)
    assert project.settings.guest_ready_line() == "MICROVM-READY"
    snap = SnapshotRecord("a", "s", str(out), VmStatus.CREATED, VmSpec(), time.time(), size)
    new = record(tmp_path, "b")
    await project.restore(new, snap)
    try:
        await project.boot(new)  # would wait for MICROVM-READY, which a stock guest never prints
        assert await project.alive(new) and "localhost login:" in await project.console(new, 4000)
    finally:
        await project.destroy(new)


async def test_unknown_field_surfaces_as_vmm_api_error(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    driver = make()
    life = life_over(driver, tmp_path)
    await life.create_vm("a", None, ANON)
    with pytest.raises(VmmApiError, match=r"refused PUT /machine-config \(HTTP 400\).*bogus") as err:
        await vm_api(driver, life, "a", "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1})
    assert err.value.status == 400 and "bogus" in err.value.body
    await life.start_vm("a", ANON)
    with pytest.raises(VmmApiError, match="not supported after starting"):
        await vm_api(driver, life, "a", "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    await life.destroy_vm("a", ANON)
    await life.close(stop_vms=True)


async def test_vcpu_and_image_checked_before_spawning(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    driver = make()
    with pytest.raises(ImageError, match="image 'other' is not available"):
        await driver.create(record(tmp_path, "a", spec=VmSpec(image="other")))
    with pytest.raises(InvalidInput, match="vcpus must be between 1 and 32"):
        await driver.create(record(tmp_path, "b", spec=VmSpec(vcpus=33)))
    assert stand_ins(driver.settings.socket_dir) == []


# ---- failures -----------------------------------------------------------------------------------


async def test_killed_behind_the_drivers_back(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    driver = make()
    life = life_over(driver, tmp_path)
    heard: list[tuple[str, str]] = []
    core_listener = driver._listener
    assert core_listener is not None

    def listener(vm_id: str, reason: str) -> None:
        heard.append((vm_id, reason))
        core_listener(vm_id, reason)

    driver.set_exit_listener(listener)
    await life.create_vm("a", None, ANON)
    await life.start_vm("a", ANON)
    vm = life.store.get_vm("a")
    assert vm is not None and vm.handle is not None and vm.handle.pid
    os.kill(vm.handle.pid, signal.SIGKILL)

    async def failed() -> bool:
        return (await life.get_vm("a")).status is VmStatus.FAILED

    await until(failed, 10, "the failed status", every=0.05)
    assert heard and heard[0][0] == "a" and "exit code -9" in heard[0][1]
    assert not await driver.alive(life._record(vm))
    await life.destroy_vm("a", ANON)
    assert (await life.get_vm("a")).status is VmStatus.DESTROYED
    assert list((tmp_path / "state" / "vms").iterdir()) == []
    assert list(Path(driver.settings.socket_dir).iterdir()) == []
    assert len(heard) == 1  # destroy is asked for: no second report
    await life.close(stop_vms=True)


async def test_socket_never_appears_is_a_timeout_with_log_tail(make: Callable[..., FirecrackerDriver],
                                                                tmp_path: Path) -> None:
    driver = make("--fake-never-listen", socket_ready_timeout_ms=1500)
    life = life_over(driver, tmp_path)
    with pytest.raises(VmmTimeout, match="did not appear within 1500 ms") as err:
        await life.create_vm("a", None, ANON)
    assert "never listening" in err.value.log_tail
    assert await life.list_vms() == []
    assert list((tmp_path / "state" / "vms").iterdir()) == []
    assert stand_ins(driver.settings.socket_dir) == []  # killed and reaped


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"bin": "/nonexistent/firecracker"}, "firecracker binary not found: .*MICROVM_FIRECRACKER_BIN"),
        ({"bin": "no-such-firecracker-on-path"}, "binary not found.*MICROVM_FIRECRACKER_BIN"),
        ({"kernel": "/nonexistent/vmlinux"}, "kernel not found: /nonexistent/vmlinux.*MICROVM_FIRECRACKER_KERNEL"),
        ({"kernel": ""}, "kernel is not set.*MICROVM_FIRECRACKER_KERNEL"),
        ({"rootfs": "/nonexistent/rootfs"}, "rootfs not found.*MICROVM_FIRECRACKER_ROOTFS"),
        ({"initrd": "/nonexistent/initrd"}, "initrd not found.*MICROVM_FIRECRACKER_INITRD"),
    ],
)
async def test_missing_files_are_reported_before_spawning(make: Callable[..., FirecrackerDriver], tmp_path: Path,
                                                           override: dict[str, str], message: str) -> None:
    driver = make(**override)
    vm = record(tmp_path, "a")
    with pytest.raises(ImageError, match=message):
        await driver.create(vm)
    assert list(Path(vm.workdir).iterdir()) == []  # nothing spawned, nothing copied
    assert stand_ins(driver.settings.socket_dir) == []


async def test_binary_that_is_not_executable(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    plain = tmp_path / "not-exec"
    plain.write_text("#!/bin/sh\n")
    driver = make(bin=str(plain))
    with pytest.raises(ImageError, match="not executable"):
        await driver.create(record(tmp_path, "a"))


async def test_a_failed_load_leaves_nothing_behind(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    driver = make()
    life = life_over(driver, tmp_path)
    await life.create_vm("a", None, ANON)
    await life.start_vm("a", ANON)
    await life.snapshot_vm("a", "s", ANON)
    snap = life.store.get_snapshot("a", "s")
    assert snap is not None
    (Path(snap.path) / "memory.bin").write_bytes(b"garbage")  # the stand-in's load fails and it exits
    with pytest.raises(VmmError, match="Load snapshot error") as err:
        await life.restore_vm("a", "s", "b", ANON)
    assert "Running Firecracker" in err.value.log_tail  # the new VMM's log comes with the error
    assert [v.vm_id for v in await life.list_vms()] == ["a"]
    assert sorted(p.name for p in (tmp_path / "state" / "vms").iterdir()) == [fs_name("a")]
    (Path(snap.path) / "vmstate.bin").unlink()
    with pytest.raises(VmmError, match=r"missing vmstate\.bin"):
        await life.restore_vm("a", "s", "c", ANON)
    await life.destroy_vm("a", ANON)
    await life.close(stop_vms=True)


async def test_adopt_after_an_operator_restart(make: Callable[..., FirecrackerDriver], tmp_path: Path) -> None:
    first = make()
    vm = record(tmp_path, "a")
    handle = await first.create(vm)
    await first.boot(vm)
    await first.close(stop_vms=False)  # the operator exits and leaves its VMs running
    running = replace(vm, status=VmStatus.RUNNING, handle=handle)

    second = FirecrackerDriver(first.settings)  # the next operator process
    heard: list[str] = []
    second.set_exit_listener(lambda vm_id, reason: heard.append(reason))
    assert await second.alive(running)  # pid + GET / probe, before adopting
    assert await second.adopt(running)
    await second.pause(running)
    await second.resume(running)
    size = await second.snapshot(running, str(_snapdir(tmp_path)))
    assert size > 0
    assert handle is not None and handle.pid
    os.kill(handle.pid, signal.SIGKILL)

    async def reported() -> bool:
        return bool(heard)

    await until(reported, 10, "the exit report of an adopted vmm", every=0.05)
    assert not await second.alive(running)
    assert not await second.adopt(running)
    await second.destroy(running)
    assert not Path(vm.workdir).exists()


async def test_destroy_without_adopting_kills_by_pid_file(make: Callable[..., FirecrackerDriver],
                                                           tmp_path: Path) -> None:
    first = make()
    vm = record(tmp_path, "a")
    handle = await first.create(vm)
    await first.close(stop_vms=False)
    assert handle is not None and handle.pid
    assert stand_ins(first.settings.socket_dir) != []
    other = FirecrackerDriver(first.settings)
    await other.destroy(replace(vm, handle=None))  # reconciliation of an undone create: no handle
    assert stand_ins(first.settings.socket_dir) == []
    assert not Path(vm.workdir).exists()
    await other.destroy(replace(vm, handle=None))  # idempotent


def _snapdir(tmp: Path) -> Path:
    path = tmp / "snap"
    path.mkdir()
    return path


async def test_snapshot_record_of_a_running_vm_restores_in_a_new_driver(make: Callable[..., FirecrackerDriver],
                                                                         tmp_path: Path) -> None:
    """restore() only needs the snapshot folder and its record (what the lifecycle core keeps)."""
    driver = make()
    vm = record(tmp_path, "a")
    await driver.create(vm)
    await driver.boot(vm)
    out = _snapdir(tmp_path)
    size = await driver.snapshot(replace(vm, status=VmStatus.RUNNING), str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vm_status"] == "running" and manifest["memory"] == "memory.bin"
    await driver.destroy(vm)
    snap = SnapshotRecord("a", "s", str(out), VmStatus.RUNNING, VmSpec(), time.time(), size)
    other = make(sub="other")
    new = record(tmp_path, "b", VmStatus.RUNNING)
    await other.restore(new, snap)
    assert await other.alive(new)
    await other.destroy(new)


# ---- cancellation -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "destroy"])
async def test_a_cancel_while_a_watcher_winds_down_reaches_the_caller(tmp_path: Path, how: str) -> None:
    """close()/destroy() stop a VM's watcher task; a cancellation of *their* caller meanwhile is the
    caller's and must propagate (it was swallowed with the watcher's own CancelledError)."""
    from microvm_blueprint.runtime.adapters.firecracker.driver import _Vm

    driver = FirecrackerDriver(FirecrackerSettings(socket_dir=short_socket_dir(tmp_path)))
    winding, release = asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            winding.set()
            await release.wait()  # a watcher that takes a moment to wind down
            raise

    vm = record(tmp_path, "a")
    sock = Path(driver.settings.socket_dir) / "a.sock"
    q = _Vm("a", Path(vm.workdir), sock, FirecrackerApi(str(sock), 500), None, None, tmp_path / "disk", False)
    watcher = q.watcher = asyncio.create_task(slow_to_stop())
    driver._vms["a"] = q
    caller = asyncio.create_task(driver.close(stop_vms=False) if how == "close" else driver.destroy(vm))
    try:
        await asyncio.wait_for(winding.wait(), 5)
        caller.cancel()
        done, _ = await asyncio.wait({caller}, timeout=5)
        assert caller in done and caller.cancelled()
        assert not watcher.done()  # the watcher still ends on its own ...
    finally:
        release.set()
        await asyncio.wait({watcher, caller}, timeout=5)
    assert watcher.cancelled()  # ... once it has wound down


# ---- settings -----------------------------------------------------------------------------------


def test_settings_from_env_parse_and_name_the_bad_variable(tmp_path: Path) -> None:
    s = FirecrackerSettings.from_env({
        "MICROVM_FIRECRACKER_BIN": "/x/fc", "MICROVM_FIRECRACKER_VCPU_COUNT": "4",
        "MICROVM_FIRECRACKER_ROOTFS_RO": "false", "MICROVM_FIRECRACKER_KERNEL": "/k",
        "MICROVM_FIRECRACKER_ROOTFS": "/r", "MICROVM_FIRECRACKER_BOOT_ARGS": "console=ttyS0",
        "MICROVM_FIRECRACKER_SOCKET_DIR": "/run/fc", "MICROVM_FIRECRACKER_STATE_DIR": "/var/lib/fc",
        "MICROVM_FIRECRACKER_API_TIMEOUT_MS": "250", "MICROVM_FIRECRACKER_SOCKET_READY_TIMEOUT_MS": "900",
        "MICROVM_FIRECRACKER_LOG_LEVEL": "debug",
    })
    assert (s.bin, s.kernel, s.rootfs, s.boot_args, s.socket_dir, s.state_dir) == (
        "/x/fc", "/k", "/r", "console=ttyS0", "/run/fc", "/var/lib/fc")
    assert (s.vcpu_count, s.mem_mib, s.rootfs_ro, s.api_timeout_ms, s.socket_ready_timeout_ms, s.log_level) == (
        4, 1024, False, 250, 900, "Debug")
    assert s.default_spec() == VmSpec(vcpus=4, mem_mib=1024)
    d = FirecrackerSettings.from_env({})
    assert (d.bin, d.vcpu_count, d.mem_mib, d.rootfs_ro, d.api_timeout_ms, d.socket_ready_timeout_ms) == (
        "firecracker", 2, 1024, True, 5000, 5000)
    for name, value in [("MEM_MIB", "lots"), ("MEM_MIB", "64"), ("VCPU_COUNT", "0"), ("VCPU_COUNT", "33"),
                        ("API_TIMEOUT_MS", "-5"), ("SOCKET_READY_TIMEOUT_MS", "1.5"), ("ROOTFS_RO", "maybe"),
                        ("LOG_LEVEL", "loud"), ("SOCKET_DIR", "/" + "d" * 90)]:
        with pytest.raises(ConfigError, match=f"MICROVM_FIRECRACKER_{name}=") as err:
            FirecrackerSettings.from_env({f"MICROVM_FIRECRACKER_{name}": value})
        assert not isinstance(err.value, InvalidInput)  # the operator's setting, not a job's input
    with pytest.raises(ConfigError, match="107-byte limit"):
        FirecrackerSettings(socket_dir="/" + "x" * 80)


# ---- every foreign error lands in the runtime error tree ------------------------------------------

REQUEST = httpx.Request("PUT", "http://localhost/x")

FOREIGN: list[tuple[BaseException, type[VmError], str]] = [
    (httpx.ConnectError("refused", request=REQUEST), VmmError, "socket unreachable"),
    (httpx.ConnectTimeout("slow", request=REQUEST), VmmTimeout, "did not answer"),
    (httpx.ReadTimeout("slow", request=REQUEST), VmmTimeout, "did not answer"),
    (httpx.WriteTimeout("slow", request=REQUEST), VmmTimeout, "did not answer"),
    (httpx.PoolTimeout("slow", request=REQUEST), VmmTimeout, "did not answer"),
    (httpx.RemoteProtocolError("garbage", request=REQUEST), VmmError, "broke the HTTP protocol"),
    (httpx.LocalProtocolError("bad", request=REQUEST), VmmError, "broke the HTTP protocol"),
    (httpx.ReadError("reset", request=REQUEST), VmmError, "failed"),
    (httpx.WriteError("pipe", request=REQUEST), VmmError, "failed"),
    (httpx.UnsupportedProtocol("x", request=REQUEST), VmmError, "failed"),
    (httpx.DecodingError("gzip", request=REQUEST), VmmError, "failed"),
    (httpx.InvalidURL("bad url"), VmmError, "failed"),
    (FileNotFoundError(2, "No such file or directory"), VmmError, "socket unreachable"),
    (ConnectionRefusedError(111, "Connection refused"), VmmError, "socket unreachable"),
    (ConnectionResetError(104, "reset"), VmmError, "failed"),
    (PermissionError(13, "denied"), VmmError, "failed"),
    (OSError(5, "I/O error"), VmmError, "failed"),
    (TimeoutError(), VmmTimeout, "did not answer"),
    (json.JSONDecodeError("Expecting value", "<html>", 0), VmmApiError, "malformed JSON"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), VmmApiError, "malformed JSON"),
    (RuntimeError("anything else"), VmmError, "failed"),
]


@pytest.mark.parametrize(("exc", "expected", "text"), FOREIGN, ids=[type(e[0]).__name__ for e in FOREIGN])
def test_map_api_error(exc: BaseException, expected: type[VmError], text: str) -> None:
    mapped = map_api_error(exc, "PUT /x", 5000)
    assert type(mapped) is expected
    assert "PUT /x" in str(mapped) and text in str(mapped)


@pytest.mark.parametrize(("exc", "expected", "text"), [f for f in FOREIGN if not isinstance(f[0], RuntimeError)],
                         ids=[type(e[0]).__name__ for e in FOREIGN if not isinstance(e[0], RuntimeError)])
async def test_api_client_maps_what_the_transport_raises(exc: BaseException, expected: type[VmError],
                                                         text: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
            return httpx.Response(200, content=b"\xff<html>not json")
        raise exc

    api = FirecrackerApi("/nonexistent.sock", 5000, transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(expected, match=re.escape("PUT /x")) as err:
            await api.call("PUT", "/x", {"a": 1})
        assert type(err.value) is expected and err.value.__cause__ is not None
    finally:
        await api.aclose()


@pytest.mark.parametrize(
    ("status", "content", "fault"),
    [
        (400, b'{"fault_message": "The requested operation is not supported after starting the microVM."}',
         "The requested operation is not supported after starting the microVM."),
        (500, b'{"fault_message": "internal"}', "internal"),
        (404, b"plain text", "plain text"),
        (400, b"", ""),
        (400, b'{"other": 1}', '{"other": 1}'),
        (503, b"\xff\xfe", "\ufffd\ufffd"),
        (301, b"", ""),
    ],
)
async def test_non_2xx_answers_are_vmm_api_errors(status: int, content: bytes, fault: str) -> None:
    direct = api_refusal(status, content, "PUT /x")
    api = FirecrackerApi("/nonexistent.sock", 5000,
                         transport=httpx.MockTransport(lambda request: httpx.Response(status, content=content)))
    try:
        with pytest.raises(VmmApiError) as err:
            await api.call("PUT", "/x", {})
    finally:
        await api.aclose()
    for e in (direct, err.value):
        assert (e.status, e.body) == (status, fault)
        assert f"HTTP {status}" in str(e) and "PUT /x" in str(e)


async def test_a_real_unreachable_socket_is_a_vmm_error(tmp_path: Path) -> None:
    api = FirecrackerApi(str(tmp_path / "missing.sock"), 500)
    try:
        with pytest.raises(VmmError, match="socket unreachable for GET /") as err:
            await api.call("GET", "/")
        assert not isinstance(err.value, VmmApiError | VmmTimeout)
    finally:
        await api.aclose()
