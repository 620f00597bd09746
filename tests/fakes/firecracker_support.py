"""Make a FirecrackerDriver whose binary is the spec-checking stand-in; find stand-ins left running;
read the drives, network interfaces and namespaces the stand-ins had (their ``--fake-journal``)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.adapters.firecracker import FirecrackerDriver, FirecrackerSettings

STAND_IN = Path(__file__).resolve().parent / "firecracker_api.py"
JOURNAL = "drives.jsonl"


def fake_binary(tmp: Path, *extra: str) -> Path:
    """An executable file standing in for `firecracker`: it execs the stand-in with the driver's argv
    (after ``extra``, the stand-in's ``--fake-*`` test hooks)."""
    tmp.mkdir(parents=True, exist_ok=True)
    shim = tmp / "firecracker"
    args = " ".join(f"'{a}'" for a in extra)
    shim.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{STAND_IN}' {args} \"$@\"\n")
    shim.chmod(0o755)
    return shim


def fake_jailer(tmp: Path) -> Path:
    """An executable file standing in for Firecracker's `jailer` (the stand-in's ``jailer`` mode)."""
    tmp.mkdir(parents=True, exist_ok=True)
    shim = tmp / "jailer"
    shim.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{STAND_IN}' jailer \"$@\"\n")
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
    """Settings over the stand-in booting a fake project image (``stock=True``: a stock rootfs); every
    stand-in process journals its drives to ``tmp/drives.jsonl`` (see :func:`final_drives`)."""
    tmp.mkdir(parents=True, exist_ok=True)
    kernel, rootfs = (fake_stock_image if stock else fake_project_image)(tmp / ("stock" if stock else "image"))
    values: dict[str, object] = {
        "bin": str(fake_binary(tmp, "--fake-journal", str(tmp / JOURNAL), *extra)), "kernel": str(kernel), "rootfs": str(rootfs),
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


def final_drives(journal: Path) -> dict[int, list[dict[str, Any]]]:
    """The drives each stand-in process (by pid) had at its last drive change or load, as it journalled
    them (``--fake-journal``): readable after the processes and the VMs' folders are gone."""
    last: dict[int, list[dict[str, Any]]] = {}
    try:
        lines = journal.read_text().splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        entry = json.loads(line)
        last[int(entry["pid"])] = list(entry["drives"])
    return last


def journal(path: Path) -> dict[int, list[dict[str, Any]]]:
    """Every line each stand-in process (by pid) journalled, in order (``event``, ``drives``, ``nets``,
    ``netns``): see the stand-in's ``--fake-journal``."""
    out: dict[int, list[dict[str, Any]]] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        entry = json.loads(line)
        out.setdefault(int(entry["pid"]), []).append(entry)
    return out


def config_drive_problems(drives: list[dict[str, Any]]) -> list[str]:
    """What is wrong with a VM's drives, judged by DESIGN.md §8: exactly the root drive and a read-only,
    non-root ``cidata`` drive whose FAT label is CIDATA and whose meta-data has an instance-id."""
    problems = []
    if [d.get("drive_id") for d in drives] != ["rootfs", "cidata"]:
        problems.append(f"drives are {[d.get('drive_id') for d in drives]}, not ['rootfs', 'cidata']")
    for d in drives:
        if d.get("drive_id") == "rootfs" and d.get("is_root_device") is not True:
            problems.append("rootfs is not the root device")
        if d.get("drive_id") == "cidata":
            if (d.get("is_root_device"), d.get("is_read_only")) != (False, True):
                problems.append(f"cidata is not a read-only non-root drive: {d}")
            found = d.get("found") or {}
            if found.get("fat_label") != "CIDATA":
                problems.append(f"cidata's FAT label is {found.get('fat_label')!r}: {found}")
            elif not instance_id(found.get("meta-data")):
                problems.append(f"cidata's meta-data has no instance-id: {found}")
    return problems


def instance_id(meta_data: str | None) -> str:
    """The ``instance-id`` of a NoCloud meta-data file ('' if none)."""
    try:
        doc = json.loads(meta_data or "")
    except ValueError:
        return ""
    value = doc.get("instance-id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""
