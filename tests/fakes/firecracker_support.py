"""Make a FirecrackerDriver whose binary is the spec-checking stand-in; find stand-ins left running."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver, FirecrackerSettings

STAND_IN = Path(__file__).resolve().parent / "firecracker_api.py"


def fake_binary(tmp: Path, *extra: str) -> Path:
    """An executable file standing in for `firecracker`: it execs the stand-in with the driver's argv
    (after ``extra``, the stand-in's ``--fake-*`` test hooks)."""
    tmp.mkdir(parents=True, exist_ok=True)
    shim = tmp / "firecracker"
    args = " ".join(f"'{a}'" for a in extra)
    shim.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{STAND_IN}' {args} \"$@\"\n")
    shim.chmod(0o755)
    return shim


def short_socket_dir(tmp: Path) -> str:
    """``tmp/sock`` if socket paths in it stay well under the Unix limit, else a short temp folder."""
    candidate = tmp / "sock"
    if len(os.fsencode(str(candidate))) <= 70:
        return str(candidate)
    return tempfile.mkdtemp(prefix="fc-")


def fake_project_image(folder: Path) -> tuple[Path, Path]:
    """A stand-in for one of this project's built images: ``manifest.json`` as ``images.build_image``
    writes it, a kernel file, and a rootfs holding the image's ``/sbin/init`` (which is how the
    stand-in's guest knows to print the ready line). Returns (kernel, rootfs)."""
    folder.mkdir(parents=True, exist_ok=True)
    kernel, rootfs = folder / "vmlinux", folder / "rootfs.ext4"
    kernel.write_bytes(b"\x7fELF fake kernel")
    init = images.ROOT_INIT.format(ready=images.READY_LINE).encode()
    rootfs.write_bytes((b"\0" * 4096 + init).ljust(65536, b"\0"))
    manifest = images.ImageManifest(
        name="default", root=str(folder), bzimage=str(kernel), vmlinux=str(kernel), initramfs="",
        rootfs=str(rootfs), rootfs_size_mib=1, kernel_package="fake", kernel_version="fake",
        busybox_version="fake", cmdline="", ready_line=images.READY_LINE, created_at=0.0, sha256={},
    )
    (folder / "manifest.json").write_text(json.dumps(asdict(manifest)))
    return kernel, rootfs


def fake_stock_image(folder: Path) -> tuple[Path, Path]:
    """A stock distribution kernel + rootfs (what a user downloads): no manifest, no ready line."""
    folder.mkdir(parents=True, exist_ok=True)
    kernel, rootfs = folder / "vmlinux", folder / "rootfs.ext4"
    kernel.write_bytes(b"\x7fELF fake kernel")
    rootfs.write_bytes((b"\0" * 4096 + b"/lib/systemd/systemd\0/sbin/agetty\0").ljust(65536, b"\0"))
    return kernel, rootfs


def stand_in_settings(tmp: Path, *extra: str, stock: bool = False, **overrides: object) -> FirecrackerSettings:
    """Settings over the stand-in booting a fake project image (``stock=True``: a stock rootfs)."""
    tmp.mkdir(parents=True, exist_ok=True)
    kernel, rootfs = (fake_stock_image if stock else fake_project_image)(tmp / ("stock" if stock else "image"))
    values: dict[str, object] = {
        "bin": str(fake_binary(tmp, *extra)), "kernel": str(kernel), "rootfs": str(rootfs),
        "socket_dir": short_socket_dir(tmp), "rootfs_ro": False, "boot_timeout_ms": 15000,
        "socket_ready_timeout_ms": 15000, **overrides,
    }
    return FirecrackerSettings(**values)  # type: ignore[arg-type]


def stand_in_driver(tmp: Path, *extra: str, stock: bool = False, **overrides: object) -> FirecrackerDriver:
    return FirecrackerDriver(stand_in_settings(tmp, *extra, stock=stock, **overrides))


def stand_ins(marker: str) -> list[int]:
    """Pids of live (non-zombie) stand-in processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if str(STAND_IN) in cmdline and marker in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_stand_ins(marker: str) -> list[int]:
    """SIGKILL every stand-in matching ``marker`` (a test's cleanup of last resort); returns their pids."""
    pids = stand_ins(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
