"""Firecracker under its jailer (DESIGN.md §9, issue #13 item 5): with ``MICROVM_FIRECRACKER_JAILER`` set the
driver spawns ``jailer --id --exec-file --uid --gid --cgroup-version --chroot-base-dir [--cgroup ...] --
--api-sock /run/firecracker.socket``, and talks to the socket inside the chroot. The jailer stand-in checks
that argv as the jailer doc describes it and refuses a wrong one."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver, FirecrackerSettings
from microvm_blueprint.runtime.adapters.firecracker.settings import FirecrackerSettings as Settings
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus, fs_name
from microvm_blueprint.runtime.store import Store

from ..conftest import shared_dir
from ..fakes.firecracker_api import JAILER_RECORD
from ..fakes.firecracker_support import fake_jailer, stand_in_settings


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
