"""Firecracker under its jailer (DESIGN.md §9, issue #13 item 5): with ``MICROVM_FIRECRACKER_JAILER`` set the
driver spawns ``jailer --id --exec-file --uid --gid --cgroup-version --chroot-base-dir [--cgroup ...] --
--api-sock /run/firecracker.socket``, and talks to the socket inside the chroot. The jailer stand-in checks
that argv as the jailer doc describes it and refuses a wrong one.

Firecracker under the jailer sees only its chroot (``<chroot base>/<exec file name>/<id>/root``): every path
given over the API is inside it, and must be readable (a writable drive: writable) by the jailer's uid/gid.
The stand-in, started by the stand-in jailer, resolves API paths inside the chroot and refuses the others, so
a driver that gives host paths (as before) fails at the first ``PUT /boot-source``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver, FirecrackerSettings
from microvm_blueprint.runtime.adapters.firecracker.settings import FirecrackerSettings as Settings
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus, fs_name
from microvm_blueprint.runtime.store import Store

from ..conftest import shared_dir
from ..fakes.firecracker_api import JAILER_RECORD
from ..fakes.firecracker_support import JOURNAL, fake_binary, fake_jailer, journal, stand_in_settings
from ..waiting import until


@pytest.fixture
def chroot_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="jl-"))  # short: the API socket lives under it
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _need_spec() -> None:
    if not (shared_dir() / "firecracker" / "firecracker.yaml").is_file():
        pytest.skip("the Firecracker API spec is not available (set MICROVM_SHARED_DIR)")


async def test_firecracker_runs_under_the_jailer(tmp_path: Path, chroot_base: Path) -> None:
    _need_spec()
    settings = stand_in_settings(tmp_path / "fc", jailer=str(fake_jailer(tmp_path / "bin")),
                                 chroot_base=str(chroot_base), jailer_uid=999, jailer_gid=995)
    driver = FirecrackerDriver(settings)
    life = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    o = Origin()
    try:
        await life.create_vm("vm", VmSpec(vcpus=2, mem_mib=256), o)
        assert (await life.start_vm("vm", o)).status is VmStatus.RUNNING
        jail = chroot_base / "firecracker" / f"vm-{fs_name('vm')[:24]}"
        record = json.loads((jail / JAILER_RECORD).read_text())
        argv = record["argv"]
        assert argv[argv.index("--exec-file") + 1] == settings.bin
        assert (record["uid"], record["gid"]) == (999, 995)
        assert argv[argv.index("--chroot-base-dir") + 1] == str(chroot_base)
        assert argv[argv.index("--") + 1:] == ["--api-sock", "/run/firecracker.socket"]
        mem = (256 + 256) << 20
        assert record["cgroups"] in (
            [f"memory.limit_in_bytes={mem}", "cpu.cfs_quota_us=200000", "cpu.cfs_period_us=100000", "pids.max=512"],
            [f"memory.max={mem}", "cpu.max=200000 100000", "pids.max=512"],
        )
        vm = life.store.get_vm("vm")
        assert vm is not None and vm.handle is not None
        assert vm.handle.control == str(jail / "root" / "run" / "firecracker.socket")
        await life.destroy_vm("vm", o)
    finally:
        await life.close(stop_vms=True)


def test_jailer_stand_in_refuses_a_wrong_argv(tmp_path: Path, chroot_base: Path) -> None:
    jailer = fake_jailer(tmp_path)
    fc = tmp_path / "firecracker"
    fc.write_text("#!/bin/sh\nexit 0\n")
    fc.chmod(0o755)
    good = ["--id", "vm-1", "--exec-file", str(fc), "--uid", "999", "--gid", "995", "--cgroup-version", "1",
            "--chroot-base-dir", str(chroot_base), "--", "--api-sock", "/run/firecracker.socket"]
    assert subprocess.run([str(jailer), *good], capture_output=True, timeout=30).returncode == 0
    for bad in (
        [a for a in good if a not in ("--uid", "999")],  # no --uid
        [*good[:1], "vm_1!", *good[2:]],  # an id the jailer refuses
        [*good[:11], "--cgroup", "memory.max=1", *good[11:]],  # a v2 file with --cgroup-version 1
        [*good[:-2], "--id", "x", "--api-sock", "/run/firecracker.socket"],  # --id is the jailer's
        good[: good.index("--")],  # no firecracker arguments
    ):
        out = subprocess.run([str(jailer), *bad], capture_output=True, timeout=30)
        assert out.returncode != 0, bad


def test_jailer_settings_from_env() -> None:
    s = Settings.from_env({"MICROVM_FIRECRACKER_JAILER": "/usr/bin/jailer", "MICROVM_VMM_USER": "",
                           "MICROVM_FIRECRACKER_CHROOT_BASE": "/srv/j"})
    assert (s.jailer, s.chroot_base) == ("/usr/bin/jailer", "/srv/j")
    assert FirecrackerSettings.from_env({}).jailer == ""


def _jailed(tmp_path: Path, chroot_base: Path, **overrides: object) -> FirecrackerSettings:
    return stand_in_settings(tmp_path / "fc", jailer=str(fake_jailer(tmp_path / "bin")), chroot_base=str(chroot_base),
                             jailer_uid=999, jailer_gid=995, stock=False, **overrides)


def _chroots(base: Path) -> list[Path]:
    return sorted((base / "firecracker").glob("*/root")) if (base / "firecracker").is_dir() else []


async def test_a_jailed_vm_lives_its_whole_life_inside_its_chroot(tmp_path: Path, chroot_base: Path) -> None:
    """create, start, snapshot (running and stopped), restore, destroy, with every file Firecracker opens
    inside the chroot and given as a chroot path; destroy leaves no chroot. Before the chroot was populated
    this failed at create: the stand-in refused the host path of the kernel (as a jailed Firecracker would)."""
    _need_spec()
    settings = _jailed(tmp_path, chroot_base)
    driver = FirecrackerDriver(settings)
    life = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    o = Origin()
    try:
        await life.create_vm("a", VmSpec(vcpus=1, mem_mib=256), o)
        assert (await life.start_vm("a", o)).status is VmStatus.RUNNING
        vm = life.store.get_vm("a")
        assert vm is not None
        root = driver.chroot(vm.workdir)
        assert _chroots(chroot_base) == [root]
        disk = Path(vm.workdir) / "rootfs.ext4"  # the VM's own disk: the very file the chroot holds (a link)
        assert (root / "rootfs.ext4").stat().st_ino == disk.stat().st_ino
        assert (disk.stat().st_uid, disk.stat().st_gid, disk.stat().st_mode & 0o777) == (999, 995, 0o600)
        await life.snapshot_vm("a", "hot", o)
        await life.stop_vm("a", o)
        await life.snapshot_vm("a", "cold", o)
        assert not (root / "snapshot").exists()  # the snapshot's files left the chroot ...
        for snap in ("hot", "cold"):
            rec = life.store.get_snapshot("a", snap)
            assert rec is not None
            for name in ("vmstate.bin", "memory.bin", "rootfs.ext4", "cidata.img"):
                assert (Path(rec.path) / name).is_file(), (snap, name)  # ... for where the store keeps them
            assert (Path(rec.path) / "vmstate.bin").stat().st_uid == os.getuid()
        assert (await life.restore_vm("a", "hot", "b", o)).status is VmStatus.RUNNING
        assert (await life.restore_vm("a", "cold", "c", o)).status is VmStatus.STOPPED
        assert (await life.start_vm("c", o)).status is VmStatus.RUNNING
        assert len(_chroots(chroot_base)) == 3
        # every path any stand-in was given is a chroot path, never a host one
        seen = [d["path_on_host"] for lines in journal(settings_journal(settings)).values() for line in lines
                for d in line["drives"]]
        assert seen and all(p.startswith("/") and not p.startswith(str(tmp_path)) for p in seen), seen
        assert {"/rootfs.ext4", "/cidata.img", "/snapshot/rootfs.ext4", "/snapshot/cidata.img"} <= set(seen)
        for vm_id in ("a", "b", "c"):
            await life.destroy_vm(vm_id, o)
        assert _chroots(chroot_base) == []
        assert list((chroot_base / "firecracker").iterdir()) == []  # nor the folders beside the roots
    finally:
        await life.close(stop_vms=True)
    assert _chroots(chroot_base) == []


def settings_journal(settings: FirecrackerSettings) -> Path:
    return Path(settings.bin).parent / JOURNAL


async def test_a_failed_start_leaves_no_chroot(tmp_path: Path, chroot_base: Path) -> None:
    _need_spec()
    bin_ = fake_binary(tmp_path / "never", "--fake-never-listen")
    settings = _jailed(tmp_path, chroot_base, bin=str(bin_), socket_ready_timeout_ms=1500)
    life = Lifecycle(FirecrackerDriver(settings), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    try:
        with pytest.raises(Exception, match="did not appear"):
            await life.create_vm("a", VmSpec(vcpus=1, mem_mib=256), Origin())
        assert _chroots(chroot_base) == []
    finally:
        await life.close(stop_vms=True)


async def test_reconciliation_removes_orphaned_chroots_only(tmp_path: Path, chroot_base: Path) -> None:
    """A chroot whose VM folder (in this operator's state) is gone or not live is removed at start; a
    live VM's is kept, and one naming a folder elsewhere (another operator on the same base) is not touched."""
    _need_spec()
    settings = _jailed(tmp_path, chroot_base)
    life = Lifecycle(FirecrackerDriver(settings), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    o = Origin()
    try:
        await life.create_vm("a", VmSpec(vcpus=1, mem_mib=256), o)
        live = _chroots(chroot_base)
        parent = chroot_base / "firecracker"
        orphan, foreign = parent / "vm-0rphan", parent / "vm-f0reign"
        for jail, workdir in ((orphan, life.vms_dir / "gone"), (foreign, tmp_path / "elsewhere" / "vms" / "x")):
            (jail / "root").mkdir(parents=True)
            (jail / "workdir").write_text(str(workdir))
        summary = await life.reconcile()
        assert not orphan.exists() and foreign.exists(), summary
        assert _chroots(chroot_base) == sorted([*live, foreign / "root"])
    finally:
        await life.close(stop_vms=True)


async def test_the_jailed_stand_in_resolves_api_paths_inside_the_chroot(tmp_path: Path, chroot_base: Path) -> None:
    """What the jailed Firecracker can open: a host path names nothing in the chroot; a file there must be
    readable by the jailer's uid (a writable drive: writable)."""
    _need_spec()
    fc = fake_binary(tmp_path / "bin")
    jailer = fake_jailer(tmp_path / "bin")
    root = chroot_base / "firecracker" / "vm-1" / "root"
    root.mkdir(parents=True)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    argv = [str(jailer), "--id", "vm-1", "--exec-file", str(fc), "--uid", "999", "--gid", "995",
            "--chroot-base-dir", str(chroot_base), "--", "--api-sock", "/run/firecracker.socket"]
    log = (tmp_path / "fc.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        sock = root / "run" / "firecracker.socket"
        await until(sock.exists, timeout=15, what="the jailed stand-in's API socket")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x", timeout=10) as api:
            def put(path: str, body: Mapping[str, object]) -> httpx.Response:
                return api.put(path, json=body)

            boot = {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"}
            refused = put("/boot-source", boot)  # the host path: what the driver sent before
            assert refused.status_code == 400 and "No such file" in refused.json()["fault_message"]
            shutil.copyfile(kernel, root / "vmlinux")
            os.chmod(root / "vmlinux", 0o600)  # root's, 0600: the uid 999 cannot read it
            refused = put("/boot-source", {**boot, "kernel_image_path": "/vmlinux"})
            assert refused.status_code == 400 and "Permission denied" in refused.json()["fault_message"]
            os.chown(root / "vmlinux", 999, 995)
            assert put("/boot-source", {**boot, "kernel_image_path": "/vmlinux"}).status_code == 204
            assert put("/boot-source", {**boot, "kernel_image_path": "vmlinux"}).status_code == 204  # relative: from /
            shutil.copyfile(kernel, root / "disk")
            os.chown(root / "disk", 999, 995)
            os.chmod(root / "disk", 0o400)  # readable, not writable
            drive = {"drive_id": "rootfs", "path_on_host": "/disk", "is_root_device": True, "is_read_only": False}
            refused = put("/drives/rootfs", drive)
            assert refused.status_code == 400 and "writable" in refused.json()["fault_message"]
            assert put("/drives/rootfs", {**drive, "is_read_only": True}).status_code == 204
            assert put("/drives/rootfs", {**drive, "is_read_only": True, "path_on_host": "/../../disk"}).status_code == 204
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        log.close()


async def test_a_jailed_vmm_is_re_adopted_and_destroyed_after_an_operator_restart(tmp_path: Path,
                                                                                  chroot_base: Path) -> None:
    """A jailed Firecracker's working directory is its chroot (the jailer chroots and changes to ``/``),
    not the VM folder: the pid-reuse guard must look there, or a restarted operator would neither re-adopt
    the VM nor stop its VMM at destroy (it failed so before the stand-in jailer changed folder as the real
    one does)."""
    _need_spec()
    settings = _jailed(tmp_path, chroot_base)
    store = tmp_path / "s.sqlite3"
    first = Lifecycle(FirecrackerDriver(settings), Store(store), state_dir=tmp_path / "state")
    o = Origin()
    await first.create_vm("a", VmSpec(vcpus=1, mem_mib=256), o)
    assert (await first.start_vm("a", o)).status is VmStatus.RUNNING
    vm = first.store.get_vm("a")
    assert vm is not None and vm.handle is not None and vm.handle.pid
    pid = vm.handle.pid
    await first.close(stop_vms=False)  # the operator exits; its VMs run on

    driver = FirecrackerDriver(settings)
    second = Lifecycle(driver, Store(store), state_dir=tmp_path / "state")
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == str(driver.chroot(vm.workdir))
        assert "1 vm(s) re-adopted" in await second.reconcile()
        assert (await second.get_vm("a")).status is VmStatus.RUNNING
        await second.destroy_vm("a", o)

        def gone() -> bool:  # exited (a zombie of this test process, which spawned it through the first driver)
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        await until(gone, 10, "the jailed VMM stopped by destroy")
        assert _chroots(chroot_base) == []
    finally:
        await second.close(stop_vms=True)
