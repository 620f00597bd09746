"""`microvm-blueprint dev` and the customer CLI, as a user runs them: `dev` in one process (its own
anvil, the dev contract, an operator with the in-memory provider), then `jobs submit` and `vms` in
others, configured only by the `dev.json` that `dev` records."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ..dev_process import CLI, dev_env, start_dev

pytestmark = pytest.mark.chain



async def cli(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *argv], capture_output=True, text=True, timeout=120, check=False, env=env, cwd=cwd
    )


async def test_dev_then_the_customer_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"  # no ~/.ssh/id_*.pub: dev makes a key of its own
    home.mkdir()
    env = dev_env(tmp_path, home)
    child, rpc_port, api_port = await start_dev(tmp_path, env)
    try:
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

        # the banner's SSH lines, run as printed (the in-memory provider records the ports; a fake ssh)
        await ssh_as_the_banner_says(banner, tmp_path, env)
    finally:
        code = await child.stop(grace=30)
    assert code == 0, child.log_tail()


def _printed(banner: str, marker: str) -> list[str]:
    """The argv of the banner's command line that contains ``marker``, without its comment."""
    [line] = [ln for ln in banner.splitlines() if marker in ln]
    command = line.split(".venv/bin/microvm-blueprint", 1)[1].split("  #", 1)[0]
    return shlex.split(command)


async def ssh_as_the_banner_says(banner: str, tmp_path: Path, env: dict[str, str]) -> None:
    key = "devnet/ssh/id_ed25519"  # as the user would type it in the working directory
    assert f"dev: made an SSH key for your VMs: {key} (no ~/.ssh/id_*.pub found)" in banner, banner
    assert (tmp_path / f"{key}.pub").read_text().startswith("ssh-ed25519 ")
    create = _printed(banner, "create_vm_with_config")
    assert create[:3] == ["jobs", "submit", "create_vm_with_config"] and create[-4:] == [
        "--ssh-key", f"{key}.pub", "--port", "22"], create
    made = await cli(*create, "--timeout", "60", env=env, cwd=tmp_path)
    assert made.returncode == 0 and "result: true" in made.stdout, (made.stdout, made.stderr)
    started = await cli(*_printed(banner, "jobs submit start_vm ssh-1"), "--timeout", "60", env=env, cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    shown = await cli("vms", "get", "ssh-1", env=env, cwd=tmp_path)
    vm = json.loads(shown.stdout)
    assert vm["status"] == "running" and vm["spec"]["ssh_keys"] == 1 and vm["spec"]["image"] == "debian"
    [port] = vm["network"]["ports"]
    assert port["guest_port"] == 22 and port["host"] == "127.0.0.1"
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    ssh_env = {**env, "PATH": f"{fake.parent}{os.pathsep}{env.get('PATH', '')}"}
    ran = await cli(*_printed(banner, "vms ssh --identity"), env=ssh_env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    argv = json.loads(ran.stdout)
    assert argv[:2] == ["-p", str(port["host_port"])] and argv[-4:] == ["-i", key, "--", "root@127.0.0.1"], argv
