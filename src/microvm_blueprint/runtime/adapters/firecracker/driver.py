"""Firecracker driver: one ``firecracker --api-sock`` process per VM, REST over its Unix socket.

The original project's behaviour and settings (``MICROVM_FIRECRACKER_*``), with its bugs fixed.
Firecracker's rules are modelled (DESIGN.md §4): configuration only before ``InstanceStart``,
``InstanceStart`` once, ``PATCH /vm`` only after boot, ``PUT /snapshot/create`` only while paused,
``PUT /snapshot/load`` first on a fresh process. Only API 1.12 features are used (``mem_backend``,
not the deprecated ``mem_file_path``; no ``/serial``, no ``clock_realtime``).

Per VM (``vm.workdir``, handed over by the lifecycle core): ``firecracker.log`` (the process's
stdout + stderr: Firecracker's own log *and* the guest's serial console, since Firecracker wires the
guest's ttyS0 to its stdout), ``firecracker.pid``, ``vm.json`` (the configuration sent), ``cidata.img`` (the VM's config drive,
DESIGN.md §8: cloud-init NoCloud, a new ``instance-id`` for every VM and every restored clone) and,
unless the root filesystem is read-only, ``rootfs.ext4`` (the VM's own copy). Networking
(DESIGN.md §10): with ``MICROVM_NETWORK=none`` there is no NIC; with ``bridge`` the lifecycle has made
the VM's namespace ``mvm-<hash>`` with the TAP ``tap0`` inside (``runtime/netns.py``) before the driver
runs, Firecracker runs inside that namespace (``ip netns exec <ns>`` before its argv, or the jailer's
``--netns /var/run/netns/<ns>``) and gets ``PUT /network-interfaces/eth0`` (``host_dev_name`` ``tap0``, a
fixed guest MAC) before ``InstanceStart``. A snapshot load re-opens the TAP its saved state names:
``tap0`` in every namespace, so a clone in a namespace of its own needs no ``network_overrides``. The API socket lives in
``socket_dir`` under a name derived from the VM's folder name (never the raw id), kept short
because Unix socket paths are limited to 107 bytes.

Under the jailer (``MICROVM_FIRECRACKER_JAILER``, DESIGN.md §9) Firecracker sees only its chroot,
``<chroot base>/<exec file name>/<id>/root`` (:meth:`FirecrackerDriver.chroot`), as the jailer's uid/gid.
Before it runs, the driver places there every file it will open (:meth:`FirecrackerDriver._into_jail`: a hard
link, a copy across file systems; the VM's writable disk is linked, so it stays the VM's one disk, or moved
into the chroot if it cannot be): ``/vmlinux`` (+ ``/initrd``), ``/rootfs.ext4``, ``/cidata.img``, and for a load
``/snapshot/vmstate.bin``, ``/snapshot/memory.bin`` and the drives the saved state names (``state_drives`` in
the snapshot manifest). Every path sent over the API is the chroot one (the saved configuration keeps host
paths; ``vm.json``'s ``jail`` maps them). A live snapshot links its disk copies into ``/snapshot``, has
Firecracker write its state and memory there, and moves those to the snapshot folder. The chroot is removed
when the VMM is stopped for good (destroy, a failed start); :meth:`FirecrackerDriver.remove_orphans` removes
those of VM folders gone (reconciliation). A snapshot taken under the jailer names chroot paths in its saved
state, so it is restored under the jailer only.

Lifecycle:

* create = build ``cidata.img``, spawn + ``PUT /machine-config``, ``/boot-source``, ``/drives/rootfs``,
  ``/drives/cidata`` (not root, read-only) (+ ``/logger`` if a log level is set, + ``/network-interfaces/eth0``
  in bridge mode); not started.
* boot = ``InstanceStart``; ready when ``GET /`` says ``Running`` and, if the VM has a ready line,
  that line shows on its serial console in ``firecracker.log`` (this needs ``console=ttyS0`` in the
  boot args; the default has it). The ready line is decided at create
  (:meth:`FirecrackerSettings.guest_ready_line`) and kept in ``vm.json``: ``MICROVM_FIRECRACKER_READY_LINE``
  if set, else the image's own for one of this project's images (which print it), else none — a
  stock distribution rootfs prints a kernel transcript and a login prompt, so for it the VMM's own
  word (``InstanceStart`` accepted, ``GET /`` says ``Running``) is the ready signal. A boot that
  misses ``boot_timeout_ms`` is a :class:`VmmTimeout` with the console tail.
* stop / start = ``PATCH /vm`` ``Paused`` / ``Resumed`` (resume ready = ``GET /`` says ``Running``).
* snapshot of a running or stopped VM: pause if running, copy the disk and the config drive (a
  hard link: it is never written) into the snapshot folder (disks are not part of a Firecracker
  snapshot), point the drives at those copies (``PATCH /drives/{id}``) so the saved device state names
  files the snapshot owns, ``PUT /snapshot/create`` (Full), point the drives back, resume if it was
  running. Without the
  re-pointing, the saved state would name the source VM's disk, and ``PUT /snapshot/load`` (which
  opens the disks it names) would fail once the source VM is destroyed, although snapshots outlive
  their VM. A snapshot of a ``created`` VM is ``manifest.json`` (its configuration) + the disk copy.
* restore (§7): the new VM's own disk copy and a new ``cidata.img``; a fresh process,
  ``PUT /snapshot/load`` first (only the logger may come before it) with ``resume_vm: false`` (it opens
  the snapshot's copies, which the saved state names), ``PATCH /drives/rootfs`` and
  ``/drives/cidata`` to the new VM's own files, then ``PATCH /vm Resumed`` if the snapshot was taken
  running (a stopped one stays paused). A ``created`` snapshot configures a fresh process from its
  manifest, with the new config drive. A live snapshot from before config drives has none in its
  saved state, and none can be added after a load: its clones have no config drive.
* destroy = SIGTERM, then SIGKILL, each with a deadline (``SendCtrlAltDel`` is x86-only and a
  guest may ignore it); always reaped; the socket and the folder are removed.

A watcher task per VM notices a VMM that exits unasked and calls the exit listener. Every failure
is a :class:`~microvm_blueprint.runtime.errors.VmError` (see :func:`map_api_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ....procs import Child, kill_pid, pid_alive, read_pid, runs_in, tail, wait_pid_exit
from ...configdrive import build_config_drive_async, guest_config
from ...confine import Confinement
from ...driver import ExitListener
from ...errors import ImageError, InvalidInput, VmError, VmmApiError, VmmError, VmmTimeout
from ...model import DEFAULT_IMAGE, DiskLimits, NetworkMode, SnapshotRecord, VmHandle, VmRecord, VmSpec, VmStatus
from ...netns import TAP, exec_prefix, ns_name
from .api import FirecrackerApi
from .settings import ENV_PREFIX, MAX_VCPUS, SOCKET_NAME_LEN, FirecrackerSettings

log = logging.getLogger(__name__)

LOG = "firecracker.log"
JAILED_SOCKET = "/run/firecracker.socket"
"""The API socket inside the jailer's chroot (Firecracker's default path)."""
JAIL_SNAP = "snapshot"
"""The folder inside the chroot where a snapshot is written, and where a restore finds the one it loads."""
JAIL_KERNEL = "vmlinux"
JAIL_INITRD = "initrd"
JAIL_WORKDIR = "workdir"
"""A file beside the chroot (in ``<chroot base>/<exec file name>/<id>/``) naming the VM folder it belongs to."""
_LINK_FALLBACK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)
PID = "firecracker.pid"
CONFIG = "vm.json"
DISK = "rootfs.ext4"
DRIVE_ID = "rootfs"
CIDATA = "cidata.img"
CIDATA_ID = "cidata"
SNAP_MANIFEST = "manifest.json"
SNAP_STATE = "vmstate.bin"
SNAP_MEM = "memory.bin"
SNAP_DISK = "rootfs.ext4"
SNAP_CIDATA = "cidata.img"
SNAP_FORMAT = "microvm-blueprint/firecracker-snapshot/1"
IFACE_ID = "eth0"
GUEST_MAC = "06:00:ac:10:00:02"
"""The guest NIC's MAC in bridge mode: the same for every VM and clone (each is alone on its TAP), in
Firecracker's ``06:00:<guest IPv4 in hex>`` convention (172.16.0.2)."""
NETNS_DIR = "/var/run/netns"
"""Where ``ip netns add`` binds a named namespace: the jailer's ``--netns`` takes that path."""

LOG_TAIL = 2000


@dataclass
class _Vm:
    vm_id: str
    workdir: Path
    socket: Path
    api: FirecrackerApi
    child: Child | None
    pid: int | None
    disk: Path
    disk_read_only: bool
    stopping: bool = False
    watcher: asyncio.Task[None] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    ready_line: str = ""  # "" = ready when the VMM says Running (see FirecrackerSettings.guest_ready_line)
    #: under the jailer: host path -> the path Firecracker sees inside its chroot, for every file placed there
    jail: dict[str, str] = field(default_factory=dict)

    def exit_code(self) -> int | None:
        return self.child.returncode if self.child is not None else None

    def exited(self) -> bool:
        if self.child is not None:
            return self.child.returncode is not None
        return not pid_alive(self.pid)


class FirecrackerDriver:
    """:class:`~microvm_blueprint.runtime.driver.VmmDriver` for Firecracker."""

    name = "firecracker"

    def __init__(self, settings: FirecrackerSettings) -> None:
        self.settings = settings
        self._vms: dict[str, _Vm] = {}
        self._listener: ExitListener | None = None

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    def isolates_users(self) -> bool:
        """True under the jailer with an unprivileged user: then each VM's jailer gets its own uid/gid."""
        return bool(self.settings.jailer) and self.settings.jailer_uid != 0

    def tap_owner(self, vm: VmRecord) -> tuple[int, int] | None:
        """The user ``vm``'s jailed Firecracker runs as (:meth:`_ids`), who opens the TAP; ``None`` without
        the jailer (see :meth:`FirecrackerSettings.tap_owner`)."""
        return self._ids(vm) if self.settings.tap_owner() is not None else None

    def _ids(self, vm: VmRecord) -> tuple[int, int]:
        """(uid, gid) the jailer gives ``vm``'s Firecracker: its own uid (as gid too) where it has one, else
        the jailer's user of the settings (``MICROVM_VMM_USER``)."""
        if vm.vmm_uid is not None:
            return vm.vmm_uid, vm.vmm_uid
        return self.settings.jailer_uid, self.settings.jailer_gid

    # ---- plumbing ----------------------------------------------------------------------------------

    def socket_path(self, workdir: str | Path) -> Path:
        """The API socket of the VM in ``workdir``: named from the folder name, short enough for Unix
        (under the jailer: ``/run/firecracker.socket`` inside the VM's chroot)."""
        if self.settings.jailer:
            return self.chroot(workdir) / JAILED_SOCKET.lstrip("/")
        return Path(self.settings.socket_dir) / f"{Path(workdir).name[:SOCKET_NAME_LEN]}.sock"

    def chroot(self, workdir: str | Path) -> Path:
        """The jailer's chroot of the VM in ``workdir``: ``<chroot base>/<exec file name>/<id>/root``."""
        return Path(self.settings.chroot_base) / Path(self.settings.bin).name / _instance_id(workdir) / "root"

    def _runs_in(self, pid: int, workdir: Path) -> bool:
        """Whether ``pid`` is this driver's VMM of ``workdir`` (the guard against pid reuse): its working
        directory is the VM folder, or under the jailer the chroot (the jailer chroots and changes to
        ``/``, which reads from outside as the chroot folder)."""
        return runs_in(pid, self.chroot(workdir) if self.settings.jailer else workdir)

    def jail_dir(self, workdir: str | Path) -> Path:
        """``<chroot base>/<exec file name>/<id>``: the chroot's parent, removed whole when the VMM is gone."""
        return self.chroot(workdir).parent

    async def _new_jail(self, vm: VmRecord) -> None:
        """An empty chroot for ``vm`` (leftovers of an earlier VMM removed): ``root`` and ``root/run`` (where
        Firecracker binds its API socket) belong to the VM's jailer user (:meth:`_ids`), as the jailer makes
        them (and :meth:`_into_jail` reads that owner back); beside ``root``, a note naming ``vm.workdir``
        (for :meth:`remove_orphans`)."""
        if not self.settings.jailer:
            return
        s = self.settings
        workdir = Path(vm.workdir)
        uid, gid = self._ids(vm)

        def run() -> None:
            jail = self.jail_dir(workdir)
            shutil.rmtree(jail, ignore_errors=True)
            (jail / "root").mkdir(parents=True, mode=0o700)
            (jail / JAIL_WORKDIR).write_text(str(Path(workdir).resolve()))
            _jail_dirs(jail / "root", jail / "root" / "run", uid, gid)
            _chown(jail / "root", uid, gid)

        try:
            await asyncio.to_thread(run)
        except OSError as exc:
            raise VmmError(f"cannot make the jailer's chroot under {s.chroot_base} ({type(exc).__name__}: {exc})") from exc

    async def _into_jail(self, workdir: Path, jail: dict[str, str], host: Path, rel: str, *,
                         own: bool, writable: bool = False) -> Path:
        """Put ``host`` into the VM's chroot at ``rel`` (a no-op without the jailer) and note in ``jail``
        the path Firecracker is to be given for it (``/rel``: API paths are relative to the chroot root).

        A hard link where it can be (the same file: a writable disk stays the VM's one disk), else a copy
        (another file system). A *writable* file that cannot be linked is moved instead, so the VMM writes
        the VM's real disk and no stale copy is left behind: the VM's disk is then the chroot's file, and
        that is the path returned (else ``host``). ``own``: the file is the VM's (its disk, its config
        drive, a snapshot's files), chowned to the VM's jailer user (the owner of the chroot's root, made by
        :meth:`_new_jail`); a shared file (the kernel, a read-only
        image) keeps its owner and is only linked if that user can read it, else a private copy is made."""
        s = self.settings
        if not s.jailer:
            return host
        root = self.chroot(workdir)
        dst = root / rel

        def run() -> Path:
            st = root.stat()
            uid, gid = st.st_uid, st.st_gid
            _jail_dirs(root, dst.parent, uid, gid)
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            real, mine = host, own
            try:
                os.link(host, dst)
            except OSError as exc:
                if exc.errno not in _LINK_FALLBACK:
                    raise
                if writable:
                    shutil.move(host, dst)
                    real = dst
                else:
                    shutil.copyfile(host, dst)
                    mine = True  # a private copy: the VMM user's
            if not mine and not _may_read(dst, uid, gid):
                dst.unlink()
                shutil.copyfile(host, dst)
                mine = True
            if mine:
                _chown(dst, uid, gid)
                os.chmod(dst, 0o600)
            return real

        try:
            real = await asyncio.to_thread(run)
        except FileNotFoundError as exc:
            raise ImageError(f"file not found: {exc.filename}") from exc
        except OSError as exc:
            raise VmmError(f"cannot place {host.name} in the jailer's chroot ({type(exc).__name__}: {exc})") from exc
        jail[str(real)] = "/" + rel
        return real

    async def _out_of_jail(self, workdir: Path, rel: str, dst: Path) -> None:
        """Move a file Firecracker wrote in its chroot (a snapshot's state or memory) to ``dst``, the
        operator's (0600): a rename, or a copy across file systems."""
        src = self.chroot(workdir) / rel

        def run() -> None:
            shutil.move(src, dst)
            _chown(dst, os.getuid(), os.getgid())
            os.chmod(dst, 0o600)

        try:
            await asyncio.to_thread(run)
        except OSError as exc:
            raise VmmError(f"cannot move {rel} out of the jailer's chroot ({type(exc).__name__}: {exc})") from exc

    async def _drop_from_jail(self, workdir: Path, rel: str) -> None:
        if self.settings.jailer:
            await asyncio.to_thread(shutil.rmtree, self.chroot(workdir) / rel, True)

    async def _remove_jail(self, workdir: Path) -> None:
        if self.settings.jailer:
            await asyncio.to_thread(shutil.rmtree, self.jail_dir(workdir), True)

    async def remove_orphans(self, vms_dir: Path, keep: set[str]) -> int:
        """Remove the chroots (under the jailer) of this operator's VM folders in ``vms_dir`` that are not
        in ``keep`` (folder names): left by a VMM that was not stopped through the driver. A chroot whose
        note names a folder elsewhere (another operator sharing the chroot base) is never touched."""
        if not self.settings.jailer:
            return 0
        parent = Path(self.settings.chroot_base) / Path(self.settings.bin).name
        mine = Path(vms_dir).resolve()

        def run() -> int:
            removed = 0
            try:
                entries = list(parent.iterdir())
            except OSError:
                return 0
            for jail in entries:
                try:
                    workdir = Path((jail / JAIL_WORKDIR).read_text().strip())
                except OSError:
                    continue
                if workdir.parent == mine and workdir.name not in keep:
                    log.warning("removing the orphaned jailer chroot %s", jail)
                    shutil.rmtree(jail, ignore_errors=True)
                    removed += 1
            return removed

        return await asyncio.to_thread(run)

    def _api_path(self, vm: _Vm, host: str | Path) -> str:
        """The path Firecracker is given for the host file ``host``: itself, or its place in the chroot."""
        if not self.settings.jailer:
            return str(host)
        try:
            return vm.jail[str(host)]
        except KeyError:
            raise VmmError(f"{host} was not placed in the jailer's chroot") from None

    def _api_config(self, vm: _Vm, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` (host paths, as saved) with the paths Firecracker is to be given."""
        out = dict(config)
        boot = dict(config.get("boot-source") or {})
        for key in ("kernel_image_path", "initrd_path"):
            if boot.get(key):
                boot[key] = self._api_path(vm, boot[key])
        out["boot-source"] = boot
        out["drives"] = [{**d, "path_on_host": self._api_path(vm, d["path_on_host"])} if d.get("path_on_host") else d
                         for d in config.get("drives") or []]
        return out

    async def _jail_boot(self, workdir: Path, jail: dict[str, str], boot: Mapping[str, Any]) -> None:
        """Place the kernel (and initrd) a boot source names into the chroot (shared files: linked)."""
        for key, rel in (("kernel_image_path", JAIL_KERNEL), ("initrd_path", JAIL_INITRD)):
            if boot.get(key):
                await self._into_jail(workdir, jail, Path(boot[key]), rel, own=False)

    def vmm_argv(self, record: VmRecord, sock: Path) -> list[str]:
        """Firecracker's argv, or the jailer's (per its doc: ``--id --exec-file --uid --gid --cgroup-version
        --chroot-base-dir [--cgroup ...] [--netns] -- <firecracker args>``) when ``MICROVM_FIRECRACKER_JAILER`` is set."""
        workdir = Path(record.workdir)
        s = self.settings
        bridge = record.network.mode is NetworkMode.BRIDGE
        if not s.jailer:  # bridge: inside the VM's namespace, where its TAP is (`ip netns exec` execs in place)
            return [*(exec_prefix(record.vm_id) if bridge else []), s.bin, "--api-sock", str(sock),
                    "--id", _instance_id(workdir)]
        version = Confinement(None).cgroup_version()
        mem = (record.spec.mem_mib + 256) << 20
        cpu = record.spec.vcpus * 100_000
        cgroups = ([f"memory.max={mem}", f"cpu.max={cpu} 100000", "pids.max=512"] if version == 2 else
                   [f"memory.limit_in_bytes={mem}", f"cpu.cfs_quota_us={cpu}", "cpu.cfs_period_us=100000",
                    "pids.max=512"])
        argv = [s.jailer, "--id", _instance_id(workdir), "--exec-file", shutil.which(s.bin) or s.bin,
                "--uid", str(self._ids(record)[0]), "--gid", str(self._ids(record)[1]),
                "--cgroup-version", str(version),
                "--chroot-base-dir", s.chroot_base]
        for c in cgroups:
            argv += ["--cgroup", c]
        if bridge:  # the jailer joins the VM's namespace before it execs Firecracker (DESIGN.md §10)
            argv += ["--netns", f"{NETNS_DIR}/{ns_name(record.vm_id)}"]
        return [*argv, "--", "--api-sock", JAILED_SOCKET]

    def _new_api(self, socket: Path) -> FirecrackerApi:
        return FirecrackerApi(str(socket), self.settings.api_timeout_ms)

    async def _call(self, vm: _Vm, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """An API call whose error also tells whether the VMM died (exit code + log tail)."""
        try:
            return await vm.api.call(method, path, body)
        except VmmError as exc:
            if not isinstance(exc, VmmApiError) and vm.child is not None:
                await vm.child.wait(0.5)  # a dropped connection: let a dying VMM be reaped, bounded
            if vm.exited():
                code = vm.exit_code()
                raise VmmError(
                    f"firecracker exited (exit code {code}) during {method} {path}: {exc}",
                    exit_code=code, log_tail=tail(vm.workdir / LOG, LOG_TAIL),
                ) from exc
            if not exc.log_tail:
                exc.log_tail = tail(vm.workdir / LOG, LOG_TAIL)
            raise

    async def _state(self, vm: _Vm) -> str:
        info = await self._call(vm, "GET", "/")
        if not isinstance(info, dict) or not isinstance(info.get("state"), str):
            raise VmmApiError("firecracker answered GET / without an instance state", body=str(info)[:500])
        return str(info["state"])

    async def _wait_state(self, vm: _Vm, want: str, timeout_ms: int) -> None:
        deadline = time.monotonic() + timeout_ms / 1000
        while (state := await self._state(vm)) != want:
            if time.monotonic() > deadline:
                raise VmmTimeout(f"firecracker stayed {state!r} for {timeout_ms} ms, wanted {want!r}",
                                 log_tail=tail(vm.workdir / LOG, LOG_TAIL))
            await asyncio.sleep(0.02)

    def _ready_line(self, saved: object) -> str:
        """The ready line of a VM made earlier (kept in vm.json or a snapshot manifest): the setting
        wins when set; a record without one gets what the current rootfs would."""
        if self.settings.ready_line is None and isinstance(saved, str):
            return saved
        return self.settings.guest_ready_line()

    def _vm(self, record: VmRecord) -> _Vm:
        vm = self._vms.get(record.vm_id)
        if vm is None:
            raise VmmError(f"firecracker of vm '{record.vm_id}' is not running")
        return vm

    @staticmethod
    def _handle(vm: _Vm) -> VmHandle:
        return VmHandle(pid=vm.pid, control=str(vm.socket), extra={"driver": "firecracker", "disk": str(vm.disk)})

    @staticmethod
    def _check_network(vm: VmRecord) -> None:
        """Firecracker has TAP devices only: ``none`` (no NIC) or ``bridge`` (DESIGN.md §10)."""
        if vm.network.mode not in (NetworkMode.NONE, NetworkMode.BRIDGE):
            raise VmmError(f"network mode '{vm.network.mode.value}' is not available with the firecracker "
                           "provider (TAP devices only: MICROVM_NETWORK=bridge or none)")

    @staticmethod
    def _nics(vm: VmRecord) -> list[dict[str, Any]]:
        """The VM's network interfaces: in bridge mode ``eth0`` on the namespace's TAP, else none."""
        if vm.network.mode is not NetworkMode.BRIDGE:
            return []
        return [{"iface_id": IFACE_ID, "host_dev_name": TAP, "guest_mac": GUEST_MAC}]

    def _check_spec(self, spec: VmSpec) -> None:
        if (spec.image or DEFAULT_IMAGE) != DEFAULT_IMAGE:
            raise ImageError(
                f"image '{spec.image}' is not available with the firecracker provider "
                f"(it boots {ENV_PREFIX}KERNEL and {ENV_PREFIX}ROOTFS)"
            )
        if not 1 <= spec.vcpus <= MAX_VCPUS:
            raise InvalidInput(f"vcpus must be between 1 and {MAX_VCPUS} for firecracker")

    async def _spawn(self, record: VmRecord, disk: Path, disk_read_only: bool,
                     jail: dict[str, str] | None = None) -> _Vm:
        """Start ``firecracker --api-sock`` and wait, with a deadline, until its API answers (``jail``:
        the files already placed in its chroot, see :meth:`_into_jail`)."""
        workdir = Path(record.workdir)
        sock = self.socket_path(workdir)
        try:
            sock.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            sock.parent.mkdir(parents=True, exist_ok=True)
            argv = self.vmm_argv(record, sock)
            child = await Child.spawn(argv, workdir / LOG, cwd=workdir)
        except OSError as exc:
            await self._remove_jail(workdir)
            raise VmmError(f"cannot start firecracker ({type(exc).__name__}: {exc})") from exc
        vm = _Vm(record.vm_id, workdir, sock, self._new_api(sock), child, child.pid, disk, disk_read_only,
                 jail=dict(jail or {}))
        self._vms[record.vm_id] = vm
        async with self._killed_on_error(vm, "cannot start firecracker"):
            (workdir / PID).write_text(str(child.pid))
            await self._wait_api(vm)
        return vm

    @contextlib.asynccontextmanager
    async def _killed_on_error(self, vm: _Vm, what: str) -> AsyncIterator[None]:
        """Stop ``vm``'s VMM (shielded) if the block fails or is cancelled; an ``OSError`` (a file of
        the VM's folder) becomes a :class:`VmmError` saying ``what``."""
        try:
            yield
        except BaseException as exc:
            await asyncio.shield(self._kill(vm.vm_id, vm.workdir))
            if isinstance(exc, OSError):
                raise VmmError(f"{what} ({type(exc).__name__}: {exc})") from exc
            raise

    async def _wait_api(self, vm: _Vm) -> None:
        timeout_ms = self.settings.socket_ready_timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000
        assert vm.child is not None
        while True:
            if vm.child.returncode is not None:
                raise VmmError("firecracker exited during start-up", exit_code=vm.child.returncode,
                               log_tail=vm.child.log_tail(LOG_TAIL))
            if vm.socket.exists():
                try:
                    await vm.api.call("GET", "/")
                    return
                except VmmApiError:
                    return  # it answers: that is all we wait for
                except VmmError:
                    pass  # bound but not accepting yet
            if time.monotonic() > deadline:
                raise VmmTimeout(f"firecracker API socket did not appear within {timeout_ms} ms",
                                 log_tail=vm.child.log_tail(LOG_TAIL))
            await asyncio.sleep(0.01)

    def _start_watcher(self, vm: _Vm) -> None:
        vm.watcher = asyncio.create_task(self._watch(vm), name=f"firecracker-watch-{vm.workdir.name[:12]}")

    async def _watch(self, vm: _Vm) -> None:
        if vm.child is not None:
            code: int | None = await vm.child.proc.wait()
        else:
            await wait_pid_exit(vm.pid)
            code = None
        if vm.stopping or self._vms.get(vm.vm_id) is not vm:
            return
        reason = f"firecracker exited unexpectedly (exit code {code})"
        last = tail(vm.workdir / LOG, 500).strip()
        if last:
            reason += f"; log tail: {last}"
        log.warning("%s (vm %r)", reason, vm.vm_id)
        if self._listener is not None:
            self._listener(vm.vm_id, reason)

    async def _kill(self, vm_id: str, workdir: Path, handle: VmHandle | None = None) -> int | None:
        """Stop the VMM: SIGTERM, then SIGKILL, each with a deadline; reap it; remove its socket (and its
        chroot under the jailer)."""
        grace = self.settings.stop_timeout_ms / 1000
        vm = self._vms.pop(vm_id, None)
        code: int | None = None
        if vm is not None:
            vm.stopping = True
            if vm.child is not None:
                code = await vm.child.stop(polite=None, grace=0, term_grace=grace)
            elif vm.pid and self._runs_in(vm.pid, workdir):
                await kill_pid(vm.pid, grace=grace)
            if vm.watcher is not None:
                await _stop_task(vm.watcher)
            await vm.api.aclose()
            sockets = {vm.socket}
        else:  # not ours in this process (operator restarted, never adopted): find it by its pid file
            pid = handle.pid if handle is not None and handle.pid else read_pid(workdir / PID)
            if pid and self._runs_in(pid, workdir):
                await kill_pid(pid, grace=grace)
            sockets = {self.socket_path(workdir)}
            if handle is not None and handle.control:
                sockets.add(Path(handle.control))
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.unlink()
        await self._remove_jail(workdir)  # the VMM is gone for good: so is its chroot
        return code

    def _config(self, spec: VmSpec, disk: Path, read_only: bool, kernel: str, initrd: str,
                boot_args: str, cidata: Path | None, nics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        boot: dict[str, Any] = {"kernel_image_path": kernel, "boot_args": boot_args}
        if initrd:
            boot["initrd_path"] = initrd
        root: dict[str, Any] = {"drive_id": DRIVE_ID, "path_on_host": str(disk), "is_root_device": True,
                                "is_read_only": read_only}
        if self.settings.disk_limits.limited:
            root["rate_limiter"] = rate_limiter(self.settings.disk_limits)
        drives = [root]
        if cidata is not None:
            drives.append(_cidata_drive(cidata))
        config: dict[str, Any] = {
            "machine-config": {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib},
            "boot-source": boot,
            "drives": drives,
        }
        if nics:
            config["network-interfaces"] = nics
        return config

    async def _logger(self, vm: _Vm) -> None:
        if self.settings.log_level:  # to stdout, i.e. firecracker.log (no log_path: it would have to exist)
            await self._call(vm, "PUT", "/logger", {"level": self.settings.log_level, "show_level": True})

    async def _configure(self, vm: _Vm, config: Mapping[str, Any]) -> None:
        config = self._api_config(vm, config)
        await self._logger(vm)
        await self._call(vm, "PUT", "/machine-config", config["machine-config"])
        await self._call(vm, "PUT", "/boot-source", config["boot-source"])
        for drive in config["drives"]:
            await self._call(vm, "PUT", f"/drives/{drive['drive_id']}", drive)
        for nic in config.get("network-interfaces") or []:  # pre-boot only: always before InstanceStart
            await self._call(vm, "PUT", f"/network-interfaces/{nic['iface_id']}", nic)

    def _save_config(self, vm: _Vm, config: Mapping[str, Any]) -> None:
        vm.config = dict(config)
        data = {"config": config, "disk": str(vm.disk), "disk_read_only": vm.disk_read_only,
                "ready_line": vm.ready_line, "jail": vm.jail}
        (vm.workdir / CONFIG).write_text(json.dumps(data, indent=1))

    # ---- VmmDriver -----------------------------------------------------------------------------------

    async def create(self, vm: VmRecord) -> VmHandle | None:
        s = self.settings
        self._check_spec(vm.spec)
        self._check_network(vm)
        s.check_host()
        workdir = Path(vm.workdir)
        read_only = s.rootfs_ro
        disk = Path(s.rootfs).resolve() if read_only else workdir / DISK  # read-only: shared, never copied
        if not read_only:
            await _place(Path(s.rootfs), disk, link=False)
        cidata = await build_config_drive_async(guest_config(vm), workdir / CIDATA)  # a new instance-id
        kernel, initrd = str(Path(s.kernel).resolve()), str(Path(s.initrd).resolve()) if s.initrd else ""
        jail: dict[str, str] = {}
        if s.jailer:  # everything Firecracker opens must be inside its chroot (the jailer doc)
            try:
                await self._new_jail(vm)
                await self._jail_boot(workdir, jail, {"kernel_image_path": kernel, "initrd_path": initrd})
                disk = await self._into_jail(workdir, jail, disk, DISK, own=not read_only, writable=not read_only)
                await self._into_jail(workdir, jail, cidata, CIDATA, own=True)
            except BaseException:
                await asyncio.shield(self._remove_jail(workdir))
                raise
        q = await self._spawn(vm, disk, read_only, jail)
        q.ready_line = s.guest_ready_line()  # decided by the rootfs the VM boots, kept in vm.json
        config = self._config(vm.spec, disk, read_only, kernel, initrd, s.boot_args, cidata, self._nics(vm))
        async with self._killed_on_error(q, "cannot write the firecracker configuration"):
            await self._configure(q, config)
            self._save_config(q, config)
        self._start_watcher(q)
        return self._handle(q)

    async def boot(self, vm: VmRecord) -> VmHandle | None:
        q = self._vm(vm)
        log_path = q.workdir / LOG
        state = await self._state(q)
        if state == "Not started":
            offset = _size(log_path)
            await self._call(q, "PUT", "/actions", {"action_type": "InstanceStart"})
        elif state == "Running":
            offset = 0  # started before an operator crash: the replayed start looks for the line again
        else:
            raise VmmError(f"firecracker of a created vm is {state!r}", log_tail=tail(log_path, LOG_TAIL))
        timeout_ms = self.settings.boot_timeout_ms
        await self._wait_state(q, "Running", timeout_ms)
        if q.ready_line:
            await self._wait_ready_line(q, offset, timeout_ms)
        return self._handle(q)

    async def _wait_ready_line(self, vm: _Vm, offset: int, timeout_ms: int) -> None:
        """Scan the console (``firecracker.log``) from ``offset`` for the ready line, with a deadline."""
        needle = vm.ready_line.encode()
        deadline = time.monotonic() + timeout_ms / 1000
        carry = b""
        while True:
            try:
                with open(vm.workdir / LOG, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
            except OSError:
                chunk = b""
            offset += len(chunk)
            window = carry + chunk
            if needle in window:
                return
            carry = window[-(len(needle) - 1):] if len(needle) > 1 else b""
            if vm.exited():
                raise VmmError("firecracker exited while the guest was booting", exit_code=vm.exit_code(),
                               log_tail=tail(vm.workdir / LOG, LOG_TAIL))
            if time.monotonic() > deadline:
                raise VmmTimeout(
                    f"guest did not print its ready line {vm.ready_line!r} within {timeout_ms} ms "
                    f"(it is {ENV_PREFIX}READY_LINE, or this project's image's own)",
                    log_tail=tail(vm.workdir / LOG, LOG_TAIL),
                )
            await asyncio.sleep(0.05)

    async def pause(self, vm: VmRecord) -> None:
        await self._call(self._vm(vm), "PATCH", "/vm", {"state": "Paused"})

    async def resume(self, vm: VmRecord) -> None:
        q = self._vm(vm)
        await self._call(q, "PATCH", "/vm", {"state": "Resumed"})
        await self._wait_state(q, "Running", self.settings.api_timeout_ms)

    async def snapshot(self, vm: VmRecord, snapdir: str) -> int:
        q = self._vm(vm)
        out = Path(snapdir)
        manifest: dict[str, Any] = {
            "format": SNAP_FORMAT, "vm_status": vm.status.value, "spec": vm.spec.to_json(),
            "config": q.config or self._config(vm.spec, q.disk, q.disk_read_only, self.settings.kernel,
                                               self.settings.initrd, self.settings.boot_args, None, self._nics(vm)),
            "disk": SNAP_DISK, "disk_read_only": q.disk_read_only, "ready_line": q.ready_line,
        }
        if vm.status is VmStatus.CREATED:
            await _place(q.disk, out / SNAP_DISK, link=False)  # config + disk only
        else:
            named = await self._snapshot_live(q, out, running=vm.status is VmStatus.RUNNING)
            manifest.update(state=SNAP_STATE, memory=SNAP_MEM, state_drives=named, jailed=bool(self.settings.jailer))
        try:
            (out / SNAP_MANIFEST).write_text(json.dumps(manifest, indent=1))
            return sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        except OSError as exc:
            raise VmmError(f"cannot write the snapshot manifest ({exc})") from exc

    async def _snapshot_live(self, q: _Vm, out: Path, *, running: bool) -> dict[str, str]:
        """Pause (if running), copy the disks, save with the drives pointing at the copies, undo, resume.
        Returns the path the saved state names for each drive (the load opens those).

        The config drive is copied too (a link: it is never written): the saved state names it, and a
        load opens every drive the state names. Under the jailer the copies are linked into the chroot's
        ``/snapshot`` folder, Firecracker writes the state and memory there (chroot-relative paths), and
        they are moved to ``out`` afterwards; ``/snapshot`` is then emptied."""
        copies = [(DRIVE_ID, q.disk, out / SNAP_DISK, q.disk_read_only and q.disk.parent == q.workdir)]
        cidata = _drive_path(q.config, CIDATA_ID)
        if cidata is not None:
            copies.append((CIDATA_ID, cidata, out / SNAP_CIDATA, True))
        if running:
            await self._call(q, "PATCH", "/vm", {"state": "Paused"})
        repointed: list[tuple[str, Path]] = []
        named: dict[str, str] = {}
        jailed = bool(self.settings.jailer)
        state = f"/{JAIL_SNAP}/{SNAP_STATE}" if jailed else str(out / SNAP_STATE)
        memory = f"/{JAIL_SNAP}/{SNAP_MEM}" if jailed else str(out / SNAP_MEM)
        try:
            await self._drop_from_jail(q.workdir, JAIL_SNAP)
            for drive_id, own, copy, link in copies:
                await _place(own, copy, link=link)
                jail = dict(q.jail)
                await self._into_jail(q.workdir, jail, copy, f"{JAIL_SNAP}/{copy.name}", own=True)
                named[drive_id] = jail.get(str(copy), str(copy))
                await self._call(q, "PATCH", f"/drives/{drive_id}", {"drive_id": drive_id, "path_on_host": named[drive_id]})
                repointed.append((drive_id, own))
            await self._call(q, "PUT", "/snapshot/create", {
                "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory,
            })
            if jailed:
                await self._out_of_jail(q.workdir, state.lstrip("/"), out / SNAP_STATE)
                await self._out_of_jail(q.workdir, memory.lstrip("/"), out / SNAP_MEM)
        finally:
            if repointed:
                try:
                    for drive_id, own in repointed:
                        await self._call(q, "PATCH", f"/drives/{drive_id}",
                                         {"drive_id": drive_id, "path_on_host": self._api_path(q, own)})
                except VmmError as exc:
                    # Resumed, the guest would write into the snapshot's disk: stop it instead.
                    await asyncio.shield(self._kill(q.vm_id, q.workdir))
                    raise VmmError(f"firecracker could not switch the disk back after a snapshot, "
                                   f"so it was stopped: {exc}", log_tail=exc.log_tail) from exc
            if running:
                await self._call(q, "PATCH", "/vm", {"state": "Resumed"})
            await self._drop_from_jail(q.workdir, JAIL_SNAP)
        if running:
            await self._wait_state(q, "Running", self.settings.api_timeout_ms)
        return named

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        self._check_network(vm)
        src = Path(snapshot.path)
        manifest = _read_manifest(src)
        status = snapshot.vm_status
        read_only = bool(manifest.get("disk_read_only", False))
        config: dict[str, Any] = manifest["config"]
        boot = config.get("boot-source") or {}
        # A live snapshot taken before config drives has none in its saved state, and no drive can be
        # added after a load: such a clone stays without one. Every other restore gets a new drive.
        with_cidata = status is VmStatus.CREATED or _drive_path(config, CIDATA_ID) is not None
        saved_nics = config.get("network-interfaces") or []
        if status is VmStatus.CREATED:  # configured afresh: the NIC this operator's network mode gives
            config = {k: v for k, v in config.items() if k != "network-interfaces"}
            if nics := self._nics(vm):
                config["network-interfaces"] = nics
        elif saved_nics and vm.network.mode is not NetworkMode.BRIDGE:
            # the load re-opens the TAP the saved state names: there is none outside a VM's namespace
            raise VmmError(f"snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}' was taken with a network "
                           f"interface (MICROVM_NETWORK=bridge); this operator runs MICROVM_NETWORK="
                           f"{vm.network.mode.value}, so it cannot be restored here")
        elif not saved_nics and vm.network.mode is NetworkMode.BRIDGE:
            log.warning("snapshot %r of vm %r has no network interface (taken without bridge networking): "
                        "its clone %r has none either (none can be added after a load)",
                        snapshot.snapshot_id, snapshot.vm_id, vm.vm_id)
        if status is VmStatus.CREATED:
            self.settings.check_host(kernel=str(boot.get("kernel_image_path", "")),
                                     initrd=str(boot.get("initrd_path", "")), rootfs=str(src / SNAP_DISK))
        else:
            self.settings.check_binary()  # the kernel is in the snapshot's memory
            for name in (SNAP_STATE, SNAP_MEM, SNAP_DISK, *([SNAP_CIDATA] if with_cidata else [])):
                if not (src / name).is_file():
                    raise VmmError(f"snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}' is missing {name}")
        jailed = bool(self.settings.jailer)
        if status is not VmStatus.CREATED and manifest.get("jailed") and not jailed:
            raise VmmError(f"snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}' was taken under the jailer "
                           f"(its saved state names paths inside a chroot): restore it with {ENV_PREFIX}JAILER set")
        workdir = Path(vm.workdir)
        disk = workdir / DISK
        await _place(src / SNAP_DISK, disk, link=read_only)  # the new VM's own copy (a link if read-only)
        own = {DRIVE_ID: disk}
        if with_cidata:  # the clone's own, with a new instance-id
            own[CIDATA_ID] = await build_config_drive_async(guest_config(vm), workdir / CIDATA)
        jail: dict[str, str] = {}
        load = {"snapshot_path": str(src / SNAP_STATE), "backend_path": str(src / SNAP_MEM)}
        if jailed:  # everything Firecracker opens, inside its chroot, before it runs
            try:
                await self._new_jail(vm)
                if status is VmStatus.CREATED:
                    await self._jail_boot(workdir, jail, boot)
                else:  # the state and memory, and the drives the saved state names, where it names them
                    for key, name in (("snapshot_path", SNAP_STATE), ("backend_path", SNAP_MEM)):
                        load[key] = "/" + f"{JAIL_SNAP}/{name}"
                        await self._into_jail(workdir, {}, src / name, f"{JAIL_SNAP}/{name}", own=True)
                    named = manifest.get("state_drives") or {DRIVE_ID: str(src / SNAP_DISK),
                                                             CIDATA_ID: str(src / SNAP_CIDATA)}
                    files = {DRIVE_ID: SNAP_DISK, CIDATA_ID: SNAP_CIDATA}
                    for drive_id, path in named.items():
                        if drive_id in files and (drive_id != CIDATA_ID or with_cidata):
                            await self._into_jail(workdir, {}, src / files[drive_id], str(path).lstrip("/"), own=True)
                disk = own[DRIVE_ID] = await self._into_jail(workdir, jail, disk, DISK, own=not read_only,
                                                             writable=not read_only)
                if with_cidata:
                    await self._into_jail(workdir, jail, own[CIDATA_ID], CIDATA, own=True)
            except BaseException:
                await asyncio.shield(self._remove_jail(workdir))
                raise
        drives = [d for d in config.get("drives", []) if d.get("drive_id") != CIDATA_ID]
        drives += [_cidata_drive(own[CIDATA_ID])] if with_cidata else []
        config = {**config, "drives": [{**d, "path_on_host": str(own[d["drive_id"]])} if d.get("drive_id") in own
                                       else d for d in drives]}
        q = await self._spawn(vm, disk, read_only, jail)
        q.ready_line = self._ready_line(manifest.get("ready_line"))
        async with self._killed_on_error(q, "cannot write the firecracker configuration"):
            if status is VmStatus.CREATED:
                await self._configure(q, config)
            else:
                await self._logger(q)  # logger (and metrics) are the only calls allowed before a load
                # The load opens the drives the saved state names (the snapshot's own copies); then each
                # is pointed at this VM's own file (drives are not part of a Firecracker snapshot).
                await self._call(q, "PUT", "/snapshot/load", {
                    "snapshot_path": load["snapshot_path"],
                    "mem_backend": {"backend_type": "File", "backend_path": load["backend_path"]},
                    "resume_vm": False,
                })
                for drive_id, path in own.items():
                    await self._call(q, "PATCH", f"/drives/{drive_id}",
                                     {"drive_id": drive_id, "path_on_host": self._api_path(q, path)})
                await self._drop_from_jail(workdir, JAIL_SNAP)  # loaded: the memory is mapped, the drives re-pointed
                if status is VmStatus.RUNNING:
                    await self._call(q, "PATCH", "/vm", {"state": "Resumed"})
                    await self._wait_state(q, "Running", self.settings.api_timeout_ms)
                else:
                    await self._wait_state(q, "Paused", self.settings.api_timeout_ms)
            self._save_config(q, config)
        self._start_watcher(q)
        return self._handle(q)

    async def destroy(self, vm: VmRecord) -> None:
        code = await self._kill(vm.vm_id, Path(vm.workdir), vm.handle)
        if code is not None:
            log.info("firecracker of vm %r stopped (exit code %s)", vm.vm_id, code)
        await self._remove_jail(Path(vm.workdir))  # before the folder: a chroot never outlives its VM's folder
        await asyncio.to_thread(shutil.rmtree, vm.workdir, True)

    async def delete_snapshot(self, snapshot: SnapshotRecord) -> None:
        await asyncio.to_thread(shutil.rmtree, snapshot.path, True)

    async def alive(self, vm: VmRecord) -> bool:
        q = self._vms.get(vm.vm_id)
        if q is None:
            return await self._probe(vm) is not None
        if q.exited():
            return False
        try:
            await self._state(q)
        except VmError:
            return False
        return True

    async def _probe(self, vm: VmRecord) -> _Vm | None:
        """A VMM of ``vm`` left by an earlier operator process: pid alive, ours, and ``GET /`` answers."""
        workdir = Path(vm.workdir)
        pid = vm.handle.pid if vm.handle is not None and vm.handle.pid else read_pid(workdir / PID)
        if not pid or not self._runs_in(pid, workdir):  # alive, and a VMM this driver started there
            return None
        sock = Path(vm.handle.control) if vm.handle is not None and vm.handle.control else self.socket_path(workdir)
        saved = _read_json(workdir / CONFIG)
        disk = Path(saved.get("disk") or workdir / DISK)
        q = _Vm(vm.vm_id, workdir, sock, self._new_api(sock), None, pid, disk,
                bool(saved.get("disk_read_only", False)), config=dict(saved.get("config") or {}),
                ready_line=self._ready_line(saved.get("ready_line")),
                jail={str(k): str(v) for k, v in (saved.get("jail") or {}).items()})
        try:
            await self._state(q)
        except VmError:
            await q.api.aclose()
            return None
        return q

    async def adopt(self, vm: VmRecord) -> bool:
        if vm.vm_id in self._vms:
            return await self.alive(vm)
        q = await self._probe(vm)
        if q is None:
            return False
        self._vms[vm.vm_id] = q
        self._start_watcher(q)
        return True

    async def console(self, vm: VmRecord, tail_bytes: int) -> str:
        return tail(Path(vm.workdir) / LOG, tail_bytes) if tail_bytes > 0 else ""

    async def close(self, *, stop_vms: bool) -> None:
        for vm_id, q in list(self._vms.items()):
            if stop_vms:
                await self._kill(vm_id, q.workdir)
                continue
            q.stopping = True
            self._vms.pop(vm_id, None)
            if q.watcher is not None:
                await _stop_task(q.watcher)
            await q.api.aclose()


# ---- helpers --------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def rate_limiter(limits: DiskLimits) -> dict[str, Any]:
    """Firecracker's ``RateLimiter`` for ``limits``: a token bucket per limit that holds one second's worth
    and refills in one second (so bursts of up to a second's worth, then the rate), none for a 0."""
    out: dict[str, Any] = {}
    if limits.bps:
        out["bandwidth"] = {"size": limits.bps, "refill_time": 1000}
    if limits.iops:
        out["ops"] = {"size": limits.iops, "refill_time": 1000}
    return out


def _cidata_drive(path: Path) -> dict[str, Any]:
    """The config drive (DESIGN.md §8): a second, read-only virtio-blk drive."""
    return {"drive_id": CIDATA_ID, "path_on_host": str(path), "is_root_device": False, "is_read_only": True}


def _drive_path(config: Mapping[str, Any], drive_id: str) -> Path | None:
    """The host file of drive ``drive_id`` in a saved configuration, if it has that drive."""
    for drive in config.get("drives") or []:
        if isinstance(drive, dict) and drive.get("drive_id") == drive_id and drive.get("path_on_host"):
            return Path(drive["path_on_host"])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_manifest(src: Path) -> dict[str, Any]:
    manifest = _read_json(src / SNAP_MANIFEST)
    if manifest.get("format") != SNAP_FORMAT or not isinstance(manifest.get("config"), dict):
        raise VmmError(f"snapshot folder {src.name} has no readable firecracker manifest")
    return manifest


async def _place(src: Path, dst: Path, *, link: bool) -> None:
    """Copy ``src`` to ``dst`` (a hard link when ``link`` and the file is never written)."""
    def run() -> None:
        if link:
            try:
                os.link(src, dst)
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
        shutil.copyfile(src, dst)

    try:
        await asyncio.to_thread(run)
    except FileNotFoundError as exc:
        raise ImageError(f"disk image not found: {exc.filename}") from exc
    except OSError as exc:
        raise VmmError(f"cannot copy the disk {src.name} ({type(exc).__name__}: {exc})") from exc


async def _stop_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end.

    The task's own end (cancelled, or an error, which is logged) is not the caller's; a cancellation
    of the *caller* while it waits propagates (``asyncio.wait`` does not swallow it, as awaiting the
    task under ``suppress(CancelledError)`` would), and the task still ends on its own."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("%s failed: %s", task.get_name(), exc)


def _instance_id(workdir: str | Path) -> str:
    """Firecracker's (and the jailer's) ``--id``: from the folder name, letters, digits and hyphens only."""
    return f"vm-{Path(workdir).name[:SOCKET_NAME_LEN]}"


def _chown(path: Path, uid: int, gid: int) -> None:
    """``chown`` unless ``path`` already belongs to ``uid``/``gid`` (a non-root operator's own user needs none)."""
    st = path.stat()
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)


def _jail_dirs(root: Path, folder: Path, uid: int, gid: int) -> None:
    """Make ``folder`` (inside the chroot ``root``) and the folders between: 0700, the jailer's user's."""
    missing = []
    here = folder
    while here != root and not here.exists():
        missing.append(here)
        here = here.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)
        _chown(d, uid, gid)


def _may_read(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may read the file ``path`` by its mode bits (root may read anything)."""
    if uid == 0:
        return True
    st = path.stat()
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return bool(st.st_mode >> shift & 0o4)
