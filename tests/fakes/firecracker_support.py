"""Make a FirecrackerDriver whose binary is the spec-checking stand-in."""

from __future__ import annotations

import sys
from pathlib import Path

from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver, FirecrackerSettings

STAND_IN = Path(__file__).resolve().parent / "firecracker_api.py"


def fake_binary(tmp: Path, *extra: str) -> Path:
    """An executable file standing in for `firecracker` (it execs the stand-in with the same argv)."""
    shim = tmp / "firecracker"
    args = " ".join(extra)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STAND_IN}" {args} "$@"\n')
    shim.chmod(0o755)
    return shim


def stand_in_driver(tmp: Path, *extra: str, **overrides: object) -> FirecrackerDriver:
    tmp.mkdir(parents=True, exist_ok=True)
    kernel = tmp / "vmlinux"
    rootfs = tmp / "rootfs.ext4"
    kernel.write_bytes(b"\x7fELF fake kernel")
    rootfs.write_bytes(b"\0" * 65536)
    values: dict[str, object] = {
        "bin": str(fake_binary(tmp, *extra)), "kernel": str(kernel), "rootfs": str(rootfs),
        "socket_dir": str(tmp / "sock"), **overrides,
    }
    settings = FirecrackerSettings(**values)  # type: ignore[arg-type]
    return FirecrackerDriver(settings)
