"""Operator settings for the blueprint layer, built once at the entry point from env + flags.

The chain side has its own :class:`~microvm_blueprint.tangle.environment.BlueprintEnvironment`;
this object carries what the VM side needs (provider choice, query API address, quotas).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..runtime.errors import InvalidInput
from ..runtime.model import HostLimits


class ProviderKind(str, Enum):
    """``MICROVM_PROVIDER`` values."""

    IN_MEMORY = "in-memory"
    QEMU = "qemu"
    FIRECRACKER = "firecracker"

    @classmethod
    def parse(cls, raw: str) -> ProviderKind:
        try:
            return cls(raw.strip().lower())
        except ValueError:
            allowed = ", ".join(k.value for k in cls)
            raise InvalidInput(f"MICROVM_PROVIDER={raw!r} is not one of: {allowed}") from None


def _int(env: Mapping[str, str], name: str, default: int | None, lo: int = 0) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r} is not an integer") from None
    if value < lo:
        raise InvalidInput(f"{name} must be at least {lo}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise InvalidInput(f"{name}={raw!r} is not a boolean (true/false)")


def parse_addr(raw: str, name: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput(f"{name}={raw!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class OperatorSettings:
    data_dir: Path
    provider: ProviderKind = ProviderKind.IN_MEMORY
    api_host: str = "127.0.0.1"
    api_port: int = 3000
    ephemeral: bool = False
    stop_vms_on_exit: bool = False
    limits: HostLimits = field(default_factory=HostLimits)
    image_dir: Path | None = None
    qemu_bin: str = "qemu-system-x86_64"
    qemu_accel: str = "auto"
    boot_timeout_s: float = 90.0
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "vms"

    @classmethod
    def from_env(cls, env: Mapping[str, str], data_dir: Path, **overrides: object) -> OperatorSettings:
        host, port = parse_addr(env.get("MICROVM_API_ADDR", "127.0.0.1:3000"), "MICROVM_API_ADDR")
        limits = HostLimits(
            max_vcpus=_int(env, "MICROVM_MAX_VCPUS", 8, 1) or 8,
            max_mem_mib=_int(env, "MICROVM_MAX_MEM_MIB", 16384, 128) or 16384,
            max_vms=_int(env, "MICROVM_MAX_VMS", None, 1),
            max_total_mem_mib=_int(env, "MICROVM_MAX_TOTAL_MEM_MIB", None, 128),
            max_snapshot_bytes=_int(env, "MICROVM_MAX_SNAPSHOT_BYTES", None, 1),
        )
        accel = env.get("MICROVM_QEMU_ACCEL", "auto").strip().lower() or "auto"
        if accel not in {"auto", "kvm", "tcg"}:
            raise InvalidInput(f"MICROVM_QEMU_ACCEL={accel!r} is not one of: auto, kvm, tcg")
        values: dict[str, object] = {
            "data_dir": data_dir,
            "provider": ProviderKind.parse(env.get("MICROVM_PROVIDER", "in-memory") or "in-memory"),
            "api_host": host,
            "api_port": port,
            "ephemeral": _bool(env, "MICROVM_EPHEMERAL", False),
            "stop_vms_on_exit": _bool(env, "MICROVM_STOP_VMS_ON_EXIT", False),
            "limits": limits,
            "image_dir": Path(env["MICROVM_IMAGE_DIR"]) if env.get("MICROVM_IMAGE_DIR") else None,
            "qemu_bin": env.get("MICROVM_QEMU_BIN", "qemu-system-x86_64") or "qemu-system-x86_64",
            "qemu_accel": accel,
            "boot_timeout_s": float(_int(env, "MICROVM_BOOT_TIMEOUT_S", 90, 1) or 90),
            "env": dict(env),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
