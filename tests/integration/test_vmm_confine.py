"""The VMM's privileges and limits with real QEMU guests (DESIGN.md §9, issue #13 item 5): QEMU runs as the
VMM user under its seccomp sandbox with no capabilities, in a cgroup of its own with the spec's limits, in a
0700 folder of 0600 files; a guest that needs more memory than its cgroup allows takes only its VMM down."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.confine import Confinement
from microvm_blueprint.runtime.errors import VmError
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus, fs_name
from microvm_blueprint.runtime.store import Store

from ..qemu_support import ensure_image
from ..waiting import until

pytestmark = pytest.mark.qemu

USER = "microvm"
V1 = Path("/sys/fs/cgroup")


def _need_root_and_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to spawn QEMU as another user and write cgroups)")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"the VMM user {USER!r} does not exist (scripts/bootstrap.sh creates it)")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def _life(tmp_path: Path, confine: Confinement) -> Lifecycle:
    driver = QemuDriver(QemuSettings(image_dir=ensure_image(), accel="tcg", boot_timeout=120, confine=confine))
    return Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")


@pytest.fixture
async def confine() -> AsyncIterator[Confinement]:
    _need_root_and_user()
    c = Confinement(USER, parent=f"microvm-test-{os.getpid()}")
    yield c
    c.sweep()
    for folder in {p.parent for p in c.paths("x")}:
        if folder.is_dir():
            folder.rmdir()  # fails (and so the test) if a VMM's cgroup was left behind


async def test_qemu_runs_unprivileged_sandboxed_and_limited(tmp_path: Path, confine: Confinement) -> None:
    life = await _life(tmp_path, confine)
    o = Origin()
    try:
        await life.create_vm("vm", VmSpec(vcpus=1, mem_mib=192), o)
        await life.start_vm("vm", o)
        vm = life.store.get_vm("vm")
        assert vm is not None and vm.handle is not None and vm.handle.pid
        pid = vm.handle.pid
        status = _status(pid)
        uid = pwd.getpwnam(USER).pw_uid
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
        assert status["Gid"].split()[0] == str(pwd.getpwnam(USER).pw_gid)
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
        assert status["Seccomp"] == "2", status  # the -sandbox filter
        assert status["NoNewPrivs"] == "1", status
        # disk errors go to the guest, never pause it behind the API's back (item 6)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        root = next(a.decode() for a in cmdline if a.startswith(b"id=root,"))
        assert "werror=report" in root and "rerror=report" in root, root
        assert b"-runas" not in cmdline and b"elevateprivileges=deny" in b"".join(cmdline)
        # its cgroup, with the spec's limits (v1 on this machine; v2 where it has the controllers)
        name = fs_name("vm")
        groups = confine.paths(name)
        assert groups, "no cgroup controllers found"
        for group in groups:
            assert str(pid) in (group / "cgroup.procs").read_text().split(), group
        by_ctrl = {g.parent.parent.name: g for g in groups}
        if "memory" in by_ctrl:
            assert int((by_ctrl["memory"] / "memory.limit_in_bytes").read_text()) == (192 + 256) << 20
            assert int((by_ctrl["pids"] / "pids.max").read_text()) == 512
            assert int((by_ctrl["cpu"] / "cpu.cfs_quota_us").read_text()) == 100_000
            assert int((by_ctrl["cpu"] / "cpu.cfs_period_us").read_text()) == 100_000
        else:
            (group,) = groups
            assert int((group / "memory.max").read_text()) == (192 + 256) << 20
            assert (group / "cpu.max").read_text().split() == ["100000", "100000"]
        # the folder is the VMM user's and 0700, its files 0600 (the read-only config drive 0400)
        workdir = Path(vm.workdir)
        st = workdir.stat()
        assert st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o700
        files = {p.name: p.stat() for p in workdir.iterdir() if p.is_file()}
        assert {"disk.qcow2", "console.log", "qemu.log", "vm.json"} <= set(files)
        for fname, fst in files.items():
            assert stat.S_IMODE(fst.st_mode) & 0o077 == 0, (fname, oct(fst.st_mode))
        assert files["disk.qcow2"].st_uid == uid and files["console.log"].st_uid == uid
        # a snapshot holds the guest's memory: 0700 folder, 0600 files, readable by nobody but the operator
        await life.snapshot_vm("vm", "s", o)
        snap = life.store.get_snapshot("vm", "s")
        assert snap is not None
        snapdir = Path(snap.path)
        assert stat.S_IMODE(snapdir.stat().st_mode) == 0o700
        for p in snapdir.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        # destroy removes the cgroup
        await life.destroy_vm("vm", o)
        assert not any(g.exists() for g in groups)
    finally:
        for v in await life.list_vms():
            if v.status is not VmStatus.DESTROYED:
                await life.destroy_vm(v.vm_id, o)
        await life.close(stop_vms=True)


async def test_guest_beyond_its_cgroup_memory_takes_only_its_vmm_down(tmp_path: Path) -> None:
    """The VMM's memory limit set far below the guest's RAM (a negative overhead): booting touches guest
    memory until the cgroup's OOM killer ends QEMU; the VM shows ``failed``; the operator goes on."""
    _need_root_and_user()
    confine = Confinement(USER, parent=f"microvm-test-oom-{os.getpid()}", mem_overhead_mib=-448)
    life = await _life(tmp_path, confine)
    o = Origin()
    try:
        await life.create_vm("hog", VmSpec(vcpus=1, mem_mib=512), o)  # cgroup limit: 64 MiB
        vm = life.store.get_vm("hog")
        assert vm is not None and vm.handle is not None
        (memory,) = [g for g in confine.paths(fs_name("hog")) if g.parent.parent.name in ("memory", "unified", "fs")]
        with pytest.raises(VmError):
            await life.start_vm("hog", o)
        await until(lambda: life.store.get_vm("hog").status is VmStatus.FAILED, 30, "the vm to show failed")  # type: ignore[union-attr]
        failed = await life.get_vm("hog")
        assert failed.status is VmStatus.FAILED and failed.error
        oom = (memory / "memory.oom_control").read_text() if (memory / "memory.oom_control").exists() else ""
        if oom:  # v1: the kill was the cgroup's OOM killer
            assert "oom_kill 1" in oom or int((memory / "memory.failcnt").read_text()) > 0, oom
        # the operator is fine: another VM with a sane limit still boots
        await life.destroy_vm("hog", o)
        assert not memory.exists()
        healthy = Confinement(USER, parent=confine.parent)
        life2 = await _life(tmp_path / "2", healthy)
        try:
            await life2.create_vm("ok", VmSpec(vcpus=1, mem_mib=128), o)
            assert (await life2.start_vm("ok", o)).status is VmStatus.RUNNING
            await life2.destroy_vm("ok", o)
        finally:
            await life2.close(stop_vms=True)
    finally:
        for v in await life.list_vms():
            if v.status is not VmStatus.DESTROYED:
                await life.destroy_vm(v.vm_id, o)
        await life.close(stop_vms=True)
        for folder in {p.parent for p in confine.paths("x")}:
            if folder.is_dir():
                folder.rmdir()
