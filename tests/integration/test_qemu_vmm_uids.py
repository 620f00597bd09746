"""A uid of its own per VMM with real QEMU guests (DESIGN.md §9, ``MICROVM_VMM_UID_RANGE``): two VMs' QEMUs
run as two different unprivileged uids (and gids), each owns its own folder and files, a guest boots as
its uid (it reads the shared images, uses its devices), and one VM's uid cannot open the other's disk
or console. The shared-user case: tests/integration/test_vmm_confine.py."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.confine import DEFAULT_UID_RANGE, Confinement, check_uid_range
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus
from microvm_blueprint.runtime.store import Store

from ..qemu_support import ensure_image

pytestmark = pytest.mark.qemu

USER = "microvm"
UIDS = DEFAULT_UID_RANGE  # the default an operator gets


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.fixture
async def life(tmp_path: Path) -> AsyncIterator[Lifecycle]:
    if os.geteuid() != 0:
        pytest.skip("needs root (to spawn QEMU as other users)")
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux setpriv")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"the VMM user {USER!r} does not exist (scripts/bootstrap.sh creates it)")
    check_uid_range(UIDS)  # as the operator does at start
    confine = Confinement(USER, parent=f"microvm-test-uids-{os.getpid()}")
    driver = QemuDriver(QemuSettings(image_dir=ensure_image(), accel="tcg", boot_timeout=120, confine=confine))
    # a state folder every uid may pass through (pytest's tmp folders are 0700; DATA_DIR is 0700 in
    # production): so what keeps one VM's uid out of another VM's files below is that VM folder's owner
    # and mode alone, and the uid's own disk stays reachable (the check that the refusal is not for nothing)
    state = Path(tempfile.mkdtemp(prefix="microvm-uids-", dir="/tmp"))
    state.chmod(0o711)
    life = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=state, vmm_uids=UIDS)
    o = Origin()
    try:
        yield life
    finally:
        for v in await life.list_vms():
            if v.status is not VmStatus.DESTROYED:
                await life.destroy_vm(v.vm_id, o)
        await life.close(stop_vms=True)
        confine.sweep()
        for folder in {p.parent for p in confine.paths("x")}:
            if folder.is_dir():
                folder.rmdir()
        shutil.rmtree(state, ignore_errors=True)


async def _as(uid: int, *argv: str) -> tuple[int, str]:
    """Run ``argv`` as ``uid``/``uid`` with no supplementary groups (what a compromised VMM could do)."""
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_two_vms_run_as_two_uids_that_cannot_open_each_others_files(life: Lifecycle) -> None:
    o = Origin()
    await life.create_vm("a", VmSpec(vcpus=1, mem_mib=192), o)
    await life.create_vm("b", VmSpec(vcpus=1, mem_mib=192), o)
    await life.start_vm("a", o)  # a guest boots as its own uid: the images and its devices are usable
    ids: dict[str, int] = {}
    for v in ("a", "b"):
        vm = life.store.get_vm(v)
        assert vm is not None and vm.handle is not None and vm.handle.pid
        uid = life.store.vmm_uid(v)
        assert uid is not None and UIDS[0] <= uid <= UIDS[1]
        status = _status(vm.handle.pid)
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(uid)] * 4, status["Gid"]
        assert int(status["CapEff"], 16) == 0 and status["Seccomp"] == "2", status
        workdir = Path(vm.workdir)
        st = workdir.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, uid, 0o700)
        for name in ("disk.qcow2", "console.log"):
            fst = (workdir / name).stat()
            assert (fst.st_uid, fst.st_gid, stat.S_IMODE(fst.st_mode)) == (uid, uid, 0o600), name
        ids[v] = uid
    assert ids["a"] != ids["b"] and 0 not in ids.values()
    a, b = life.store.get_vm("a"), life.store.get_vm("b")
    assert a is not None and b is not None
    # a's VMM uid reads its own disk, but not b's (nor b's console), and the other way round
    code, out = await _as(ids["a"], "head", "-c", "4", str(Path(a.workdir) / "disk.qcow2"))
    assert code == 0, out
    for mine, theirs in ((ids["a"], b), (ids["b"], a)):
        for name in ("disk.qcow2", "console.log"):
            code, out = await _as(mine, "cat", str(Path(theirs.workdir) / name))
            assert code != 0 and "Permission denied" in out, (mine, name, out)
    # destroy gives the uid back; the next VM may have it
    await life.destroy_vm("b", o)
    assert life.store.vmm_uid("b") is None
    await life.create_vm("c", VmSpec(vcpus=1, mem_mib=192), o)
    assert life.store.vmm_uid("c") == ids["b"]
