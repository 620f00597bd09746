"""Child processes done right: argv lists only, output to a log file, deadlines on every wait,
stop = polite signal -> SIGTERM -> SIGKILL, always reaped, exit code and log tail kept.

Shared by the layers (like ``errors.py``); imports nothing from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path


def tail(path: str | Path, limit: int = 4000) -> str:
    """The last ``limit`` bytes of a log file, decoded leniently ('' if missing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Child:
    """An asyncio subprocess whose stdout+stderr go to ``log_path``."""

    def __init__(self, proc: asyncio.subprocess.Process, argv: Sequence[str], log_path: Path) -> None:
        self.proc = proc
        self.argv = list(argv)
        self.log_path = log_path

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        log_path: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        new_session: bool = True,
        pass_fds: Sequence[int] = (),
        creds: Mapping[str, object] | None = None,
    ) -> Child:
        """Start ``argv``. ``creds``: ``user``/``group``/``extra_groups``/``umask`` for the child, as
        ``subprocess`` takes them (the switch happens in the child before exec). The log is 0600."""
        if isinstance(argv, str):  # pragma: no cover - a programming error, never a shell string
            raise TypeError("argv must be a list, not a shell string")
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=str(cwd) if cwd else None,
                start_new_session=new_session,
                pass_fds=tuple(pass_fds),
                **dict(creds or {}),  # type: ignore[arg-type]
            )
        return cls(proc, argv, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log_tail(self, limit: int = 4000) -> str:
        return tail(self.log_path, limit)

    async def wait(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    async def stop(self, *, polite: signal.Signals | None = signal.SIGINT, grace: float = 5.0,
                   term_grace: float = 3.0) -> int:
        """Polite signal, then SIGTERM, then SIGKILL; always reaped. Returns the exit code."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        for sig, wait_for in ((polite, grace), (signal.SIGTERM, term_grace), (signal.SIGKILL, 10.0)):
            if sig is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            code = await self.wait(wait_for)
            if code is not None:
                return code
        return await self.proc.wait()


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def read_pid(pid_file: str | Path) -> int | None:
    """The pid a VMM wrote into ``pid_file`` (``-pidfile``/``--pid-file``); None if absent or garbled."""
    try:
        pid = int(Path(pid_file).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def runs_in(pid: int, workdir: str | Path, exe_name: str | None = None) -> bool:
    """True if ``pid`` is alive with ``workdir`` as its working directory (and, when given, ``exe_name``
    in the name of its executable): the guard against pid reuse before signalling a re-adopted VMM."""
    if not pid_alive(pid):
        return False
    try:
        if os.readlink(f"/proc/{pid}/cwd") != str(Path(workdir).resolve()):
            return False
        if exe_name is None:
            return True
        exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return exe_name in Path(exe).name


async def wait_pid_exit(pid: int | None, timeout: float | None = None) -> bool:
    """Wait for a process that is not our child (a re-adopted VMM) to exit; True once it has, False
    when ``timeout`` passed first. Waits on a pidfd (readable when the process exits, Linux >= 5.3);
    polls every 0.2 s where there is none."""
    if not pid or pid <= 0:
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (OSError, AttributeError):
        return await _poll_exit(pid, timeout)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        if timeout is None:
            await done
        else:
            await asyncio.wait_for(done, timeout)
        return True
    except TimeoutError:
        return not pid_alive(pid)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _poll_exit(pid: int, timeout: float | None) -> bool:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while pid_alive(pid):
        if deadline is not None and loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def kill_pid(pid: int, *, grace: float = 3.0) -> None:
    """Stop a process that is not our child (re-adopted): SIGTERM, wait, SIGKILL."""
    for sig, wait_for in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if await wait_pid_exit(pid, wait_for):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return
