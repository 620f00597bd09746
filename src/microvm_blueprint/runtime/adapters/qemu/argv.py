"""QEMU settings, the file names inside a VM folder, and one VM's argv (with the TCG clock pinning).

Pure functions of their arguments (and of the host's TSC frequency): nothing here spawns a process.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ... import images
from ...confine import Confinement
from ...model import USER_GATEWAY, USER_GUEST_IP, DiskLimits, NetworkMode, VmNetwork
from ...netns import TAP

QMP_SOCK = "qmp.sock"
PID_FILE = "qemu.pid"
"""Written by the operator right after the spawn, not by QEMU's ``-pidfile`` (QEMU resolves that path
through every folder above the VM's, which the VMM user cannot enter: DATA_DIR is 0700)."""
QEMU_LOG = "qemu.log"
CONSOLE_LOG = "console.log"
"""The guest console, written by QEMU itself (the chardev's ``logfile=``): nothing is lost when the
operator dies, and the operator only reads it and keeps it capped (``console.py``)."""
DISK = "disk.qcow2"
CONFIG_DRIVE = "cidata.img"
"""The VM's NoCloud config drive (DESIGN.md §8), a second read-only virtio disk after the root."""
CONFIG = "vm.json"
SNAP_MEMORY = "memory.bin"
SNAP_DISK = "disk.qcow2"
SNAP_CONFIG = "vm.json"
LAST_SAVE = "last-save.bin"
"""Hard link (or copy) of the memory file of the last save of a VM that stayed paused after it.

QEMU 7.2 refuses a second ``migrate`` of a VM left in ``postmigrate`` ("Can't migrate the vm that was
paused due to previous migration"); such a VM has not executed since, so its state *is* that file."""
CONSOLE_DEV = "console"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
"""QEMU's seccomp filter (DESIGN.md §9): installed before the guest runs; with ``elevateprivileges=deny``
QEMU can never regain root, which is also why it is spawned as its user rather than told ``-runas``."""
DISK_ERRORS = "werror=report,rerror=report"
"""A disk error goes to the guest as an I/O error (and to the operator as ``BLOCK_IO_ERROR``), never
pauses the VM behind the API's back (QEMU's default ``enospc`` stops it on a full disk)."""


@dataclass(frozen=True)
class QemuSettings:
    qemu_bin: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    image_dir: Path | None = None
    accel: str = "auto"  # auto | kvm | tcg
    boot_timeout: float = 90.0
    qmp_timeout: float = 30.0
    migrate_timeout: float = 180.0
    stop_timeout: float = 10.0
    console_ring_bytes: int = 64 * 1024
    """Size of the chardev's ring inside QEMU (a power of two); the console itself is the log file."""
    console_log_bytes: int = 1024 * 1024
    """Cap on the disk space ``console.log`` holds while the operator runs (its head is dropped)."""
    kvm_probe_timeout: float = 20.0
    extra_cmdline: str = ""
    confine: Confinement | None = None
    """Who QEMU runs as and its cgroup (``runtime/confine.py``); ``None``: as the operator, no cgroup."""
    disk_limits: DiskLimits = field(default_factory=DiskLimits)
    """``MICROVM_DISK_BPS``/``_IOPS``: the customer disk's throttling (:func:`throttling`)."""


_TSC_LINES = (
    re.compile(r"tsc: Refined TSC clocksource calibration: ([0-9.]+) MHz"),
    re.compile(r"tsc: Detected ([0-9.]+) MHz processor"),
)


def tsc_khz_from_kernel_log(lines: list[str]) -> int | None:
    """The TSC kHz the host kernel calibrated (refined value first), from its log lines."""
    for pattern in _TSC_LINES:
        for line in reversed(lines):
            m = pattern.search(line)
            if m:
                return round(float(m.group(1)) * 1000)
    return None


def _kernel_log() -> list[str]:
    """The host kernel's log ring (``/dev/kmsg``, non-blocking); empty if not readable."""
    lines: list[str] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return lines
    try:
        while len(lines) < 100_000:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # a record was overwritten while reading: skip it
                continue
            except OSError:
                break
            if not rec:
                break
            lines.append(rec.decode("utf-8", "replace").split(";", 1)[-1])
    finally:
        os.close(fd)
    return lines


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency (TCG guests read the host's TSC); ``None`` if unknown.

    The kernel's own calibration (``tsc: Refined TSC ...`` / ``tsc: Detected ...``) is preferred:
    ``cpu MHz`` in /proc/cpuinfo is the *current* clock on hosts with frequency scaling."""
    khz = tsc_khz_from_kernel_log(_kernel_log())
    if khz:
        return khz
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        return None
    return None


def kernel_cmdline(base: str, accel: str, extra: str = "") -> str:
    """Kernel arguments; under TCG pin the TSC calibration (early calibration against the PIT
    fails now and then under emulation and the boot hangs for good — DESIGN.md §4)."""
    parts = [base]
    if accel == "tcg":
        khz = host_tsc_khz()
        if khz:
            parts.append(f"tsc_early_khz={khz} lpj={khz * 4}")  # Debian's kernels run at HZ=250
    if extra:
        parts.append(extra)
    return " ".join(parts)


def qemu_argv(
    settings: QemuSettings,
    manifest: images.ImageManifest,
    *,
    vcpus: int,
    mem_mib: int,
    accel: str,
    incoming: bool = False,
    network: VmNetwork | None = None,
    config_drive: bool = False,
) -> list[str]:
    """The argv of one VM's QEMU (relative paths: QEMU runs in the VM folder).

    The serial console is a ``ringbuf`` chardev that also appends everything the guest prints to
    ``console.log`` (``logfile=``, ``logappend=on``): QEMU writes the console, so no output waits in
    the operator's memory, and a file only ever appended to keeps its offsets for readers."""
    argv = [
        settings.qemu_bin,
        "-M", "microvm,x-option-roms=off,rtc=on",
        "-accel", accel,
        "-cpu", "max" if accel == "tcg" else "host",
        "-m", str(mem_mib),
        "-smp", str(vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-sandbox", SANDBOX,
        "-kernel", manifest.bzimage,
        "-initrd", manifest.initramfs,
        "-append", kernel_cmdline(manifest.cmdline, accel, settings.extra_cmdline),
        "-chardev", f"ringbuf,id={CONSOLE_DEV},size={settings.console_ring_bytes},"
                    f"logfile={CONSOLE_LOG},logappend=on",
        "-serial", f"chardev:{CONSOLE_DEV}",
        "-drive", f"id=root,file={DISK},format=qcow2,if=none,cache=writeback,{DISK_ERRORS}"
                  f"{throttling(settings.disk_limits)}",
        "-device", "virtio-blk-device,drive=root",
    ]
    if config_drive:
        argv += ["-drive", f"id=cidata,file={CONFIG_DRIVE},format=raw,if=none,readonly=on,rerror=report",
                 "-device", "virtio-blk-device,drive=cidata"]
    argv += network_args(network)
    argv += [
        "-qmp", f"unix:{QMP_SOCK},server=on,wait=off",
        "-S",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def throttling(limits: DiskLimits) -> str:
    """The ``-drive`` options that cap a disk at ``limits`` (QEMU's throttle group of one drive: reads and
    writes together, short bursts of up to a tenth of a second's worth allowed); ``""`` without limits."""
    opts = ""
    if limits.bps:
        opts += f",throttling.bps-total={limits.bps}"
    if limits.iops:
        opts += f",throttling.iops-total={limits.iops}"
    return opts


def network_args(network: VmNetwork | None) -> list[str]:
    """The NIC of a VM: none; QEMU user-mode networking with each published port forwarded from
    its host port (``hostfwd``) and, unless the VM's recorded egress policy (``network.egress``, the
    ``MICROVM_EGRESS`` it was created under) allows it, ``restrict=on`` (only its published ports reach
    it, and it reaches nothing, not even the host's loopback via 10.0.2.2); or (``bridge``) the TAP
    of the VM's network namespace, which QEMU runs inside (``runtime/netns.py`` makes it and its
    rules). Host addresses and ports come from the store (validated numbers), never from a customer's text."""
    if network is not None and network.mode is NetworkMode.BRIDGE:
        return ["-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
                "-device", "virtio-net-device,netdev=net0"]
    if network is None or network.mode is not NetworkMode.USER:
        return []
    opts = ["user", "id=net0", f"restrict={'off' if network.egress else 'on'}", f"net={USER_NET}", f"host={USER_GATEWAY}",
            f"dhcpstart={USER_GUEST_IP}"]
    opts += [f"hostfwd=tcp:{m.host}:{m.host_port}-:{m.guest_port}" for m in network.ports]
    return ["-netdev", ",".join(opts), "-device", "virtio-net-device,netdev=net0"]


USER_NET = "10.0.2.0/24"

