"""`microvm-blueprint vms ssh`: the `ssh` command line it execs, read from a real query API (uvicorn on
loopback, in-memory provider with user-mode networking, real SQLite). `ssh` here is a script on PATH that
prints its argv: this is about the argv we build (sshtests runs the real ssh against real guests)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvm_blueprint import cli
from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import NetworkMode, NetworkSettings, Origin, VmSpec
from microvm_blueprint.runtime.store import Store

FAKE_SSH = """#!{python}
import json, os, sys
with open(os.environ["FAKE_SSH_LOG"], "a") as f:
    f.write(json.dumps(sys.argv) + "\\n")
print("fake ssh ran")
sys.exit(7)
"""


@dataclass
class Setup:
    life: Lifecycle
    url: str
    tmp: Path
    log: Path
    env: dict[str, str]

    def ssh(self, *argv: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if path is not None:
            env["PATH"] = path
        return subprocess.run([sys.executable, "-m", "microvm_blueprint.cli", "vms", "ssh", *argv],
                              capture_output=True, text=True, timeout=60, check=False, env=env, cwd=self.tmp)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    network = NetworkSettings(mode=NetworkMode.USER, publish_addr="127.0.0.1", port_range=(41000, 41999))
    life = Lifecycle(InMemoryDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state", network=network)
    server = QueryServer(QueryApp(life, None), "127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ssh"
    fake.write_text(FAKE_SSH.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "ssh-calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SSH_LOG": str(log),
           "MICROVM_API_URL": server.url, "MICROVM_DEV_DIR": str(tmp_path / "no-devnet")}
    yield Setup(life, server.url, tmp_path, log, env)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _running(life: Lifecycle, vm_id: str, ports: tuple[int, ...]) -> int:
    """Create and start a VM publishing ``ports``; its host port for guest port 22 (0 if none)."""
    await life.create_vm(vm_id, VmSpec(ports=ports), Origin())
    view = await life.start_vm(vm_id, Origin())
    return next((p.host_port for p in view.network.ports if p.guest_port == 22), 0)


async def test_ssh_execs_ssh_as_root_at_the_published_port(setup: Setup) -> None:
    port = await _running(setup.life, "vm-1", (22, 8080))
    assert 41000 <= port <= 41999
    done = await asyncio.to_thread(setup.ssh, "vm-1", "--", "uname", "-a", "--", "x")
    # the fake's own exit code and output: the CLI exec'd it (no wrapper process in between)
    assert (done.returncode, done.stdout, done.stderr) == (7, "fake ssh ran\n", "")
    [argv] = setup.calls()
    assert Path(argv[0]).name == "ssh"
    assert argv[1:5] == ["-p", str(port), "-o", "StrictHostKeyChecking=accept-new"]
    assert argv[5] == "-o" and argv[6].startswith("HostKeyAlias=microvm-")
    assert argv[7:] == ["--", "root@127.0.0.1", "uname", "-a", "--", "x"]


async def test_identity_and_no_command(setup: Setup) -> None:
    port = await _running(setup.life, "vm-1", (22,))
    await _running(setup.life, "vm-2", (22,))
    key = setup.tmp / "id_test"
    key.write_text("not really a key: the fake ssh does not read it\n")
    first = await asyncio.to_thread(setup.ssh, "--identity", str(key), "vm-1")
    second = await asyncio.to_thread(setup.ssh, "vm-2")
    assert (first.returncode, second.returncode) == (7, 7), (first.stderr, second.stderr)
    one, two = setup.calls()
    assert one[1:5] == ["-p", str(port), "-o", "StrictHostKeyChecking=accept-new"]
    assert one[7:] == ["-i", str(key), "--", "root@127.0.0.1"]
    # each VM is its own known host (host ports are reused after destroy; host keys are per VM)
    assert one[6] != two[6] and two[6].startswith("HostKeyAlias=microvm-")


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        ("created", "error: vm 'vm-x' is created, not running: start it first (jobs submit start_vm vm-x)"),
        ("stopped", "error: vm 'vm-x' is stopped, not running: start it first (jobs submit start_vm vm-x)"),
        ("no-22", "error: vm 'vm-x' has no published guest port 22 (network user, published ports: 8080); "
                  "create it with create_vm_with_config ... --port 22"),
        ("none", "error: vm 'vm-x' has no published guest port 22 (network user, published ports: none); "
                 "create it with create_vm_with_config ... --port 22"),
        ("missing", "error: 404: vm 'vm-x' not found"),
    ],
)
async def test_clear_errors_and_ssh_never_runs(setup: Setup, prepare: str, message: str) -> None:
    if prepare in ("created", "stopped"):
        await setup.life.create_vm("vm-x", VmSpec(ports=(22,)), Origin())
        if prepare == "stopped":
            await setup.life.start_vm("vm-x", Origin())
            await setup.life.stop_vm("vm-x", Origin())
    elif prepare == "no-22":
        await _running(setup.life, "vm-x", (8080,))
    elif prepare == "none":
        await _running(setup.life, "vm-x", ())
    done = await asyncio.to_thread(setup.ssh, "vm-x", "--", "true")
    assert (done.returncode, done.stdout, done.stderr.strip()) == (1, "", message)
    assert setup.calls() == []


async def test_missing_identity_and_missing_ssh(setup: Setup) -> None:
    await _running(setup.life, "vm-1", (22,))
    done = await asyncio.to_thread(setup.ssh, "-i", str(setup.tmp / "nope"), "vm-1")
    assert (done.returncode, done.stderr.strip()) == (1, f"error: --identity {setup.tmp / 'nope'}: no such file")
    empty = setup.tmp / "empty-bin"
    empty.mkdir()
    done = await asyncio.to_thread(setup.ssh, "vm-1", path=str(empty))
    assert (done.returncode, done.stderr.strip()) == (1, "error: ssh not found on PATH: install openssh-client")
    assert setup.calls() == []


def test_an_unspecified_publish_address_is_reached_at_the_query_apis_host() -> None:
    view = {"vm_id": "v", "status": "running", "created_at": 1.0,
            "network": {"mode": "user", "guest_ip": "10.0.2.15",
                        "ports": [{"guest_port": 22, "host": "0.0.0.0", "host_port": 40022}]}}
    argv = cli.ssh_argv(view, "http://operator.example:3000", identity=None, command=[])
    assert argv[-2:] == ["--", "root@operator.example"] and argv[1:3] == ["-p", "40022"]
    view["network"]["ports"][0]["host"] = "::"  # type: ignore[index]
    assert cli.ssh_argv(view, "http://[::1]:3000", identity=None, command=["id"])[-2:] == ["root@::1", "id"]
