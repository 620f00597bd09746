"""The `debian` image boots under TCG with a config drive and lets root in over SSH with the drive's key.

A bare QEMU (the driver's own argv minus ``-S``, plus the config drive and a user-mode NIC with one
``hostfwd``): no operator involved, so this checks the image and the drive alone (DESIGN.md §8).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.qemu import QemuSettings, qemu_argv
from microvm_blueprint.runtime.configdrive import GuestConfig, GuestNetwork, build_config_drive, new_instance_id

from ..qemu_support import ensure_debian_image
from ..waiting import until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

DISK_MIB = 1024


def _debian_image() -> images.ImageManifest:
    return images.resolve_image("debian", ensure_debian_image())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ssh(key: Path, port: int, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
         "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=timeout, check=False)


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@microvm", "-f", str(path)],
                   check=True, timeout=30)
    return path


def _prepare(tmp_path: Path, manifest: images.ImageManifest) -> tuple[Path, str]:
    """A test key, a config drive with it, and a qcow2 overlay of DISK_MIB on the image's root."""
    key = _keygen(tmp_path / "id_ed25519")
    instance_id = new_instance_id()
    cfg = GuestConfig.make(instance_id, "deb-test", [key.with_suffix(".pub").read_text().strip()],
                           GuestNetwork.user())
    build_config_drive(cfg, tmp_path / "cidata.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", manifest.rootfs,
                    str(tmp_path / "disk.qcow2"), f"{DISK_MIB}M"], check=True, timeout=30)
    return key, instance_id


async def test_debian_guest_answers_ssh_with_the_config_drive_key(tmp_path: Path) -> None:
    manifest = _debian_image()
    assert manifest.recipe == "debian" and manifest.ready_line == images.READY_LINE
    key, instance_id = await asyncio.to_thread(_prepare, tmp_path, manifest)
    port = _free_port()
    argv = [a for a in qemu_argv(QemuSettings(), manifest, vcpus=1, mem_mib=256, accel="tcg") if a != "-S"]
    argv[argv.index("-serial") - 1] = "file,id=console,path=console.log"  # the -chardev value
    argv += ["-drive", "id=cidata,file=cidata.img,format=raw,if=none,readonly=on",
             "-device", "virtio-blk-device,drive=cidata",
             "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
             "-device", "virtio-net-device,netdev=n0"]
    console = tmp_path / "console.log"
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        def ready() -> bool:
            assert proc.returncode is None, "QEMU exited:\n" + console.read_text(errors="replace")[-3000:]
            return console.exists() and images.READY_LINE in console.read_text(errors="replace")

        try:
            await until(ready, timeout=180, what="the debian guest's ready line", every=0.1)
        except AssertionError:
            raise AssertionError("no ready line; console:\n" + console.read_text(errors="replace")[-3000:]) from None
        ready_at = time.monotonic() - started
        text = console.read_text(errors="replace")
        assert f"microvm-init: instance-id {instance_id}" in text
        assert "microvm-init: 1 authorized key(s) for root" in text

        result: list[subprocess.CompletedProcess[str]] = []

        async def ssh_works() -> bool:
            r = await asyncio.to_thread(_ssh, key, port, "hostname; nproc; cat /var/lib/cloud/data/instance-id;"
                                        " df -m --output=size / | tail -1; ip -4 addr show eth0; echo ok-$((6*7));"
                                        " echo root=$(awk '$2==\"/\"{print $1}' /proc/mounts)")
            result[:] = [r]
            return r.returncode == 0

        try:
            await until(ssh_works, timeout=120, what="ssh as root", every=1.0)
        except AssertionError:
            raise AssertionError(f"ssh failed: {result[-1].stderr if result else ''}\nconsole:\n"
                                 + console.read_text(errors="replace")[-3000:]) from None
        ssh_at = time.monotonic() - started
        lines = result[0].stdout.split("\n")
        assert lines[0] == "deb-test"  # the hostname comes from the config drive
        assert lines[1] == "1"
        assert lines[2] == instance_id
        assert int(lines[3]) > 900  # the root grew from the image's 512 MiB to the 1 GiB disk
        assert "inet 10.0.2.15/24" in result[0].stdout
        assert "ok-42" in result[0].stdout  # a command ran in the guest's shell
        other = await asyncio.to_thread(_keygen, tmp_path / "other")
        denied = await asyncio.to_thread(_ssh, other, port, "true")
        assert denied.returncode != 0  # only the drive's key gets in
        root = result[0].stdout.split("root=")[-1].strip()
        print(f"\ndebian boot: ready line {ready_at:.1f} s, ssh answered {ssh_at:.1f} s after launch (TCG);"
              f" root on {root}")
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
