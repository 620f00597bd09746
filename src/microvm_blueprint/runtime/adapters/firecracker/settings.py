"""Firecracker settings: ``MICROVM_FIRECRACKER_*``, parsed once at the entry point, injected into the driver."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ....envparse import Env, check_int
from ....errors import ConfigError
from ...errors import ImageError
from ...model import DEFAULT_IMAGE, DiskLimits, VmSpec

ENV_PREFIX = "MICROVM_FIRECRACKER_"
READY_LINE = "MICROVM-READY"
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet"
DEFAULT_SOCKET_DIR = "/tmp/microvm-firecracker"
LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")  # the spec's Logger.level enum
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
SOCKET_NAME_LEN = 24  # hex characters of the VM folder name (96 bits)
MAX_VCPUS = 32  # MachineConfiguration.vcpu_count maximum in the spec


@dataclass(frozen=True)
class FirecrackerSettings:
    """Everything the driver needs, injected (the driver never reads the environment).

    ``bin`` is a path or a name on ``PATH``; it is run as ``bin --api-sock SOCKET --id ID``.
    ``vcpu_count``/``mem_mib`` are the defaults of ``MICROVM_FIRECRACKER_VCPU_COUNT``/``_MEM_MIB``:
    a VM's :class:`VmSpec` overrides them (see :meth:`default_spec`). ``state_dir`` is parsed for
    compatibility with the original; VM folders themselves are handed over by the lifecycle core.
    """

    bin: str = "firecracker"
    kernel: str = ""
    rootfs: str = ""
    initrd: str = ""
    boot_args: str = DEFAULT_BOOT_ARGS
    socket_dir: str = DEFAULT_SOCKET_DIR
    state_dir: str = ""
    vcpu_count: int = 2
    mem_mib: int = 1024
    rootfs_ro: bool = True
    api_timeout_ms: int = 5000
    socket_ready_timeout_ms: int = 5000
    boot_timeout_ms: int = 60000
    #: the console line that says the guest is up: ``None`` (``MICROVM_FIRECRACKER_READY_LINE`` unset)
    #: = the image's own for one of this project's images, else none (ready = the VMM says Running);
    #: ``""`` = never wait for a line
    ready_line: str | None = None
    log_level: str = ""  # "" = Firecracker's default logger (to stdout, i.e. firecracker.log)
    stop_timeout_ms: int = 3000  # SIGTERM grace before SIGKILL
    #: ``MICROVM_FIRECRACKER_JAILER``: the jailer binary; when set, Firecracker runs under it (DESIGN.md §9)
    #: as ``jailer_uid``/``jailer_gid`` (the VMM user of ``MICROVM_VMM_USER``) in a chroot under ``chroot_base``
    jailer: str = ""
    chroot_base: str = "/srv/jailer"
    jailer_uid: int = 0
    jailer_gid: int = 0
    #: ``MICROVM_DISK_BPS``/``_IOPS`` (parsed with the operator's settings): the root drive's ``rate_limiter``
    disk_limits: DiskLimits = field(default_factory=DiskLimits)

    def __post_init__(self) -> None:
        def bounded(name: str, value: int, lo: int, hi: int | None = None) -> None:
            var = f"{ENV_PREFIX}{name.upper()}"
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{var}={value!r} is not an integer")
            check_int(var, value, lo, hi)

        bounded("vcpu_count", self.vcpu_count, 1, MAX_VCPUS)
        bounded("mem_mib", self.mem_mib, 128)
        bounded("api_timeout_ms", self.api_timeout_ms, 1)
        bounded("socket_ready_timeout_ms", self.socket_ready_timeout_ms, 1)
        bounded("boot_timeout_ms", self.boot_timeout_ms, 1)
        bounded("stop_timeout_ms", self.stop_timeout_ms, 0)
        if not self.bin:
            raise ConfigError(f"{ENV_PREFIX}BIN must not be empty")
        if self.log_level and self.log_level not in LOG_LEVELS:
            raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL={self.log_level!r} is not one of: {', '.join(LOG_LEVELS)}")
        longest = len(os.fsencode(self.socket_dir)) + 1 + SOCKET_NAME_LEN + len(".sock")
        if longest > MAX_SOCKET_PATH:
            raise ConfigError(
                f"{ENV_PREFIX}SOCKET_DIR={self.socket_dir!r} is too long: socket paths in it would be {longest} bytes, "
                f"over the {MAX_SOCKET_PATH}-byte limit of Unix sockets"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, image_dir: Path | None = None) -> FirecrackerSettings:
        """Parse ``MICROVM_FIRECRACKER_*``; errors (:class:`~microvm_blueprint.errors.ConfigError`)
        name the bad variable.

        Kernel, rootfs and initrd default to the built default image (in ``image_dir``, else the
        image cache) when one exists; a missing file is reported, naming its variable, by
        :meth:`check_host` when a VM is created."""
        e = Env(env, ENV_PREFIX)
        kernel, rootfs, initrd = e.text("KERNEL", ""), e.text("ROOTFS", ""), e.text("INITRD", "")
        if not (kernel and rootfs):
            from ... import images  # the default guest image, if one is built

            try:
                manifest = images.resolve_image(DEFAULT_IMAGE, image_dir)
            except ImageError:
                pass  # check_host names the unset variable when a VM is created
            else:
                if not kernel and not initrd:
                    initrd = manifest.initramfs  # the image's kernel needs its initramfs
                kernel = kernel or manifest.vmlinux
                rootfs = rootfs or manifest.rootfs
        return cls(
            bin=e.text("BIN", "firecracker"),
            kernel=kernel,
            rootfs=rootfs,
            initrd=initrd,
            boot_args=e.text("BOOT_ARGS", DEFAULT_BOOT_ARGS),
            socket_dir=e.text("SOCKET_DIR", DEFAULT_SOCKET_DIR),
            state_dir=e.text("STATE_DIR", ""),
            vcpu_count=e.integer("VCPU_COUNT", 2, 1, MAX_VCPUS),
            mem_mib=e.integer("MEM_MIB", 1024, 128),
            rootfs_ro=e.boolean("ROOTFS_RO", True),
            api_timeout_ms=e.integer("API_TIMEOUT_MS", 5000, 1),
            socket_ready_timeout_ms=e.integer("SOCKET_READY_TIMEOUT_MS", 5000, 1),
            boot_timeout_ms=e.integer("BOOT_TIMEOUT_MS", 60000, 1),
            ready_line=e.text("READY_LINE", "") or None,
            log_level=e.choice("LOG_LEVEL", "", LOG_LEVELS),
            **_jailer(e, env),
        )

    def default_spec(self) -> VmSpec:
        """The spec of ``MICROVM_FIRECRACKER_VCPU_COUNT``/``_MEM_MIB`` (for the operator's default)."""
        return VmSpec(vcpus=self.vcpu_count, mem_mib=self.mem_mib, image=DEFAULT_IMAGE)

    def guest_ready_line(self, rootfs: str | None = None) -> str:
        """The line to wait for on the console of a guest booting ``rootfs`` (default: ``self.rootfs``).

        ``MICROVM_FIRECRACKER_READY_LINE`` if set; else the ready line of one of this project's
        images (:func:`project_ready_line`); else ``""``: a stock distribution image prints no such
        line, and its guest is ready when Firecracker accepted ``InstanceStart`` and says ``Running``."""
        if self.ready_line is not None:
            return self.ready_line
        return project_ready_line(self.rootfs if rootfs is None else rootfs) or ""

    def tap_owner(self) -> tuple[int, int] | None:
        """(uid, gid) a bridge-mode TAP must belong to: the jailer's user, as which Firecracker opens it
        without privileges (``None`` without the jailer: Firecracker runs as the operator, root)."""
        return (self.jailer_uid, self.jailer_gid) if self.jailer else None

    def check_binary(self) -> None:
        """Raise :class:`ImageError` naming ``MICROVM_FIRECRACKER_BIN`` if the binary cannot be run."""
        if shutil.which(self.bin) is None:
            where = "not found" if not Path(self.bin).exists() else "not executable"
            raise ImageError(f"firecracker binary {where}: {self.bin} (set {ENV_PREFIX}BIN)")

    def check_host(self, *, kernel: str | None = None, initrd: str | None = None, rootfs: str | None = None) -> None:
        """Raise :class:`ImageError` naming the variable if the binary, kernel, initrd or rootfs is
        missing (the arguments override the settings' files). Called before anything is spawned."""
        self.check_binary()
        files = (
            ("KERNEL", "kernel", self.kernel if kernel is None else kernel),
            ("ROOTFS", "rootfs", self.rootfs if rootfs is None else rootfs),
        )
        for var, what, path in files:
            if not path:
                raise ImageError(f"{what} is not set (set {ENV_PREFIX}{var})")
            if not Path(path).is_file():
                raise ImageError(f"{what} not found: {path} (set {ENV_PREFIX}{var})")
        initrd = self.initrd if initrd is None else initrd
        if initrd and not Path(initrd).is_file():
            raise ImageError(f"initrd not found: {initrd} (set {ENV_PREFIX}INITRD)")



def _jailer(e: Env, env: Mapping[str, str]) -> dict[str, Any]:
    """``MICROVM_FIRECRACKER_JAILER`` and ``_CHROOT_BASE``, with the uid/gid of ``MICROVM_VMM_USER``."""
    jailer = e.text("JAILER", "")
    if not jailer:
        return {}
    from ...confine import DEFAULT_USER, resolve_user

    user = resolve_user(env.get("MICROVM_VMM_USER", DEFAULT_USER))
    return {"jailer": jailer, "chroot_base": e.text("CHROOT_BASE", "/srv/jailer"),
            "jailer_uid": user.uid if user else os.getuid(), "jailer_gid": user.gid if user else os.getgid()}


def project_ready_line(rootfs: str) -> str | None:
    """The ready line of this project's image whose root filesystem is ``rootfs``, ``None`` for any other.

    A project image is a folder with the ``manifest.json`` :func:`~microvm_blueprint.runtime.images.build_image`
    writes, naming this very file as its rootfs (the default image, or ``MICROVM_FIRECRACKER_ROOTFS``
    pointed at a built one)."""
    if not rootfs:
        return None
    from ... import images

    try:
        path = Path(rootfs).resolve()
        manifest = images.ImageManifest.load(path.parent)
        same = Path(manifest.rootfs).resolve() == path
    except (ImageError, OSError):
        return None
    return manifest.ready_line or None if same else None
