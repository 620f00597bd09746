"""One VM's QEMU: its process (our child, or a pid re-adopted after an operator restart), the QMP
client that talks to it, its console file and the tasks that watch it.

Every QMP call goes through :meth:`QemuProcess.execute`, and every failure of the QMP client becomes
a runtime error through :func:`map_qmp_error` (``raise ... from exc``): the driver raises nothing but
:class:`~microvm_blueprint.runtime.errors.VmError`, as its protocol promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError, StateError
from qemu.qmp.error import ProtocolError

from ....procs import Child, kill_pid, pid_alive, read_pid, runs_in, tail, wait_pid_exit
from ... import images
from ...confine import CgroupLimits
from ...errors import VmError, VmmApiError, VmmError, VmmTimeout
from . import console
from .argv import CONSOLE_LOG, PID_FILE, QEMU_LOG, QMP_SOCK, QemuSettings

log = logging.getLogger(__name__)

CONSOLE_CHECK_EVERY = 1.0
"""Seconds between two checks of the console file's size against its cap (one ``stat``)."""


def map_qmp_error(exc: BaseException, cmd: str, *, timeout: float | None = None, exit_code: int | None = None,
                  log_tail: str = "") -> VmmError:
    """Translate a failure of one QMP call into the runtime error tree.

    QEMU refusing the command (``ExecuteError``) is :class:`VmmApiError`; no answer in time is
    :class:`VmmTimeout`; a reply that breaks the protocol is :class:`VmmApiError`; everything else
    (socket gone, connection reset or refused, EOF, a session not connected, the command cut off by a
    disconnect) is :class:`VmmError` with QEMU's exit code and log tail."""
    name = type(exc).__name__
    if isinstance(exc, ExecuteError):
        return VmmApiError(f"qemu refused {cmd}: {exc}", body=str(exc)[:1000], log_tail=log_tail)
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:.0f}s" if timeout is not None else ""
        return VmmTimeout(f"qemu did not answer {cmd}{within}", log_tail=log_tail)
    if isinstance(exc, ProtocolError):
        return VmmApiError(f"qemu answered {cmd} with a malformed QMP reply ({name}: {exc})"[:300], log_tail=log_tail)
    if isinstance(exc, ConnectError):
        return VmmError(f"cannot connect to qemu's QMP socket for {cmd} ({exc})"[:300],
                        exit_code=exit_code, log_tail=log_tail)
    if isinstance(exc, StateError | ExecInterruptedError | EOFError | OSError | QMPError):
        return VmmError(f"lost the QMP connection to qemu during {cmd}: {name}",
                        exit_code=exit_code, log_tail=log_tail)
    return VmmError(f"QMP call {cmd} failed ({name}: {exc})"[:300], exit_code=exit_code, log_tail=log_tail)


ExitCallback = Callable[[str], None]
"""Called with a reason when the QEMU process exits without having been asked to."""
ErrorCallback = Callable[[str], None]
"""Called with a description when QEMU reports a disk error of the guest (``BLOCK_IO_ERROR``)."""


class QemuProcess:
    """One VM's QEMU process with its QMP session; owned by the driver, one per live VM."""

    def __init__(self, vm_id: str, workdir: Path, settings: QemuSettings, dirfd: int, *,
                 child: Child | None = None, pid: int | None = None) -> None:
        self.vm_id = vm_id
        self.workdir = workdir
        self.settings = settings
        self.dirfd = dirfd
        """The VM folder, held open: the QMP socket is reached as ``/proc/self/fd/<dirfd>/qmp.sock``,
        which stays under the 108-byte limit of a Unix socket path however deep the folder is."""
        self.child = child
        self.pid = child.pid if child is not None else pid
        self.qmp = QMPClient(f"vm-{vm_id[:32]}")
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._disk_armed = True
        self._disk_listener: EventListener | None = None

    # ---- birth ---------------------------------------------------------------------------------

    @classmethod
    async def spawn(cls, vm_id: str, workdir: Path, argv: list[str], settings: QemuSettings,
                    limits: CgroupLimits | None = None, *, creds: dict[str, Any] | None = None) -> QemuProcess:
        """Start QEMU from ``argv`` in ``workdir`` (as the VMM user, umask 077, see ``confine.py``), put
        it in its cgroup with ``limits`` before it can run the guest (``-S``: it waits for QMP), and
        connect to its QMP socket; on failure nothing is left running."""
        dirfd = _open_dir(workdir)
        confine = settings.confine
        try:
            if creds is None:
                creds = confine.spawn_kwargs() if confine is not None else {"umask": 0o077}
            child = await Child.spawn(argv, workdir / QEMU_LOG, cwd=workdir, creds=creds)
        except OSError as exc:
            os.close(dirfd)
            raise VmmError(f"cannot start qemu: {exc}") from exc
        proc = cls(vm_id, workdir, settings, dirfd, child=child)
        try:
            _write_pid(workdir / PID_FILE, child.pid)
            if confine is not None and limits is not None:
                confine.enter(workdir.name, child.pid, limits)
            await proc.connect(time.monotonic() + settings.qmp_timeout)
        except BaseException:
            await asyncio.shield(proc.kill())
            raise
        return proc

    @classmethod
    async def adopt(cls, vm_id: str, workdir: Path, settings: QemuSettings) -> QemuProcess | None:
        """Re-attach to the QEMU an earlier operator started in ``workdir``; None if it is gone."""
        pid = read_pid(workdir / PID_FILE)
        if not pid or not runs_in(pid, workdir, "qemu"):
            return None
        try:
            proc = cls(vm_id, workdir, settings, _open_dir(workdir), pid=pid)
        except VmmError:
            return None
        try:
            await proc.connect(time.monotonic() + 5)
            await proc.execute("query-status", timeout=5)
        except VmError:
            await proc.release()
            return None
        return proc

    async def connect(self, deadline: float) -> None:
        """Open the QMP session, retrying until QEMU listens or ``deadline`` (monotonic) passes."""
        path = f"/proc/self/fd/{self.dirfd}/{QMP_SOCK}"
        while True:
            if self.exited:
                raise VmmError("qemu exited during start-up", exit_code=self.exit_code, log_tail=self.log_tail())
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                await asyncio.wait_for(self.qmp.connect(sock), self.settings.qmp_timeout)
                return
            except (OSError, QMPError, EOFError, TimeoutError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise VmmTimeout("qemu's QMP socket did not answer in time", log_tail=self.log_tail()) from exc
                await asyncio.sleep(0.02)

    def watch(self, on_exit: ExitCallback, on_error: ErrorCallback | None = None) -> None:
        """Start watching the process (``on_exit`` when it dies unasked, ``on_error`` at its guest's first
        disk error since the watch was armed: :meth:`rearm_disk_watch`) and keeping its console capped."""
        self._tasks.append(asyncio.create_task(self._watch_exit(on_exit), name=f"qemu-watch:{self.vm_id[:32]}"))
        if on_error is not None:
            self._tasks.append(asyncio.create_task(self._watch_disk(on_error), name=f"qemu-disk:{self.vm_id[:32]}"))
        self._tasks.append(asyncio.create_task(self._keep_console(), name=f"qemu-console:{self.vm_id[:32]}"))

    # ---- state ---------------------------------------------------------------------------------

    @property
    def exit_code(self) -> int | None:
        return self.child.returncode if self.child is not None else None

    @property
    def exited(self) -> bool:
        if self.child is not None:
            return self.child.returncode is not None
        return not pid_alive(self.pid)

    def log_tail(self, limit: int = 2000) -> str:
        return tail(self.workdir / QEMU_LOG, limit)

    def console_tail(self, limit: int = 2000) -> str:
        return console.tail(self.workdir / CONSOLE_LOG, limit)

    # ---- QMP -----------------------------------------------------------------------------------

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """One QMP command with a deadline; every failure is mapped by :func:`map_qmp_error`."""
        limit = timeout or self.settings.qmp_timeout
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), limit)
        except Exception as exc:  # whatever the QMP client raises: the driver promises VmError only
            raise map_qmp_error(exc, cmd, timeout=limit, exit_code=self.exit_code, log_tail=self.log_tail()) from exc

    async def status(self, *, timeout: float | None = None) -> str:
        """QEMU's run state (``running``, ``paused``, ``prelaunch``, ``postmigrate``, ...)."""
        answer = await self.execute("query-status", timeout=timeout)
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, str):
            raise VmmApiError(f"qemu answered query-status without a status: {answer!r}"[:300])
        return status

    async def wait_status(self, want: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status()
            if status in want:
                return status
            if time.monotonic() > deadline:
                raise VmmTimeout(f"qemu stayed in state {status!r} (wanted {sorted(want)})", log_tail=self.log_tail())
            await asyncio.sleep(0.02)

    async def wait_migration(self, what: str) -> None:
        deadline = time.monotonic() + self.settings.migrate_timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VmmError(f"{what} failed: {info.get('error-desc', status)}", log_tail=self.log_tail())
            if time.monotonic() > deadline:
                raise VmmTimeout(f"{what} did not finish within {self.settings.migrate_timeout:.0f}s")
            await asyncio.sleep(0.02)

    async def abandon_migration(self) -> bool:
        """Cancel a migration still running in a re-adopted QEMU (its operator was killed while saving a
        snapshot, which reconciliation undoes) and wait, with a deadline, until QEMU says it ended; until
        then QEMU refuses every new ``migrate`` ("There's a migration process in progress"). True if one
        was running."""
        info = await self.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status in (None, "none", "completed", "failed", "cancelled"):
            return False
        if status != "cancelling":
            await self.execute("migrate_cancel")
        deadline = time.monotonic() + self.settings.qmp_timeout
        while status not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise VmmTimeout(f"a migration left by an earlier operator did not end after migrate_cancel "
                                 f"(still {status!r} after {self.settings.qmp_timeout:.0f}s)", log_tail=self.log_tail())
            await asyncio.sleep(0.02)
            info = await self.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
        return True

    async def pass_fd(self, path: Path, name: str, flags: int) -> None:
        """Open ``path`` here and hand the descriptor to QEMU as ``name`` (``getfd``)."""
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise VmmError(f"cannot open {path.name}: {exc.strerror or exc}") from exc
        try:
            try:
                self.qmp.send_fd_scm(fd)
            except Exception as exc:  # the QMP session is not connected, or its socket broke
                raise map_qmp_error(exc, "getfd", exit_code=self.exit_code, log_tail=self.log_tail()) from exc
            await self.execute("getfd", {"fdname": name})
        finally:
            os.close(fd)

    # ---- console -------------------------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the guest's ready line is in its console (read from the start of the file: the
        line may have been printed while no operator was running)."""
        ready = images.READY_LINE
        reader = console.ConsoleReader(self.workdir / CONSOLE_LOG)
        carry = ""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = carry + reader.read()
            except OSError as exc:
                raise VmmError(f"cannot read the guest console: {exc.strerror or exc}") from exc
            if ready in text:
                return
            carry = text[-len(ready):]
            if self.exited:
                raise VmmError("qemu exited while booting", exit_code=self.exit_code,
                               log_tail=self.console_tail() + self.log_tail())
            if time.monotonic() > deadline:
                raise VmmTimeout(f"guest did not print its ready line within {timeout:.0f}s",
                                 log_tail=self.console_tail())
            await asyncio.sleep(0.05)

    async def _keep_console(self) -> None:
        path = self.workdir / CONSOLE_LOG
        warned = False
        while not self.stopping:
            try:
                console.trim(path, self.settings.console_log_bytes)
            except OSError as exc:
                if not warned:
                    log.warning("cannot keep the console of vm %r capped: %s", self.vm_id, exc,
                                extra={"vm_id": self.vm_id})
                    warned = True
            await asyncio.sleep(CONSOLE_CHECK_EVERY)

    def rearm_disk_watch(self) -> None:
        """Report the next ``BLOCK_IO_ERROR`` again, dropping those already queued. Called before every
        ``cont`` of a start: an error after it is news (the lifecycle may have cleared the last one), one
        queued from before the pause is not."""
        self._disk_armed = True
        if self._disk_listener is not None:
            self._disk_listener.clear()

    async def _watch_disk(self, on_error: ErrorCallback) -> None:
        """Report the first ``BLOCK_IO_ERROR`` since the watch was (re-)armed (a full disk repeats it for every
        write: the rest are drained and dropped until :meth:`rearm_disk_watch`)."""
        listener = EventListener(("BLOCK_IO_ERROR",))
        self._disk_listener = listener
        self.qmp.register_listener(listener)
        try:
            async for event in listener:
                if not self._disk_armed:
                    continue
                self._disk_armed = False
                raw = event.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                what = "disk full" if data.get("nospace") else str(data.get("reason") or "i/o error")
                on_error(f"guest disk error: {data.get('operation', 'i/o')} on {data.get('device') or 'disk'} "
                         f"failed ({what}); the guest saw an I/O error")
        finally:
            self._disk_listener = None
            self.qmp.remove_listener(listener)

    # ---- death ---------------------------------------------------------------------------------

    async def _watch_exit(self, on_exit: ExitCallback) -> None:
        if self.child is not None:
            code: int | None = await self.child.proc.wait()
        else:
            await wait_pid_exit(self.pid)
            code = None
        if not self.stopping:
            reason = f"qemu exited unexpectedly (exit code {code})"
            last = self.log_tail().strip()
            if last:
                reason += f": {last[-500:]}"
            on_exit(reason)

    async def _let_go(self) -> None:
        """Stop the watching tasks, close the QMP session and the folder descriptor."""
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(Exception):  # whatever ended the session is what disconnect re-raises
            await asyncio.wait_for(self.qmp.disconnect(), 3)
        if self.dirfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.dirfd)
            self.dirfd = -1

    async def release(self) -> None:
        """Let go of a QEMU that keeps running (operator shutdown; re-adopted by the next one)."""
        await self._let_go()

    async def kill(self) -> int | None:
        """Stop QEMU for good: close QMP, SIGTERM (QEMU's own orderly shutdown), then SIGKILL; reaped.
        (A QMP ``quit`` would leave qemu.qmp with an EOF it reports as an unretrieved error; SIGTERM
        is just as orderly for QEMU.) Returns the exit code of a child, None for a re-adopted pid."""
        await self._let_go()
        if self.child is not None:
            return await self.child.stop(polite=signal.SIGTERM, grace=self.settings.stop_timeout, term_grace=1)
        if self.pid and runs_in(self.pid, self.workdir, "qemu"):
            await kill_pid(self.pid, grace=self.settings.stop_timeout)
        return None


async def kill_left_over(workdir: Path, settings: QemuSettings) -> None:
    """Stop the QEMU an earlier operator left in ``workdir`` (found by its pid file), if any."""
    pid = read_pid(workdir / PID_FILE)
    if pid and runs_in(pid, workdir, "qemu"):
        await kill_pid(pid, grace=settings.stop_timeout)


def _write_pid(path: Path, pid: int) -> None:
    """The pid file a later operator re-adopts QEMU by (written whole, then renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise VmmError(f"cannot write {path.name}: {exc.strerror or exc}") from exc


def _open_dir(workdir: Path) -> int:
    try:
        return os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise VmmError(f"cannot open the vm folder: {exc.strerror or exc}") from exc
