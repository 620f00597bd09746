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
    ) -> Child:
        if isinstance(argv, str):  # pragma: no cover - a programming error, never a shell string
            raise TypeError("argv must be a list, not a shell string")
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=str(cwd) if cwd else None,
                start_new_session=new_session,
                pass_fds=tuple(pass_fds),
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


async def kill_pid(pid: int, *, grace: float = 3.0) -> None:
    """Stop a process that is not our child (re-adopted): SIGTERM, wait, SIGKILL."""
    for sig, wait_for in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = asyncio.get_running_loop().time() + wait_for
        while pid_alive(pid):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return
