"""QEMU ``microvm`` driver over QMP (``qemu.qmp``): real Linux guests, under KVM or TCG.

One QEMU process per VM (:class:`~.process.QemuProcess`), spawned from an argv list (``argv.py``) with
its working directory set to the VM's folder (so every path in its argv is a short relative name,
never derived from a raw id).

* create: configured, not running (``-S``); the disk is a qcow2 overlay on the read-only base image,
  so creating costs the same for a 64 MiB or a 4 GiB image.
* start (created): ``cont``, then ready = the guest's ready line on its console, within a deadline.
* stop / resume: ``stop`` / ``cont`` (ready = ``query-status`` says running).
* snapshot: pause, ``migrate`` to a file descriptor passed over the socket (``getfd`` + ``fd:``; never
  an ``exec:`` URI, which runs a shell), copy the overlay, resume if it was running.
* restore: a new QEMU with ``-incoming defer``, ``migrate-incoming`` from a passed fd, its own copy of
  the snapshot's disk; ``cont`` if the snapshot was taken running.
* console: QEMU appends the serial output to ``console.log`` in the VM folder itself (the chardev's
  ``logfile=``), so an operator killed at any moment loses none of it; the operator only reads it
  and keeps it capped (``console.py``); it is readable after a restart.
* destroy: the QMP session is closed, then SIGTERM (QEMU's orderly shutdown), then SIGKILL; always
  reaped; the folder is removed.

Accelerator ``auto`` boots a probe guest under KVM once per process and falls back to TCG when it
does not reach its ready line in time (nested PVM ``/dev/kvm`` hangs ordinary guests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ... import images, netns
from ...configdrive import build_config_drive_async, guest_config
from ...driver import ExitListener
from ...errors import ImageError, InvalidInput, VmError, VmmApiError, VmmError, VmmTimeout
from ...model import NetworkMode, SnapshotRecord, VmHandle, VmRecord, VmSpec, VmStatus
from . import console
from .argv import (
    CONFIG,
    CONFIG_DRIVE,
    CONSOLE_LOG,
    DISK,
    LAST_SAVE,
    QMP_SOCK,
    SNAP_CONFIG,
    SNAP_DISK,
    SNAP_MEMORY,
    QemuSettings,
    qemu_argv,
)
from .process import QemuProcess, kill_left_over

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"


class QemuDriver:
    name = "qemu"

    def __init__(self, settings: QemuSettings | None = None) -> None:
        self.settings = settings or QemuSettings()
        self._vms: dict[str, QemuProcess] = {}
        self._listener: ExitListener | None = None
        self._error_listener: ExitListener | None = None
        self._swept = False
        self._accel: str | None = None if self.settings.accel == "auto" else self.settings.accel
        self._accel_lock = asyncio.Lock()
        self._warned_tun = False

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    def isolates_users(self) -> bool:
        """True when ``settings.confine`` switches users (a root operator): then each QEMU runs as its VM's uid."""
        return self.settings.confine is not None and self.settings.confine.isolates_users()

    def tap_owner(self, vm: VmRecord) -> tuple[int, int] | None:
        """The user ``vm``'s QEMU runs as (its own uid, else the VMM user of ``settings.confine``), who opens
        the TAP; ``None`` unconfined."""
        return self.settings.confine.tap_owner(vm.vmm_uid) if self.settings.confine is not None else None

    def set_error_listener(self, listener: ExitListener) -> None:
        """``listener(vm_id, text)`` when a guest's disk fails (the VM keeps running; the view shows it)."""
        self._error_listener = listener

    # ---- helpers -------------------------------------------------------------------------------

    def _image(self, name: str) -> images.ImageManifest:
        return images.resolve_image(name, self.settings.image_dir)

    def _check_binaries(self) -> None:
        for b in (self.settings.qemu_bin, self.settings.qemu_img):
            if shutil.which(b) is None:
                raise ImageError(f"`{b}` is not installed (apt-get install qemu-system-x86 qemu-utils)")

    async def accel(self, manifest: images.ImageManifest) -> str:
        """The accelerator to use; ``auto`` verifies once that KVM really boots a guest."""
        if self._accel is not None:
            return self._accel
        async with self._accel_lock:
            if self._accel is None:
                self._accel = await self._probe_kvm(manifest)
        return self._accel

    async def _probe_kvm(self, manifest: images.ImageManifest) -> str:
        confine = self.settings.confine
        if not (confine.can_use("/dev/kvm", write=True) if confine else os.access("/dev/kvm", os.R_OK | os.W_OK)):
            log.info("accelerator: /dev/kvm not usable by the VMM; using TCG (software emulation)")
            return "tcg"
        probe_id = f"kvm-probe-{os.getpid()}"
        with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
            record = VmRecord(probe_id, VmStatus.CREATED, _probe_spec(), tmp)
            try:
                q = await self._spawn(record, manifest, "kvm")
                await q.execute("cont")
                await q.wait_ready(self.settings.kvm_probe_timeout)
                verdict = "kvm"
            except VmError as exc:
                log.warning("accelerator: KVM did not boot a guest within %.0fs (%s); falling back to TCG",
                            self.settings.kvm_probe_timeout, str(exc).splitlines()[0])
                verdict = "tcg"
            finally:
                await self._kill(probe_id, Path(tmp))
        if verdict == "kvm":
            log.info("accelerator: KVM verified by a probe boot")
        return verdict

    async def _spawn(self, record: VmRecord, manifest: images.ImageManifest, accel: str, *,
                     incoming: bool = False, devices: bool = True) -> QemuProcess:
        """Spawn the VM's QEMU. ``devices``: with the config drive and the NIC (every VM since they
        exist; a snapshot taken before them restores without, since migration needs the same devices)."""
        workdir = Path(record.workdir)
        if devices:
            await build_config_drive_async(guest_config(record), workdir / CONFIG_DRIVE)
        argv = qemu_argv(self.settings, manifest, vcpus=record.spec.vcpus, mem_mib=record.spec.mem_mib,
                         accel=accel, incoming=incoming, network=record.network if devices else None,
                         config_drive=devices)
        confine = self.settings.confine
        uid = record.vmm_uid  # the VM's own uid (DESIGN.md §9), else the shared VMM user
        creds = confine.spawn_kwargs(uid) if confine is not None else {"umask": 0o077}
        if devices and record.network.mode is NetworkMode.BRIDGE:
            # inside the VM's namespace, where its TAP is: `ip netns exec` needs root, so the switch to the
            # VMM's user comes after it (setpriv), not from the spawn itself
            argv = netns.exec_prefix(record.vm_id) + self._drop_to_vmm_user(uid) + argv
            creds = {"umask": 0o077}
        _write_json(workdir / CONFIG, {"argv": argv, "accel": accel, "image": manifest.root, "devices": devices})
        self._confine_files(workdir, manifest, uid)
        limits = confine.limits(record.spec.mem_mib, record.spec.vcpus) if confine is not None else None
        q = await QemuProcess.spawn(record.vm_id, workdir, argv, self.settings, limits, creds=creds)
        self._adopted(q)
        return q

    def _drop_to_vmm_user(self, uid: int | None) -> list[str]:
        """The ``setpriv`` prefix that makes a bridge-mode QEMU the VMM user after ``ip netns exec`` (which
        needs root). Where that user cannot open ``/dev/net/tun`` (a root-only device: scripts/bootstrap.sh
        gives it to a ``tun`` group), QEMU stays root, still under ``-sandbox``: said once, loudly."""
        confine = self.settings.confine
        if confine is None or confine.user is None:
            return []
        if not confine.can_use(TUN_DEVICE, write=True, uid=uid):
            if not self._warned_tun:
                log.warning("the VMM user %s cannot open %s: bridge-mode QEMUs run as root (sandboxed); give "
                            "the device to a group of that user (scripts/bootstrap.sh makes a `tun` group)",
                            confine.user.name, TUN_DEVICE)
                self._warned_tun = True
            return []
        return confine.setpriv_prefix(uid)

    def _confine_files(self, workdir: Path, manifest: images.ImageManifest, uid: int | None) -> None:
        """The VM folder becomes its VMM's user's (``uid``, else the shared VMM user) and 0700, its files
        0600 (the read-only config drive 0400); the image must be readable by that user (a clear error
        before QEMU fails on it)."""
        confine = self.settings.confine
        if confine is None:
            return
        for path in (manifest.bzimage, manifest.initramfs, manifest.rootfs):
            if path and not confine.can_use(path, uid=uid):
                user = confine.vm_user(uid)
                who = user.name if user else "the operator"
                raise ImageError(f"the VMM user {who} cannot read the image file {path}: image folders must be "
                                 "0755 and their files 0644 (or set MICROVM_IMAGE_DIR to such a folder)")
        try:
            confine.own(workdir, 0o700, uid)
            for entry in os.scandir(workdir):
                if entry.is_file(follow_symlinks=False):
                    confine.own(entry.path, 0o400 if entry.name == CONFIG_DRIVE else 0o600, uid)
        except OSError as exc:
            raise VmmError(f"cannot hand the vm folder to the VMM user: {exc.strerror or exc}") from exc

    def _sweep_once(self) -> None:
        """Remove the empty cgroups a dead operator left (once per driver, at its first VM)."""
        if not self._swept and self.settings.confine is not None:
            self._swept = True
            self.settings.confine.sweep()

    def _adopted(self, q: QemuProcess) -> None:
        """Take ``q`` as the live process of its VM and start watching it."""
        self._vms[q.vm_id] = q

        def on_exit(reason: str) -> None:
            if self._vms.get(q.vm_id) is q and self._listener is not None:
                self._listener(q.vm_id, reason)

        def on_error(text: str) -> None:
            if self._vms.get(q.vm_id) is q and self._error_listener is not None:
                self._error_listener(q.vm_id, text)

        q.watch(on_exit, on_error)

    def _vm(self, record: VmRecord) -> QemuProcess:
        q = self._vms.get(record.vm_id)
        if q is None:
            raise VmmError(f"qemu of vm '{record.vm_id}' is not running")
        return q

    def _handle(self, q: QemuProcess) -> VmHandle:
        return VmHandle(pid=q.pid, control=str(q.workdir / QMP_SOCK), extra={"driver": self.name})

    async def _kill(self, vm_id: str, workdir: Path) -> int | None:
        """Stop a VM's QEMU for good (see :meth:`QemuProcess.kill`), or the one an earlier operator
        left in ``workdir``; forget it."""
        q = self._vms.pop(vm_id, None)
        try:
            if q is not None:
                return await q.kill()
            await kill_left_over(workdir, self.settings)
            return None
        finally:
            if self.settings.confine is not None:
                await asyncio.to_thread(self.settings.confine.remove, workdir.name)

    # ---- VmmDriver -----------------------------------------------------------------------------

    async def create(self, vm: VmRecord) -> VmHandle | None:
        self._check_binaries()
        self._sweep_once()
        manifest = self._image(vm.spec.image)
        workdir = Path(vm.workdir)
        size = _disk_size(manifest, vm.spec.disk_mib)
        await _run([self.settings.qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", manifest.rootfs,
                    str(workdir / DISK), *size], "qemu-img create")
        accel = await self.accel(manifest)
        return self._handle(await self._spawn(vm, manifest, accel))

    async def boot(self, vm: VmRecord) -> VmHandle | None:
        q = self._vm(vm)
        # a start replayed after an operator crash finds the guest already running (and maybe ready:
        # its ready line is in the console file whether or not an operator was there to see it)
        if await q.status() != "running":
            q.rearm_disk_watch()
            await q.execute("cont")
        await q.wait_ready(self.settings.boot_timeout)
        return self._handle(q)

    async def pause(self, vm: VmRecord) -> None:
        q = self._vm(vm)
        await q.execute("stop")
        await q.wait_status({"paused", "postmigrate"}, self.settings.qmp_timeout)

    async def resume(self, vm: VmRecord) -> None:
        q = self._vm(vm)
        q.rearm_disk_watch()
        await q.execute("cont")
        await q.wait_status({"running"}, self.settings.qmp_timeout)
        with contextlib.suppress(FileNotFoundError):
            (q.workdir / LAST_SAVE).unlink()  # the guest ran: the last save is history

    async def snapshot(self, vm: VmRecord, snapdir: str) -> int:
        q = self._vm(vm)
        out = Path(snapdir)
        was_running = vm.status is VmStatus.RUNNING
        manifest = _read_json(q.workdir / CONFIG)
        if vm.status is VmStatus.CREATED:
            await _copy(q.workdir / DISK, out / SNAP_DISK)
        else:
            if was_running:
                await q.execute("stop")
            try:
                status = await q.status()
                if status == "postmigrate" and not (q.workdir / LAST_SAVE).exists():
                    # an earlier save was interrupted (operator killed mid-snapshot): QEMU 7.2 will not
                    # migrate again from postmigrate, so let it run for a moment and pause it afresh
                    await q.execute("cont")
                    await q.execute("stop")
                    status = await q.status()
                if status == "postmigrate":  # paused since its last save: that save is its state
                    await _link_or_copy(q.workdir / LAST_SAVE, out / SNAP_MEMORY)
                else:
                    await q.pass_fd(out / SNAP_MEMORY, "snapshot", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    await q.execute("migrate", {"uri": "fd:snapshot"})
                    await q.wait_migration("saving the memory snapshot")
                    if not was_running:
                        await _link_or_copy(out / SNAP_MEMORY, q.workdir / LAST_SAVE)
                await _copy(q.workdir / DISK, out / SNAP_DISK)
            finally:
                if was_running:
                    await q.execute("cont")
        _write_json(out / SNAP_CONFIG, {**manifest, "status": vm.status.value, "spec": vm.spec.to_json()})
        try:
            out.chmod(0o700)  # a snapshot holds the guest's memory: the operator's alone
            for p in out.iterdir():
                p.chmod(0o600)
            return sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        except OSError as exc:
            raise VmmError(f"cannot size the snapshot: {exc.strerror or exc}") from exc

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        self._check_binaries()
        self._sweep_once()
        src = Path(snapshot.path)
        if not (src / SNAP_DISK).is_file():
            raise VmmError(f"snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}' has no disk")
        manifest = self._image(snapshot.spec.image)
        saved = _read_json(src / SNAP_CONFIG)
        accel = str(saved.get("accel") or await self.accel(manifest))
        workdir = Path(vm.workdir)
        await _copy(src / SNAP_DISK, workdir / DISK)
        devices = bool(saved.get("devices", False))  # the clone has the devices its source had
        if snapshot.vm_status is VmStatus.CREATED:
            return self._handle(await self._spawn(vm, manifest, accel, devices=devices))
        q = await self._spawn(vm, manifest, accel, incoming=True, devices=devices)
        try:
            await q.pass_fd(src / SNAP_MEMORY, "restore", os.O_RDONLY)
            await q.execute("migrate-incoming", {"uri": "fd:restore"})
            await q.wait_status({"paused", "prelaunch", "postmigrate"}, self.settings.migrate_timeout)
            if snapshot.vm_status is VmStatus.RUNNING:
                await q.execute("cont")
                await q.wait_status({"running"}, self.settings.qmp_timeout)
        except BaseException:
            await asyncio.shield(self._kill(vm.vm_id, workdir))
            raise
        return self._handle(q)

    async def destroy(self, vm: VmRecord) -> None:
        workdir = Path(vm.workdir)
        await self._kill(vm.vm_id, workdir)
        shutil.rmtree(workdir, ignore_errors=True)

    async def delete_snapshot(self, snapshot: SnapshotRecord) -> None:
        shutil.rmtree(snapshot.path, ignore_errors=True)

    async def alive(self, vm: VmRecord) -> bool:
        q = self._vms.get(vm.vm_id)
        if q is None or q.exited:
            return False
        try:
            await q.execute("query-status", timeout=5)
        except VmError:
            return False
        return True

    async def vmm_status(self, vm: VmRecord) -> str:
        """QEMU's own run state of ``vm`` (QMP ``query-status``: ``running``, ``paused``, ``io-error``, ...)."""
        return await self._vm(vm).status()

    async def query_block(self, vm: VmRecord) -> list[dict[str, Any]]:
        """QEMU's own view of ``vm``'s drives (QMP ``query-block``: each drive's file, throttling, io-status)."""
        answer = await self._vm(vm).execute("query-block")
        if not isinstance(answer, list):
            raise VmmApiError(f"qemu answered query-block with {answer!r}"[:300])
        return [d for d in answer if isinstance(d, dict)]

    async def adopt(self, vm: VmRecord) -> bool:
        self._sweep_once()
        workdir = Path(vm.workdir)
        q = await QemuProcess.adopt(vm.vm_id, workdir, self.settings)
        if q is None:
            return False
        self._adopted(q)
        with contextlib.suppress(VmError):  # a snapshot's save cut short by the operator's death: undone
            if await q.abandon_migration():
                log.warning("vm %r: cancelled the memory save an earlier operator left running", vm.vm_id,
                            extra={"vm_id": vm.vm_id})
        if vm.status is VmStatus.RUNNING:
            # an operator killed between a snapshot's pause and its resume leaves the guest paused:
            # bring it back to the status the store recorded
            with contextlib.suppress(VmError):
                if await q.status() in ("paused", "postmigrate"):
                    await q.execute("cont")
        log.info("re-adopted qemu pid %d for vm %r", q.pid, vm.vm_id, extra={"vm_id": vm.vm_id})
        return True

    async def console(self, vm: VmRecord, tail_bytes: int) -> str:
        return console.tail(Path(vm.workdir) / CONSOLE_LOG, tail_bytes)

    async def close(self, *, stop_vms: bool) -> None:
        for vm_id, q in list(self._vms.items()):
            if stop_vms:
                await self._kill(vm_id, q.workdir)
            else:  # leave the VM running for re-adoption; just let go of it
                self._vms.pop(vm_id, None)
                await q.release()


def _disk_size(manifest: images.ImageManifest, disk_mib: int) -> list[str]:
    """``qemu-img create``'s size argument: the image's own size unless ``disk_mib`` asks for more
    (the guest grows its filesystem to fill it); never smaller than the image (a clear error)."""
    if not disk_mib:
        return []
    try:
        base = os.path.getsize(manifest.rootfs)
    except OSError as exc:
        raise ImageError(f"cannot read the image's root {Path(manifest.rootfs).name}: {exc.strerror}") from exc
    base_mib = -(-base // (1024 * 1024))
    if disk_mib < base_mib:
        raise InvalidInput(f"disk_mib {disk_mib} is smaller than the image's {base_mib} MiB")
    return [f"{disk_mib}M"]


def _probe_spec() -> VmSpec:
    return VmSpec(vcpus=1, mem_mib=256)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VmmError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise VmmError(f"{path.name} is not a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(data))
    except OSError as exc:
        raise VmmError(f"cannot write {path.name}: {exc.strerror or exc}") from exc


async def _run(argv: list[str], what: str, timeout: float = 120) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise VmmError(f"{what} failed: {exc}") from exc
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise VmmTimeout(f"{what} did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise VmmError(f"{what} failed", exit_code=proc.returncode, log_tail=err.decode(errors="replace")[-1000:])


async def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link of ``src`` (a copy across file systems); replaces ``dst``."""
    tmp = dst.with_name(dst.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except FileNotFoundError as exc:
        raise VmmError(f"the saved state {src.name} of this paused vm is missing") from exc
    except OSError:
        await _copy(src, tmp)
    try:
        os.replace(tmp, dst)
    except OSError as exc:
        raise VmmError(f"cannot place {dst.name}: {exc.strerror or exc}") from exc


async def _copy(src: Path, dst: Path) -> None:
    try:
        await asyncio.to_thread(shutil.copyfile, src, dst)
    except OSError as exc:
        raise VmmError(f"cannot copy {src.name}: {exc.strerror or exc}") from exc
