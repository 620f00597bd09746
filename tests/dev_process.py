"""Start ``microvm-blueprint dev`` (in-memory provider) as its own process for a test, and wait for its
banner: the way a person runs it, on free ports, with its own dev dir and no chain settings inherited."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.devnet import free_port

from .waiting import until

CLI = [sys.executable, "-m", "microvm_blueprint.cli"]
BANNER_END = "dev: Ctrl-C stops everything."
#: settings a test's environment must not hand down to dev or the customer CLI
INHERITED = ("HTTP_RPC_URL", "TANGLE_CONTRACT", "SERVICE_ID", "CUSTOMER_KEY", "MICROVM_API_URL",
             "STATUS_REGISTRY_CONTRACT", "HEARTBEAT_INTERVAL_SECS")


def dev_env(tmp_path: Path, home: Path | None = None) -> dict[str, str]:
    """The environment of ``dev`` and of the CLI commands that read what it recorded (``MICROVM_DEV_DIR``)."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env["MICROVM_DEV_DIR"] = str(tmp_path / "devnet")
    if home is not None:
        env["HOME"] = str(home)
    return env


async def start_dev(tmp_path: Path, env: dict[str, str], *, timeout: float = 90) -> tuple[Child, int, int]:
    """Spawn ``dev`` on free ports and wait (with a deadline) for the end of its banner; returns the
    process (the caller stops it) and its chain and API ports."""
    rpc_port, api_port = free_port(), free_port()
    child = await Child.spawn(
        [*CLI, "dev", "--provider", "in-memory", "--rpc-port", str(rpc_port), "--api-addr", f"127.0.0.1:{api_port}"],
        tmp_path / "dev.log", env=env, cwd=tmp_path,
    )

    def banner_done() -> bool:
        assert child.returncode is None, child.log_tail()
        return BANNER_END in child.log_tail(100_000)

    try:
        await until(banner_done, timeout, "dev's banner")
    except BaseException:
        await child.stop(grace=15)
        raise
    return child, rpc_port, api_port
