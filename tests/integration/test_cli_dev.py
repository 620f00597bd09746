"""`microvm-blueprint dev` and the customer CLI, as a user runs them: `dev` in one process (its own
anvil, the dev contract, an operator with the in-memory provider), then `jobs submit` and `vms` in
others, configured only by the `dev.json` that `dev` records."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.devnet import free_port

from ..waiting import until

pytestmark = pytest.mark.chain

CLI = [sys.executable, "-m", "microvm_blueprint.cli"]


async def cli(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *argv], capture_output=True, text=True, timeout=120, check=False, env=env, cwd=cwd
    )


async def test_dev_then_the_customer_cli(tmp_path: Path) -> None:
    env = {**os.environ, "MICROVM_DEV_DIR": str(tmp_path / "devnet")}
    for name in ("HTTP_RPC_URL", "TANGLE_CONTRACT", "SERVICE_ID", "CUSTOMER_KEY", "MICROVM_API_URL"):
        env.pop(name, None)
    rpc_port, api_port = free_port(), free_port()
    child = await Child.spawn(
        [*CLI, "dev", "--provider", "in-memory", "--rpc-port", str(rpc_port), "--api-addr", f"127.0.0.1:{api_port}"],
        tmp_path / "dev.log", env=env, cwd=tmp_path,
    )
    try:
        def banner_done() -> bool:
            assert child.returncode is None, child.log_tail()
            return "dev: Ctrl-C stops everything." in child.log_tail(100_000)

        await until(banner_done, 90, "dev's banner")
        recorded = json.loads((tmp_path / "devnet" / "dev.json").read_text())
        banner = child.log_tail(100_000)
        assert f"127.0.0.1:{rpc_port}" in recorded["rpc_url"] and recorded["api_url"] == f"http://127.0.0.1:{api_port}"
        assert f"(Tangle dev contract {recorded['contract']}, service {recorded['service_id']})" in banner

        submitted = await cli("jobs", "submit", "create_vm", "vm-1", "--timeout", "60", env=env, cwd=tmp_path)
        assert submitted.returncode == 0, (submitted.stdout, submitted.stderr, child.log_tail())
        assert "submitted create_vm as call 0" in submitted.stdout and "result: true" in submitted.stdout

        listed = await cli("vms", "list", "--json", env=env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert [vm["vm_id"] for vm in json.loads(listed.stdout)] == ["vm-1"]

        refused = await cli("jobs", "submit", "start_vm", "no-such-vm", "--timeout", "60", env=env, cwd=tmp_path)
        assert refused.returncode == 1 and refused.stderr.startswith("error: call 1 failed:"), refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        code = await child.stop(grace=30)
    assert code == 0, child.log_tail()
