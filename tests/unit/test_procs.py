"""procs: pid files, the pid-reuse guard and waiting on a pidfd for a process that is not our child."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from microvm_blueprint.procs import kill_pid, pid_alive, read_pid, runs_in, wait_pid_exit


def test_read_pid(tmp_path: Path) -> None:
    f = tmp_path / "vmm.pid"
    assert read_pid(f) is None
    f.write_text("1234\n")
    assert read_pid(f) == 1234
    f.write_text("garbage")
    assert read_pid(f) is None
    f.write_text("-5")
    assert read_pid(f) is None


def _orphan(tmp_path: Path, seconds: float) -> int:
    """A process that is not our child (its parent exits at once), running in ``tmp_path``."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import subprocess,sys; p=subprocess.Popen(['sleep', sys.argv[1]], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)",
         str(seconds)],
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=30,
    )
    return int(out.stdout)


async def test_wait_pid_exit_wakes_when_a_foreign_process_exits(tmp_path: Path) -> None:
    pid = _orphan(tmp_path, 60)
    try:
        assert pid_alive(pid)
        assert runs_in(pid, tmp_path) and runs_in(pid, tmp_path, "sleep")
        assert not runs_in(pid, tmp_path, "qemu") and not runs_in(pid, tmp_path / "elsewhere")
        assert not await wait_pid_exit(pid, 0.2)  # still running: the deadline passes
        waiter = asyncio.create_task(wait_pid_exit(pid, 30))
        await asyncio.sleep(0)
        assert not waiter.done()
        os.kill(pid, 15)
        assert await waiter
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)
    assert await wait_pid_exit(pid, 1)  # gone already


async def test_kill_pid_stops_a_foreign_process(tmp_path: Path) -> None:
    pid = _orphan(tmp_path, 60)
    await kill_pid(pid, grace=5)
    assert not pid_alive(pid)
