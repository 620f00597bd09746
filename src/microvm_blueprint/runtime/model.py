"""Values of the runtime layer: statuses, specs, views, snapshot manifests, id rules.

Everything here is a frozen dataclass or an enum; the state x job table of DESIGN.md §5 lives in
:data:`ALLOWED` and is enforced by :func:`guard`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..envparse import check_int
from ..errors import ConfigError
from .access import utf8_text, validate_disk_mib, validate_ports, validate_ssh_keys
from .errors import InvalidInput, InvalidTransition

MAX_ID_BYTES = 256
MIN_MEM_MIB = 128
DEFAULT_MEM_MIB = 256
DEFAULT_VCPUS = 1
DEFAULT_IMAGE = "default"


class VmStatus(str, Enum):
    """Lifecycle status; the value is the word the API and error texts use."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DESTROYED = "destroyed"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class Action(Enum):
    """A state-changing request; ``target`` is the word used in transition errors."""

    START = "running"
    STOP = "stopped"
    SNAPSHOT = "snapshot"
    DESTROY = "destroyed"

    @property
    def target(self) -> str:
        return self.value


ALLOWED: Mapping[VmStatus, frozenset[Action]] = {
    VmStatus.CREATED: frozenset({Action.START, Action.SNAPSHOT, Action.DESTROY}),
    VmStatus.RUNNING: frozenset({Action.STOP, Action.SNAPSHOT, Action.DESTROY}),
    VmStatus.STOPPED: frozenset({Action.START, Action.SNAPSHOT, Action.DESTROY}),
    VmStatus.DESTROYED: frozenset(),
    VmStatus.FAILED: frozenset({Action.DESTROY}),
}


def guard(vm_id: str, status: VmStatus, action: Action) -> None:
    """Raise :class:`InvalidTransition` unless ``action`` is allowed from ``status`` (DESIGN.md §5)."""
    if action not in ALLOWED[status]:
        raise InvalidTransition(vm_id, status.value, action.target)


def validate_id(kind: str, value: object) -> str:
    """Check an id (``vm_id``, ``snapshot_id`` ...) against §5: 1-256 UTF-8 bytes, no control characters."""
    text, raw = utf8_text(kind, value)
    if len(raw) > MAX_ID_BYTES:
        raise InvalidInput(f"{kind} exceeds maximum length of {MAX_ID_BYTES} bytes")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise InvalidInput(f"{kind} contains control characters")
    return text


def fs_name(value: str) -> str:
    """Injective on-disk name for an id: never the raw id, never a path outside its folder."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class VmSpec:
    """What a VM is made of. ``image`` names a built guest image (``default`` when empty).

    ``disk_mib`` (0 = the image's size) grows the root disk; ``ssh_keys`` are installed for root
    through the config drive; ``ports`` are the guest ports to publish (DESIGN.md §8, job 8).
    """

    vcpus: int = DEFAULT_VCPUS
    mem_mib: int = DEFAULT_MEM_MIB
    image: str = DEFAULT_IMAGE
    disk_mib: int = 0
    ssh_keys: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The stored form: every field (keys are public keys, never secrets)."""
        out: dict[str, Any] = {"vcpus": self.vcpus, "mem_mib": self.mem_mib, "image": self.image}
        if self.disk_mib:
            out["disk_mib"] = self.disk_mib
        if self.ssh_keys:
            out["ssh_keys"] = list(self.ssh_keys)
        if self.ports:
            out["ports"] = list(self.ports)
        return out

    def to_api(self) -> dict[str, Any]:
        """What the query API shows: the keys are counted, not listed (they are long and dull)."""
        out = self.to_json()
        if self.ssh_keys:
            out["ssh_keys"] = len(self.ssh_keys)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VmSpec:
        return cls(
            vcpus=int(data["vcpus"]),
            mem_mib=int(data["mem_mib"]),
            image=str(data["image"]),
            disk_mib=int(data.get("disk_mib", 0)),
            ssh_keys=tuple(str(k) for k in data.get("ssh_keys", ())),
            ports=tuple(int(p) for p in data.get("ports", ())),
        )


class NetworkMode(str, Enum):
    """``MICROVM_NETWORK``: how a guest is wired (DESIGN.md §8, §10); the value is the API word."""

    NONE = "none"
    USER = "user"
    BRIDGE = "bridge"

    @property
    def guest_ip(self) -> str | None:
        """The address the guest always has in this mode (so a restored clone never renumbers)."""
        return {NetworkMode.NONE: None, NetworkMode.USER: USER_GUEST_IP, NetworkMode.BRIDGE: BRIDGE_GUEST_IP}[self]


USER_GUEST_IP = "10.0.2.15"
USER_GATEWAY = "10.0.2.2"
BRIDGE_GUEST_IP = "172.16.0.2"
BRIDGE_GATEWAY = "172.16.0.1"


@dataclass(frozen=True)
class PortMapping:
    """A published guest port: reachable at ``host:host_port`` while the VM runs."""

    guest_port: int
    host: str
    host_port: int

    def to_json(self) -> dict[str, Any]:
        return {"guest_port": self.guest_port, "host": self.host, "host_port": self.host_port}


@dataclass(frozen=True)
class VmNetwork:
    """A VM's network as recorded in the store: its mode, its published ports and its egress policy.

    ``egress`` is the ``MICROVM_EGRESS`` the VM was created (or restored) under: its rules (``bridge``)
    and its QEMU user-mode NIC (``restrict=``) keep it for the VM's life, whatever a later operator
    start says (that setting applies to new VMs only)."""

    mode: NetworkMode = NetworkMode.NONE
    ports: tuple[PortMapping, ...] = ()
    egress: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "guest_ip": self.mode.guest_ip, "ports": [p.to_json() for p in self.ports],
                "egress": "allow" if self.egress else "deny"}


@dataclass(frozen=True)
class NetworkSettings:
    """Host-side networking choices (``MICROVM_NETWORK``, ``_PUBLISH_ADDR``, ``_PORT_RANGE``, ``_EGRESS``,
    ``_BRIDGE_POOL``: the /30s of ``bridge`` mode's veth pairs). ``egress`` is recorded with each VM
    created under it (:class:`VmNetwork`): a VM keeps its own policy across operator restarts."""

    mode: NetworkMode = NetworkMode.NONE
    publish_addr: str = "127.0.0.1"
    port_range: tuple[int, int] = (40000, 49999)
    egress: bool = False
    bridge_pool: str = "10.201.0.0/16"


DEFAULT_DISK_BPS = 125 * 1024 * 1024
"""``MICROVM_DISK_BPS``'s default: 125 MiB/s, a cloud disk's baseline (AWS gp3: 125 MiB/s, 3,000 IOPS)."""
DEFAULT_DISK_IOPS = 3000
"""``MICROVM_DISK_IOPS``'s default (see :data:`DEFAULT_DISK_BPS`)."""
MAX_DISK_RATE = 10**15
"""The largest rate QEMU's throttling takes (``THROTTLE_VALUE_MAX``); more is a typo, not a limit."""


@dataclass(frozen=True)
class DiskLimits:
    """What each VM's customer disk may do per second (DESIGN.md §9), all operations together; 0 = no limit.

    ``bps`` is bytes/s (``MICROVM_DISK_BPS``), ``iops`` operations/s (``MICROVM_DISK_IOPS``). QEMU puts them on
    the root drive (``throttling.bps-total``/``iops-total``); the config drive (read once at boot) has none.
    Firecracker can apply them as its drive's ``rate_limiter`` (``bandwidth``/``ops`` token buckets)."""

    bps: int = DEFAULT_DISK_BPS
    iops: int = DEFAULT_DISK_IOPS

    def __post_init__(self) -> None:
        for var, value in (("MICROVM_DISK_BPS", self.bps), ("MICROVM_DISK_IOPS", self.iops)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{var}={value!r} is not an integer")
            check_int(var, value, 0, MAX_DISK_RATE)

    @property
    def limited(self) -> bool:
        """Whether either limit is set."""
        return bool(self.bps or self.iops)


@dataclass(frozen=True)
class HostLimits:
    """Per-VM maxima, host-wide quotas and per-caller quotas. ``None`` = unlimited.

    The ``caller_*`` quotas bound what one caller owns (DESIGN.md §9: the VMs it created or restored, and
    their snapshots), so one customer cannot take the whole host; the service owner and the service itself
    are held only by the host quotas."""

    max_vcpus: int = 8
    max_mem_mib: int = 16384
    max_vms: int | None = None
    max_total_mem_mib: int | None = None
    max_snapshot_bytes: int | None = None
    caller_max_vms: int | None = None
    caller_max_total_mem_mib: int | None = None
    caller_max_snapshot_bytes: int | None = None

    def check_spec(self, spec: VmSpec) -> VmSpec:
        """Validate a spec against §5 and these maxima; raise :class:`InvalidInput` naming the field."""
        if spec.vcpus < 1:
            raise InvalidInput("vcpus must be at least 1")
        if spec.vcpus > self.max_vcpus:
            raise InvalidInput(f"vcpus {spec.vcpus} exceeds host maximum of {self.max_vcpus}")
        if spec.mem_mib < MIN_MEM_MIB:
            raise InvalidInput(f"mem_mib must be at least {MIN_MEM_MIB}")
        if spec.mem_mib > self.max_mem_mib:
            raise InvalidInput(f"mem_mib {spec.mem_mib} exceeds host maximum of {self.max_mem_mib}")
        image = spec.image or DEFAULT_IMAGE
        validate_id("image", image)
        if "/" in image or image in {".", ".."}:
            raise InvalidInput("image must be a name, not a path")
        return dataclasses.replace(
            spec,
            image=image,
            disk_mib=validate_disk_mib(spec.disk_mib),
            ssh_keys=validate_ssh_keys(spec.ssh_keys),
            ports=tuple(sorted(validate_ports(spec.ports))),
        )


@dataclass(frozen=True)
class Origin:
    """Who asked for a change: the job call id and the caller address (the audit trail).

    ``caller`` ``None`` is the service itself (reconciliation, the VMM watcher, in-process tools): it
    may act on every VM, as the service owner may (DESIGN.md §9).
    """

    call_id: int | None = None
    caller: str | None = None


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    action: str
    status: VmStatus
    call_id: int | None
    caller: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "action": self.action,
            "status": self.status.value,
            "call_id": self.call_id,
            "caller": self.caller,
        }


@dataclass(frozen=True)
class VmHandle:
    """How a driver finds its VMM again (persisted): pid, control socket, driver-specific extras."""

    pid: int | None = None
    control: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "control": self.control, "extra": dict(self.extra)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> VmHandle | None:
        if not data:
            return None
        return cls(pid=data.get("pid"), control=data.get("control"), extra=dict(data.get("extra") or {}))


@dataclass(frozen=True)
class VmRecord:
    """What the lifecycle core hands a driver: the VM's identity, spec, status and its folder."""

    vm_id: str
    status: VmStatus
    spec: VmSpec
    workdir: str
    handle: VmHandle | None = None
    network: VmNetwork = VmNetwork()
    vmm_uid: int | None = None
    """The uid (and gid) of its own its VMM runs as (``MICROVM_VMM_UID_RANGE``, DESIGN.md §9); ``None``:
    the shared VMM user (or the operator's, where VMMs do not switch users)."""


@dataclass(frozen=True)
class SnapshotRecord:
    """A stored snapshot: its folder and what it was taken of (the manifest)."""

    vm_id: str
    snapshot_id: str
    path: str
    vm_status: VmStatus
    spec: VmSpec
    created_at: float
    size_bytes: int


@dataclass(frozen=True)
class SnapshotView:
    snapshot_id: str
    created_at: float
    size_bytes: int
    vm_status: VmStatus

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot_id": self.snapshot_id,
            "created_at": self.created_at,
            "size_bytes": self.size_bytes,
            "vm_status": self.vm_status.value,
        }


@dataclass(frozen=True)
class VmView:
    """The read model of one VM, as the query API shows it."""

    vm_id: str
    status: VmStatus
    spec: VmSpec
    snapshots: tuple[str, ...]
    created_at: float
    updated_at: float
    error: str | None = None
    history: tuple[HistoryEntry, ...] = ()
    network: VmNetwork = VmNetwork()
    owner: str | None = None  # the caller that created or restored it (None: the service itself)

    def to_json(self, *, with_history: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "vm_id": self.vm_id,
            "status": self.status.value,
            "owner": self.owner,
            "snapshots": list(self.snapshots),
            "spec": self.spec.to_api(),
            "network": self.network.to_json(),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.error:
            out["error"] = self.error
        if with_history:
            out["history"] = [h.to_json() for h in self.history]
        return out

    @functools.cached_property
    def json_bytes(self) -> bytes:
        """``to_json()`` as compact UTF-8 JSON, encoded once per view: views never change, and the
        store keeps them between writes, so a VM polled over the query API is encoded once."""
        return json.dumps(self.to_json(), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
