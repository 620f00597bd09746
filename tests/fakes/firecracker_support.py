"""Make a FirecrackerDriver whose binary is the spec-checking stand-in; find stand-ins left running."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

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


def stand_in_settings(tmp: Path, *extra: str, **overrides: object) -> FirecrackerSettings:
    tmp.mkdir(parents=True, exist_ok=True)
    kernel = tmp / "vmlinux"
    rootfs = tmp / "rootfs.ext4"
    kernel.write_bytes(b"\x7fELF fake kernel")
    rootfs.write_bytes(b"\0" * 65536)
    values: dict[str, object] = {
        "bin": str(fake_binary(tmp, *extra)), "kernel": str(kernel), "rootfs": str(rootfs),
        "socket_dir": short_socket_dir(tmp), "rootfs_ro": False, "boot_timeout_ms": 15000,
        "socket_ready_timeout_ms": 15000, **overrides,
    }
    return FirecrackerSettings(**values)  # type: ignore[arg-type]


def stand_in_driver(tmp: Path, *extra: str, **overrides: object) -> FirecrackerDriver:
    return FirecrackerDriver(stand_in_settings(tmp, *extra, **overrides))


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
