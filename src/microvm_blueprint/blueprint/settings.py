"""Operator settings for the blueprint layer, built once at the entry point from env + flags.

The chain side has its own :class:`~microvm_blueprint.tangle.environment.BlueprintEnvironment`;
this object carries what the VM side needs (provider choice, query API address, quotas).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from ..envparse import Env, parse_choice
from ..errors import ConfigError
from ..runtime import netns
from ..runtime.confine import DEFAULT_UID_RANGE, parse_uid_range
from ..runtime.model import (
    DEFAULT_DISK_BPS,
    DEFAULT_DISK_IOPS,
    MAX_DISK_RATE,
    DiskLimits,
    HostLimits,
    NetworkMode,
    NetworkSettings,
)

if TYPE_CHECKING:
    from ..runtime.adapters.firecracker.settings import FirecrackerSettings


class ProviderKind(str, Enum):
    """``MICROVM_PROVIDER`` values."""

    IN_MEMORY = "in-memory"
    QEMU = "qemu"
    FIRECRACKER = "firecracker"

    @classmethod
    def parse(cls, raw: str) -> ProviderKind:
        return cls(parse_choice("MICROVM_PROVIDER", raw, [k.value for k in cls]))


def parse_addr(raw: str, name: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}={raw!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class OperatorSettings:
    data_dir: Path
    provider: ProviderKind = ProviderKind.IN_MEMORY
    api_host: str = "127.0.0.1"
    api_port: int = 3000
    #: seconds a connection to the query API has to send a complete request head (DESIGN.md §9)
    api_header_timeout_s: float = 10.0
    #: query API connections at once (and never more than half the open-file limit)
    api_max_connections: int = 256
    #: ``/vms/{id}/console`` without a signature (``dev``); else only the VM's owner or the service owner
    public_console: bool = False
    ephemeral: bool = False
    stop_vms_on_exit: bool = False
    limits: HostLimits = field(default_factory=HostLimits)
    image_dir: Path | None = None
    qemu_bin: str = "qemu-system-x86_64"
    qemu_accel: str = "auto"
    boot_timeout_s: float = 90.0
    network: NetworkSettings = field(default_factory=NetworkSettings)
    #: DESIGN.md §9: the VMM's user, what its cgroup allows beyond guest memory, the free disk creates need
    vmm_user: str = "microvm"
    #: ``MICROVM_VMM_UID_RANGE``: the uids (and gids) VMMs get one each of, when they switch users (``None``: off)
    vmm_uid_range: tuple[int, int] | None = DEFAULT_UID_RANGE
    vmm_mem_overhead_mib: int = 256
    min_free_mib: int = 512
    #: ``MICROVM_DISK_BPS``/``_IOPS``: each VM's customer disk I/O cap (QEMU applies it; the Firecracker
    #: driver can read it here, as its drive's rate limiter, once it is wired in)
    disk_limits: DiskLimits = field(default_factory=DiskLimits)
    #: ``MICROVM_FIRECRACKER_*``, parsed here once when the provider is Firecracker (else ``None``)
    firecracker: FirecrackerSettings | None = None

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "vms"

    @classmethod
    def from_env(cls, env: Mapping[str, str], data_dir: Path, **overrides: object) -> OperatorSettings:
        """Parse ``MICROVM_*`` (and ``MICROVM_FIRECRACKER_*`` for that provider); ``overrides`` (not
        ``None``) win. Raises :class:`~microvm_blueprint.errors.ConfigError` naming the bad variable."""
        e = Env(env)
        host, port = parse_addr(e.text("MICROVM_API_ADDR", "127.0.0.1:3000"), "MICROVM_API_ADDR")
        limits = HostLimits(
            max_vcpus=e.integer("MICROVM_MAX_VCPUS", 8, 1),
            max_mem_mib=e.integer("MICROVM_MAX_MEM_MIB", 16384, 128),
            max_vms=e.optional_integer("MICROVM_MAX_VMS", 1),
            max_total_mem_mib=e.optional_integer("MICROVM_MAX_TOTAL_MEM_MIB", 128),
            max_snapshot_bytes=e.optional_integer("MICROVM_MAX_SNAPSHOT_BYTES", 1),
            caller_max_vms=e.optional_integer("MICROVM_CALLER_MAX_VMS", 1),
            caller_max_total_mem_mib=e.optional_integer("MICROVM_CALLER_MAX_TOTAL_MEM_MIB", 128),
            caller_max_snapshot_bytes=e.optional_integer("MICROVM_CALLER_MAX_SNAPSHOT_BYTES", 1),
        )
        image_dir = e.raw("MICROVM_IMAGE_DIR")
        values: dict[str, object] = {
            "data_dir": data_dir,
            "provider": ProviderKind(e.choice("MICROVM_PROVIDER", "in-memory", [k.value for k in ProviderKind])),
            "api_host": host,
            "api_port": port,
            "api_header_timeout_s": e.duration("MICROVM_API_HEADER_TIMEOUT_S", 10.0, 0.1, 3600.0),
            "api_max_connections": e.integer("MICROVM_API_MAX_CONNECTIONS", 256, 1, 1_000_000),
            "public_console": e.boolean("MICROVM_PUBLIC_CONSOLE", False),
            "ephemeral": e.boolean("MICROVM_EPHEMERAL", False),
            "stop_vms_on_exit": e.boolean("MICROVM_STOP_VMS_ON_EXIT", False),
            "limits": limits,
            "image_dir": Path(image_dir) if image_dir is not None else None,
            "qemu_bin": e.text("MICROVM_QEMU_BIN", "qemu-system-x86_64"),
            "qemu_accel": e.choice("MICROVM_QEMU_ACCEL", "auto", ["auto", "kvm", "tcg"]),
            "boot_timeout_s": e.duration("MICROVM_BOOT_TIMEOUT_S", 90.0, 1.0),
            "vmm_user": e.text("MICROVM_VMM_USER", "microvm"),
            "vmm_uid_range": parse_uid_range(e.text("MICROVM_VMM_UID_RANGE", "{}-{}".format(*DEFAULT_UID_RANGE))),
            "vmm_mem_overhead_mib": e.integer("MICROVM_VMM_MEM_OVERHEAD_MIB", 256, 0),
            "min_free_mib": e.integer("MICROVM_MIN_FREE_MIB", 512, 0),
            "disk_limits": DiskLimits(bps=e.integer("MICROVM_DISK_BPS", DEFAULT_DISK_BPS, 0, MAX_DISK_RATE),
                                      iops=e.integer("MICROVM_DISK_IOPS", DEFAULT_DISK_IOPS, 0, MAX_DISK_RATE)),
        }
        values["network"] = parse_network(e, ProviderKind(values["provider"]))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["provider"] is ProviderKind.FIRECRACKER and values.get("firecracker") is None:
            from ..runtime.adapters.firecracker.settings import FirecrackerSettings

            image = values["image_dir"]
            values["firecracker"] = FirecrackerSettings.from_env(env, image_dir=image if isinstance(image, Path) else None)
        return cls(**values)  # type: ignore[arg-type]


def parse_network(
    e: Env, provider: ProviderKind, host_problems: Callable[[], list[str]] = netns.host_problems
) -> NetworkSettings:
    """``MICROVM_NETWORK`` (default ``user``; ``none`` for Firecracker, which has TAP devices only, so
    ``none`` or ``bridge``), ``MICROVM_PUBLISH_ADDR``, ``MICROVM_PORT_RANGE`` (``LO-HI``), ``MICROVM_EGRESS`` (DESIGN.md §8) and
    ``MICROVM_BRIDGE_POOL`` (§10). ``bridge`` on a host that cannot do it is refused here, naming what
    is missing (``host_problems``: injected by tests)."""
    default = "none" if provider is ProviderKind.FIRECRACKER else "user"
    mode = NetworkMode(e.choice("MICROVM_NETWORK", default, [m.value for m in NetworkMode]))
    raw_pool = e.text("MICROVM_BRIDGE_POOL", netns.DEFAULT_POOL)
    try:
        pool = str(netns.parse_pool(raw_pool))
    except ValueError as exc:
        raise ConfigError(f"MICROVM_BRIDGE_POOL={raw_pool!r}: {exc}") from None
    if mode is NetworkMode.BRIDGE:  # QEMU and Firecracker alike (DESIGN.md §10)
        missing = host_problems()
        if missing:
            raise ConfigError("MICROVM_NETWORK=bridge needs " + "; ".join(missing))
    if mode is NetworkMode.USER and provider is ProviderKind.FIRECRACKER:
        raise ConfigError("MICROVM_NETWORK=user is not possible with Firecracker (TAP devices only); "
                          "use bridge or none")
    addr = e.text("MICROVM_PUBLISH_ADDR", "127.0.0.1")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ConfigError(f"MICROVM_PUBLISH_ADDR={addr!r} is not an IP address") from None
    raw = e.text("MICROVM_PORT_RANGE", "40000-49999")
    lo, sep, hi = raw.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or not 1024 <= int(lo) <= int(hi) <= 65535:
        raise ConfigError(f"MICROVM_PORT_RANGE={raw!r} must be LO-HI with 1024 <= LO <= HI <= 65535")
    egress = e.choice("MICROVM_EGRESS", "deny", ["deny", "allow"])
    return NetworkSettings(mode=mode, publish_addr=addr, port_range=(int(lo), int(hi)), egress=egress == "allow",
                           bridge_pool=pool)

