"""The config drive every VM gets (DESIGN.md §8): a small FAT image in cloud-init's NoCloud format.

Volume label ``CIDATA`` (cloud-init compares labels case-insensitively), three files:

* ``meta-data``      ``instance-id`` (new for every VM and every restored clone) and ``local-hostname``;
* ``user-data``      ``#cloud-config`` with ``ssh_authorized_keys`` for root (and the wish to grow the root);
* ``network-config`` version 2: one static address on ``eth0`` (or DHCP).

Every file is JSON, which is valid YAML: nothing a customer sends is ever spliced into YAML text, so a key
cannot smuggle a line into the config (and :func:`~.access.validate_ssh_keys` already refuses anything
that is not one printable-ASCII line). The image is made without loop mounts (``mkfs.vfat`` +
``mcopy``, from Debian's dosfstools and mtools), every tool runs as an argv list with a deadline, and the
result is written to a temporary file beside the destination and renamed into place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .access import validate_ssh_keys
from .errors import ImageError, InvalidInput
from .model import NetworkMode, VmRecord

LABEL = "CIDATA"
MAX_INSTANCE_ID = 128
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
MIN_IMAGE_KIB = 1024
TOOL_TIMEOUT = 30.0
SBIN_DIRS = ("/usr/sbin", "/sbin")
"""Where mkfs.vfat lives when ``PATH`` (a non-root user's) leaves these out."""


@dataclass(frozen=True)
class GuestNetwork:
    """The guest's one NIC (``eth0``): a static IPv4 address with a default route, or DHCP."""

    address: str = "10.0.2.15/24"
    gateway: str = "10.0.2.2"
    nameservers: tuple[str, ...] = ()
    dhcp: bool = False
    mac: str | None = None

    @classmethod
    def user(cls, *, dhcp: bool = False) -> GuestNetwork:
        """QEMU user-mode networking (slirp): 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3."""
        return cls(address="10.0.2.15/24", gateway="10.0.2.2", nameservers=("10.0.2.3",), dhcp=dhcp)

    @classmethod
    def bridge(cls) -> GuestNetwork:
        """A TAP on a per-VM /30 (DESIGN.md §10): 172.16.0.2/30, gateway 172.16.0.1."""
        return cls(address="172.16.0.2/30", gateway="172.16.0.1")

    def check(self) -> GuestNetwork:
        """Raise :class:`InvalidInput` unless every address parses and the gateway is on the subnet."""
        try:
            iface = ipaddress.IPv4Interface(self.address)
            gateway = ipaddress.IPv4Address(self.gateway)
            for ns in self.nameservers:
                ipaddress.IPv4Address(ns)
        except ValueError as exc:
            raise InvalidInput(f"network: {exc}") from exc
        if "/" not in self.address:
            raise InvalidInput("network: address needs a prefix length (e.g. 10.0.2.15/24)")
        if gateway not in iface.network or gateway == iface.ip:
            raise InvalidInput(f"network: gateway {gateway} is not another host on {iface.network}")
        if self.mac is not None and not _MAC.fullmatch(self.mac):
            raise InvalidInput("network: mac must look like 52:54:00:12:34:56 (lower case)")
        return self

    def to_v2(self) -> dict[str, Any]:
        """cloud-init network config version 2."""
        eth: dict[str, Any] = {}
        if self.mac:
            eth["match"] = {"macaddress": self.mac}
            eth["set-name"] = "eth0"
        if self.dhcp:
            eth["dhcp4"] = True
        else:
            eth["dhcp4"] = False
            eth["addresses"] = [self.address]
            eth["routes"] = [{"to": "0.0.0.0/0", "via": self.gateway}]
        if self.nameservers:
            eth["nameservers"] = {"addresses": list(self.nameservers)}
        return {"version": 2, "ethernets": {"eth0": eth}}


@dataclass(frozen=True)
class GuestConfig:
    """What a guest learns about itself at boot. Build with :meth:`make` (validates everything)."""

    instance_id: str
    hostname: str
    ssh_authorized_keys: tuple[str, ...] = ()
    network: GuestNetwork | None = None
    grow_root: bool = True

    @classmethod
    def make(cls, instance_id: str, hostname: str, ssh_authorized_keys: Sequence[str] = (),
             network: GuestNetwork | None = None, grow_root: bool = True) -> GuestConfig:
        """A checked config; the keys go through :func:`~.access.validate_ssh_keys`."""
        return cls(instance_id=instance_id, hostname=hostname, ssh_authorized_keys=validate_ssh_keys(
            ssh_authorized_keys), network=network, grow_root=grow_root).check()

    def check(self) -> GuestConfig:
        """Raise :class:`InvalidInput` (naming the field) unless every value is safe to write."""
        if (not isinstance(self.instance_id, str) or len(self.instance_id) > MAX_INSTANCE_ID
                or not _INSTANCE_ID.fullmatch(self.instance_id)):
            raise InvalidInput(f"instance_id must be 1-{MAX_INSTANCE_ID} characters of A-Z a-z 0-9 . _ -"
                               " starting with a letter or digit")
        validate_hostname(self.hostname)
        if not isinstance(self.ssh_authorized_keys, tuple):
            raise InvalidInput("ssh_authorized_keys must be a tuple (use GuestConfig.make)")
        validate_ssh_keys(self.ssh_authorized_keys)
        if not isinstance(self.grow_root, bool):
            raise InvalidInput("grow_root must be a bool")
        if self.network is not None:
            self.network.check()
        return self

    def meta_data(self) -> bytes:
        return _json({"instance-id": self.instance_id, "local-hostname": self.hostname})

    def user_data(self) -> bytes:
        doc: dict[str, Any] = {
            "hostname": self.hostname,
            "disable_root": False,
            "ssh_pwauth": False,
            "ssh_authorized_keys": list(self.ssh_authorized_keys),
            "resize_rootfs": self.grow_root,
        }
        if self.grow_root:
            doc["growpart"] = {"mode": "auto", "devices": ["/"]}
        return b"#cloud-config\n" + _json(doc)

    def network_config(self) -> bytes:
        if self.network is None:
            return _json({"version": 2, "ethernets": {}})
        return _json(self.network.to_v2())

    def files(self) -> dict[str, bytes]:
        """The drive's files by name (what :func:`build_config_drive` writes)."""
        return {"meta-data": self.meta_data(), "user-data": self.user_data(),
                "network-config": self.network_config()}


def validate_hostname(hostname: object) -> str:
    """RFC 1123: dot-separated labels of letters, digits and inner hyphens; at most 253 characters."""
    if not isinstance(hostname, str) or not 1 <= len(hostname) <= 253:
        raise InvalidInput("hostname must be 1-253 characters")
    if not all(_HOST_LABEL.fullmatch(label) for label in hostname.split(".")):
        raise InvalidInput("hostname must be dot-separated labels of letters, digits and inner hyphens")
    return hostname


def hostname_for(vm_id: str) -> str:
    """A valid hostname from any VM id: its safe characters, else ``vm-<hash>``."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", vm_id.lower()).strip("-")[:40].strip("-")
    if cleaned and _HOST_LABEL.fullmatch(cleaned):
        return cleaned
    return "vm-" + hashlib.sha256(vm_id.encode()).hexdigest()[:12]


def new_instance_id() -> str:
    """A fresh instance-id (cloud-init re-runs its per-instance steps when it changes)."""
    return "i-" + os.urandom(8).hex()


def _json(doc: dict[str, Any]) -> bytes:
    # JSON is YAML (1.2, and what PyYAML reads): ASCII only, every string double-quoted and escaped.
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _tool(name: str) -> str:
    for candidate in (shutil.which(name), *(f"{d}/{name}" for d in SBIN_DIRS)):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ImageError(f"building a config drive needs `{name}` (apt-get install dosfstools mtools)")


def _env() -> dict[str, str]:
    # mtools: no user config, no geometry sanity check on an image file
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null",
            "HOME": "/nonexistent", "LC_ALL": "C"}


def image_kib(files: dict[str, bytes]) -> int:
    """Size of the FAT image: 1 MiB, or more when the files need it (4 KiB clusters, FAT12/16 overhead)."""
    need = sum(-(-len(data) // 4096) * 4 for data in files.values()) + 256
    return max(MIN_IMAGE_KIB, -(-need // 1024) * 1024)


def _plan(config: GuestConfig, staging: Path) -> list[list[str]]:
    files = config.files()
    for name, data in files.items():
        (staging / name).write_bytes(data)
    serial = hashlib.sha256(config.instance_id.encode()).hexdigest()[:8]
    image = str(staging / "drive.img")
    argvs = [[_tool("mkfs.vfat"), "-n", LABEL, "-i", serial, "-C", image, str(image_kib(files))]]
    argvs += [[_tool("mcopy"), "-i", image, "-o", str(staging / name), f"::/{name}"] for name in files]
    return argvs


def build_config_drive(config: GuestConfig, dest: Path, *, timeout: float = TOOL_TIMEOUT) -> Path:
    """Write ``config``'s NoCloud drive to ``dest`` (atomically: a temporary file renamed into place)."""
    config.check()
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix=".cidata-", dir=dest.parent) as tmp:
        staging = Path(tmp)
        for argv in _plan(config, staging):
            try:
                proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=_env(), check=False,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:  # run() killed and reaped it
                raise ImageError(f"config drive: {Path(argv[0]).name} did not finish within {timeout:.0f}s") \
                    from exc
            except OSError as exc:
                raise ImageError(f"config drive: {Path(argv[0]).name} failed: {exc}") from exc
            if proc.returncode != 0:
                raise ImageError(f"config drive: {Path(argv[0]).name} failed ({proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace')[-500:]}")
        _place(staging / "drive.img", dest)
    return dest


async def build_config_drive_async(config: GuestConfig, dest: Path, *, timeout: float = TOOL_TIMEOUT) -> Path:
    """:func:`build_config_drive` for the event loop: each tool awaited with a deadline, killed and
    reaped on timeout or cancellation (cleanup shielded; cancellation propagates)."""
    config.check()
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix=".cidata-", dir=dest.parent) as tmp:
        staging = Path(tmp)
        for argv in _plan(config, staging):
            await _run_async(argv, timeout)
        await asyncio.to_thread(_place, staging / "drive.img", dest)
    return dest


async def _run_async(argv: list[str], timeout: float) -> None:
    what = Path(argv[0]).name
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=_env())
    except OSError as exc:
        raise ImageError(f"config drive: {what} failed: {exc}") from exc
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        raise ImageError(f"config drive: {what} did not finish within {timeout:.0f}s") from exc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        raise ImageError(f"config drive: {what} failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")


def _place(image: Path, dest: Path) -> None:
    with open(image, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(image, 0o444)
    os.replace(image, dest)
    dirfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def guest_config(vm: VmRecord) -> GuestConfig:
    """What a VMM driver writes on ``vm``'s config drive: a new instance-id (every VM, every clone),
    a hostname from its id, root's keys from its spec, and the address its network mode gives it."""
    network = {NetworkMode.USER: GuestNetwork.user(), NetworkMode.BRIDGE: GuestNetwork.bridge()}.get(vm.network.mode)
    return GuestConfig.make(new_instance_id(), hostname_for(vm.vm_id), vm.spec.ssh_keys, network=network,
                            grow_root=True)

