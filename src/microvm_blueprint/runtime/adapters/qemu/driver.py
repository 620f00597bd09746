"""QEMU ``microvm`` driver over QMP (``qemu.qmp``): real Linux guests, under KVM or TCG.

One QEMU process per VM, spawned from an argv list with its working directory set to the VM's
folder (so every path in its argv is a short relative name, never derived from a raw id). The QMP
socket lives in that folder and is reached through ``/proc/self/fd/<dirfd>/qmp.sock``, which keeps
the path under the 108-byte limit of Unix sockets however deep the state directory is.

* create: configured, not running (``-S``); the disk is a qcow2 overlay on the read-only base image,
  so creating costs the same for a 64 MiB or a 4 GiB image.
* start (created): ``cont``, then ready = the guest's ready line on its console, within a deadline.
* stop / resume: ``stop`` / ``cont`` (ready = ``query-status`` says running).
* snapshot: pause, ``migrate`` to a file descriptor passed over the socket (``getfd`` + ``fd:``; never
  an ``exec:`` URI, which runs a shell), copy the overlay, resume if it was running.
* restore: a new QEMU with ``-incoming defer``, ``migrate-incoming`` from a passed fd, its own copy of
  the snapshot's disk; ``cont`` if the snapshot was taken running.
* console: a ``ringbuf`` chardev (bounded inside QEMU, kept while the operator is down) drained over
  QMP into ``console.log`` in the VM folder, which is capped in size and readable after a restart.
* destroy: ``quit``, then SIGTERM, then SIGKILL; always reaped; the folder is removed.

Accelerator ``auto`` boots a probe guest under KVM once per process and falls back to TCG when it
does not reach its ready line in time (nested PVM ``/dev/kvm`` hangs ordinary guests).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ...procs import Child, kill_pid, pid_alive, tail
from .. import images
from ..driver import ExitListener
from ..errors import ImageError, VmError, VmmApiError, VmmError, VmmTimeout
from ..model import SnapshotRecord, VmHandle, VmRecord, VmSpec, VmStatus

log = logging.getLogger(__name__)

QMP_SOCK = "qmp.sock"
PID_FILE = "qemu.pid"
QEMU_LOG = "qemu.log"
CONSOLE_LOG = "console.log"
DISK = "disk.qcow2"
CONFIG = "vm.json"
SNAP_MEMORY = "memory.bin"
SNAP_DISK = "disk.qcow2"
SNAP_CONFIG = "vm.json"
LAST_SAVE = "last-save.bin"
"""Hard link (or copy) of the memory file of the last save of a VM that stayed paused after it.

QEMU 7.2 refuses a second ``migrate`` of a VM left in ``postmigrate`` ("Can't migrate the vm that was
paused due to previous migration"); such a VM has not executed since, so its state *is* that file."""
CONSOLE_DEV = "console"


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
    console_log_bytes: int = 1024 * 1024
    kvm_probe_timeout: float = 20.0
    extra_cmdline: str = ""


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
) -> list[str]:
    """The argv of one VM's QEMU (relative paths: QEMU runs in the VM folder)."""
    argv = [
        settings.qemu_bin,
        "-M", "microvm,x-option-roms=off,rtc=on",
        "-accel", accel,
        "-cpu", "max" if accel == "tcg" else "host",
        "-m", str(mem_mib),
        "-smp", str(vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", manifest.bzimage,
        "-initrd", manifest.initramfs,
        "-append", kernel_cmdline(manifest.cmdline, accel, settings.extra_cmdline),
        "-chardev", f"ringbuf,id={CONSOLE_DEV},size={settings.console_ring_bytes}",
        "-serial", f"chardev:{CONSOLE_DEV}",
        "-drive", f"id=root,file={DISK},format=qcow2,if=none,cache=writeback",
        "-device", "virtio-blk-device,drive=root",
        "-qmp", f"unix:{QMP_SOCK},server=on,wait=off",
        "-pidfile", PID_FILE,
        "-S",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


@dataclass
class _Vm:
    vm_id: str
    workdir: Path
    qmp: QMPClient
    dirfd: int
    child: Child | None = None
    pid: int | None = None
    stopping: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    console_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class QemuDriver:
    name = "qemu"

    def __init__(self, settings: QemuSettings | None = None) -> None:
        self.settings = settings or QemuSettings()
        self._vms: dict[str, _Vm] = {}
        self._listener: ExitListener | None = None
        self._accel: str | None = None if self.settings.accel == "auto" else self.settings.accel
        self._accel_lock = asyncio.Lock()

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

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
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            log.info("accelerator: /dev/kvm not usable; using TCG (software emulation)")
            return "tcg"
        probe_id = f"kvm-probe-{os.getpid()}"
        with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
            record = VmRecord(probe_id, VmStatus.CREATED, _probe_spec(), tmp)
            try:
                await self._spawn(record, manifest, "kvm")
                await self._cont_and_wait_ready(self._vms[probe_id], self.settings.kvm_probe_timeout)
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

    async def _qmp(self, vm: _Vm, cmd: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(vm.qmp.execute(cmd, args), timeout or self.settings.qmp_timeout)
        except ExecuteError as exc:
            raise VmmApiError(f"qemu refused {cmd}: {exc}", log_tail=self._log_tail(vm)) from exc
        except TimeoutError as exc:
            raise VmmTimeout(f"qemu did not answer {cmd} within {timeout or self.settings.qmp_timeout:.0f}s",
                             log_tail=self._log_tail(vm)) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise VmmError(f"lost the QMP connection to qemu during {cmd}: {type(exc).__name__}",
                           exit_code=self._exit_code(vm), log_tail=self._log_tail(vm)) from exc

    @staticmethod
    def _log_tail(vm: _Vm) -> str:
        return tail(vm.workdir / QEMU_LOG, 2000)

    @staticmethod
    def _exit_code(vm: _Vm) -> int | None:
        return vm.child.returncode if vm.child else None

    async def _connect(self, vm: _Vm, deadline: float) -> None:
        path = f"/proc/self/fd/{vm.dirfd}/{QMP_SOCK}"
        while True:
            if vm.child is not None and vm.child.returncode is not None:
                raise VmmError("qemu exited during start-up", exit_code=vm.child.returncode,
                               log_tail=self._log_tail(vm))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                await asyncio.wait_for(vm.qmp.connect(sock), self.settings.qmp_timeout)
                return
            except (OSError, QMPError, TimeoutError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise VmmTimeout("qemu's QMP socket did not answer in time",
                                     log_tail=self._log_tail(vm)) from exc
                await asyncio.sleep(0.02)

    async def _spawn(self, record: VmRecord, manifest: images.ImageManifest, accel: str, *,
                     incoming: bool = False) -> _Vm:
        workdir = Path(record.workdir)
        argv = qemu_argv(self.settings, manifest, vcpus=record.spec.vcpus, mem_mib=record.spec.mem_mib,
                         accel=accel, incoming=incoming)
        (workdir / CONFIG).write_text(json.dumps({"argv": argv, "accel": accel, "image": manifest.root}))
        dirfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        vm = _Vm(record.vm_id, workdir, QMPClient(f"vm-{record.vm_id[:32]}"), dirfd)
        self._vms[record.vm_id] = vm
        try:
            vm.child = await Child.spawn(argv, workdir / QEMU_LOG, cwd=workdir)
        except OSError as exc:
            self._forget(record.vm_id)
            raise VmmError(f"cannot start qemu: {exc}") from exc
        vm.pid = vm.child.pid
        try:
            await self._connect(vm, time.monotonic() + self.settings.qmp_timeout)
        except BaseException:
            await self._kill(record.vm_id, workdir)
            raise
        self._watch(vm)
        return vm

    def _watch(self, vm: _Vm) -> None:
        vm.tasks.append(asyncio.create_task(self._watcher(vm), name=f"qemu-watch:{vm.vm_id[:32]}"))
        vm.tasks.append(asyncio.create_task(self._pump_loop(vm), name=f"qemu-console:{vm.vm_id[:32]}"))

    async def _watcher(self, vm: _Vm) -> None:
        if vm.child is not None:
            code = await vm.child.proc.wait()
        else:
            while pid_alive(vm.pid):
                await asyncio.sleep(0.5)
            code = None
        if not vm.stopping and self._listener is not None:
            reason = f"qemu exited unexpectedly (exit code {code})"
            lt = self._log_tail(vm).strip()
            if lt:
                reason += f": {lt[-500:]}"
            self._listener(vm.vm_id, reason)

    async def _pump(self, vm: _Vm) -> None:
        """Drain the ringbuf into console.log (capped)."""
        async with vm.console_lock:
            if vm.qmp.runstate.name != "RUNNING":
                return
            data = await asyncio.wait_for(
                vm.qmp.execute("ringbuf-read", {"device": CONSOLE_DEV, "size": 65536, "format": "utf8"}),
                self.settings.qmp_timeout,
            )
            if not data:
                return
            path = vm.workdir / CONSOLE_LOG
            with open(path, "a", encoding="utf-8", errors="replace") as fh:
                fh.write(str(data))
            if path.stat().st_size > self.settings.console_log_bytes:
                keep = tail(path, self.settings.console_log_bytes // 2)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(keep)
                os.replace(tmp, path)

    async def _pump_loop(self, vm: _Vm) -> None:
        while not vm.stopping:
            try:
                await self._pump(vm)
            except (QMPError, OSError, EOFError, TimeoutError, ExecuteError):
                if vm.stopping or (vm.child is not None and vm.child.returncode is not None):
                    return
            await asyncio.sleep(0.2)

    async def _cont_and_wait_ready(self, vm: _Vm, timeout: float) -> None:
        ready = images.READY_LINE
        path = vm.workdir / CONSOLE_LOG
        start = path.stat().st_size if path.exists() else 0
        await self._qmp(vm, "cont")
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._pump(vm)
            except (QMPError, OSError, EOFError, TimeoutError, ExecuteError) as exc:
                raise VmmError("qemu died while booting", exit_code=self._exit_code(vm),
                               log_tail=self._console_tail(vm) + self._log_tail(vm)) from exc
            if path.exists():
                with open(path, encoding="utf-8", errors="replace") as fh:
                    fh.seek(start)
                    if ready in fh.read():
                        return
            if vm.child is not None and vm.child.returncode is not None:
                raise VmmError("qemu exited while booting", exit_code=vm.child.returncode,
                               log_tail=self._console_tail(vm) + self._log_tail(vm))
            if time.monotonic() > deadline:
                raise VmmTimeout(f"guest did not print its ready line within {timeout:.0f}s",
                                 log_tail=self._console_tail(vm))
            await asyncio.sleep(0.05)

    @staticmethod
    def _console_tail(vm: _Vm) -> str:
        return tail(vm.workdir / CONSOLE_LOG, 2000)

    async def _wait_status(self, vm: _Vm, want: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = (await self._qmp(vm, "query-status"))["status"]
            if status in want:
                return str(status)
            if time.monotonic() > deadline:
                raise VmmTimeout(f"qemu stayed in state {status!r} (wanted {sorted(want)})",
                                 log_tail=self._log_tail(vm))
            await asyncio.sleep(0.02)

    async def _wait_migration(self, vm: _Vm, what: str) -> None:
        deadline = time.monotonic() + self.settings.migrate_timeout
        while True:
            info = await self._qmp(vm, "query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VmmError(f"{what} failed: {info.get('error-desc', status)}", log_tail=self._log_tail(vm))
            if time.monotonic() > deadline:
                raise VmmTimeout(f"{what} did not finish within {self.settings.migrate_timeout:.0f}s")
            await asyncio.sleep(0.02)

    async def _pass_fd(self, vm: _Vm, path: Path, name: str, flags: int) -> None:
        fd = os.open(path, flags, 0o600)
        try:
            vm.qmp.send_fd_scm(fd)
            await self._qmp(vm, "getfd", {"fdname": name})
        finally:
            os.close(fd)

    def _vm(self, record: VmRecord) -> _Vm:
        vm = self._vms.get(record.vm_id)
        if vm is None:
            raise VmmError(f"qemu of vm '{record.vm_id}' is not running")
        return vm

    def _handle(self, vm: _Vm) -> VmHandle:
        return VmHandle(pid=vm.pid, control=str(vm.workdir / QMP_SOCK), extra={"driver": self.name})

    def _forget(self, vm_id: str) -> None:
        vm = self._vms.pop(vm_id, None)
        if vm is not None:
            for t in vm.tasks:
                t.cancel()
            with contextlib.suppress(OSError):
                os.close(vm.dirfd)

    async def _kill(self, vm_id: str, workdir: Path) -> int | None:
        """Stop a VM's QEMU for good: close QMP cleanly, SIGTERM (QEMU's own orderly shutdown),
        then SIGKILL; reap; forget. (A QMP ``quit`` would leave qemu.qmp with an EOF it reports as
        an unretrieved error; SIGTERM is just as orderly for QEMU.)"""
        vm = self._vms.get(vm_id)
        code: int | None = None
        if vm is not None:
            vm.stopping = True
            for t in vm.tasks:
                t.cancel()
            await asyncio.gather(*vm.tasks, return_exceptions=True)
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError, ExecuteError):
                await asyncio.wait_for(vm.qmp.disconnect(), 3)
            if vm.child is not None:
                code = await vm.child.stop(polite=signal.SIGTERM, grace=self.settings.stop_timeout, term_grace=1)
            elif vm.pid and pid_alive(vm.pid):
                await kill_pid(vm.pid, grace=self.settings.stop_timeout)
            self._forget(vm_id)
        else:
            pid = _read_pid(workdir)
            if pid and _is_qemu_of(pid, workdir):
                await kill_pid(pid, grace=self.settings.stop_timeout)
        return code

    # ---- VmmDriver -----------------------------------------------------------------------------

    async def create(self, vm: VmRecord) -> VmHandle | None:
        self._check_binaries()
        manifest = self._image(vm.spec.image)
        workdir = Path(vm.workdir)
        await _run([self.settings.qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", manifest.rootfs,
                    str(workdir / DISK)], "qemu-img create")
        accel = await self.accel(manifest)
        return self._handle(await self._spawn(vm, manifest, accel))

    async def boot(self, vm: VmRecord) -> VmHandle | None:
        q = self._vm(vm)
        status = (await self._qmp(q, "query-status"))["status"]
        if status == "running" and images.READY_LINE in tail(q.workdir / CONSOLE_LOG, 1 << 20):
            return self._handle(q)  # booted before an operator crash; the replayed start finds it ready
        await self._cont_and_wait_ready(q, self.settings.boot_timeout)
        return self._handle(q)

    async def pause(self, vm: VmRecord) -> None:
        q = self._vm(vm)
        await self._pump(q)
        await self._qmp(q, "stop")
        await self._wait_status(q, {"paused", "postmigrate"}, self.settings.qmp_timeout)

    async def resume(self, vm: VmRecord) -> None:
        q = self._vm(vm)
        await self._qmp(q, "cont")
        await self._wait_status(q, {"running"}, self.settings.qmp_timeout)
        with contextlib.suppress(FileNotFoundError):
            (q.workdir / LAST_SAVE).unlink()  # the guest ran: the last save is history

    async def snapshot(self, vm: VmRecord, snapdir: str) -> int:
        q = self._vm(vm)
        out = Path(snapdir)
        was_running = vm.status is VmStatus.RUNNING
        manifest = json.loads((q.workdir / CONFIG).read_text())
        if vm.status is VmStatus.CREATED:
            await _copy(q.workdir / DISK, out / SNAP_DISK)
        else:
            if was_running:
                await self._pump(q)
                await self._qmp(q, "stop")
            try:
                status = (await self._qmp(q, "query-status"))["status"]
                if status == "postmigrate" and not (q.workdir / LAST_SAVE).exists():
                    # an earlier save was interrupted (operator killed mid-snapshot): QEMU 7.2 will not
                    # migrate again from postmigrate, so let it run for a moment and pause it afresh
                    await self._qmp(q, "cont")
                    await self._qmp(q, "stop")
                    status = (await self._qmp(q, "query-status"))["status"]
                if status == "postmigrate":  # paused since its last save: that save is its state
                    await _link_or_copy(q.workdir / LAST_SAVE, out / SNAP_MEMORY)
                else:
                    await self._pass_fd(q, out / SNAP_MEMORY, "snapshot", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    await self._qmp(q, "migrate", {"uri": "fd:snapshot"})
                    await self._wait_migration(q, "saving the memory snapshot")
                    if not was_running:
                        await _link_or_copy(out / SNAP_MEMORY, q.workdir / LAST_SAVE)
                await _copy(q.workdir / DISK, out / SNAP_DISK)
            finally:
                if was_running:
                    await self._qmp(q, "cont")
        (out / SNAP_CONFIG).write_text(json.dumps({**manifest, "status": vm.status.value,
                                                   "spec": vm.spec.to_json()}))
        return sum(p.stat().st_size for p in out.iterdir() if p.is_file())

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        self._check_binaries()
        src = Path(snapshot.path)
        if not (src / SNAP_DISK).is_file():
            raise VmmError(f"snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}' has no disk")
        manifest = self._image(snapshot.spec.image)
        saved = json.loads((src / SNAP_CONFIG).read_text())
        accel = str(saved.get("accel") or await self.accel(manifest))
        workdir = Path(vm.workdir)
        await _copy(src / SNAP_DISK, workdir / DISK)
        if snapshot.vm_status is VmStatus.CREATED:
            return self._handle(await self._spawn(vm, manifest, accel))
        q = await self._spawn(vm, manifest, accel, incoming=True)
        try:
            await self._pass_fd(q, src / SNAP_MEMORY, "restore", os.O_RDONLY)
            await self._qmp(q, "migrate-incoming", {"uri": "fd:restore"})
            await self._wait_status(q, {"paused", "prelaunch", "postmigrate"}, self.settings.migrate_timeout)
            if snapshot.vm_status is VmStatus.RUNNING:
                await self._qmp(q, "cont")
                await self._wait_status(q, {"running"}, self.settings.qmp_timeout)
        except BaseException:
            await self._kill(vm.vm_id, workdir)
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
        if q is None:
            return False
        if q.child is not None and q.child.returncode is not None:
            return False
        try:
            await self._qmp(q, "query-status", timeout=5)
        except VmError:
            return False
        return True

    async def adopt(self, vm: VmRecord) -> bool:
        workdir = Path(vm.workdir)
        pid = _read_pid(workdir)
        if not pid or not _is_qemu_of(pid, workdir):
            return False
        dirfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        q = _Vm(vm.vm_id, workdir, QMPClient(f"vm-{vm.vm_id[:32]}"), dirfd, pid=pid)
        self._vms[vm.vm_id] = q
        try:
            await self._connect(q, time.monotonic() + 5)
            await self._qmp(q, "query-status", timeout=5)
        except VmError:
            self._forget(vm.vm_id)
            return False
        self._watch(q)
        if vm.status is VmStatus.RUNNING:
            # an operator killed between a snapshot's pause and its resume leaves the guest paused:
            # bring it back to the status the store recorded
            with contextlib.suppress(VmError):
                if (await self._qmp(q, "query-status"))["status"] in ("paused", "postmigrate"):
                    await self._qmp(q, "cont")
        log.info("re-adopted qemu pid %d for vm %r", pid, vm.vm_id, extra={"vm_id": vm.vm_id})
        return True

    async def console(self, vm: VmRecord, tail_bytes: int) -> str:
        q = self._vms.get(vm.vm_id)
        if q is not None:
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError, ExecuteError):
                await self._pump(q)
        return tail(Path(vm.workdir) / CONSOLE_LOG, tail_bytes) if tail_bytes else ""

    async def close(self, *, stop_vms: bool) -> None:
        for vm_id, q in list(self._vms.items()):
            if stop_vms:
                await self._kill(vm_id, q.workdir)
            else:  # leave the VM running for re-adoption; just let go of it
                q.stopping = True
                with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                    await asyncio.wait_for(q.qmp.disconnect(), 3)
                self._forget(vm_id)


def _probe_spec() -> VmSpec:
    return VmSpec(vcpus=1, mem_mib=256)


def _read_pid(workdir: Path) -> int | None:
    try:
        return int((workdir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_qemu_of(pid: int, workdir: Path) -> bool:
    """Only ever kill a pid that is a live QEMU running in this VM's folder."""
    if not pid_alive(pid):
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return cwd == str(workdir.resolve()) and "qemu" in Path(exe).name


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


