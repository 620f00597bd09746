"""Kill -9 of a real operator process in ``MICROVM_NETWORK=bridge`` mode, on a "host" the test builds
(issue #15, Tests: "kill -9 the operator, restart: VMs re-adopted with working networking; after destroy,
`ip netns list` and `nft list ruleset` show nothing of the VM").

The host is a network namespace of the test's own (``mvmtest-host-<pid>``, only ``lo`` up): anvil with
the dev contract and the operator (`microvm-blueprint run`, QEMU provider, bridge networking, ports
published on 127.0.0.1) run inside it under ``ip netns exec``, so the VM's veth pair, its host-side nft
table and its published ports are all the namespace's, never the machine's. Every client runs there
too: the test's body runs on an event loop in a thread that joined the namespace (``setns``), so its
JSON-RPC, HTTP, ``ssh`` subprocesses and socket probes all start inside it.

The flow is test_guest_crash.py's: job 8 (`debian`, the test's key, port 22) and `start_vm` through the
chain, SSH on the published port; SIGKILL the operator; a new one on the same DATA_DIR re-adopts the VM
(`running`, the same ports, the same guest, SSH with the same key); `destroy_vm` through the chain, then
the port refuses and neither `ip netns list` nor the host's `nft list ruleset` shows anything of the VM.
Finalizers kill operators, anvil and QEMU, and delete the host namespace and the VM's namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from microvm_blueprint.runtime import netns
from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle

from ..qemu_support import qemu_pids
from .conftest import _anvil_or_skip, api_get
from .test_guest_access import _debian_image, _keygen, ssh_ok, wait_ssh
from .test_guest_crash import BOOT_ID, PORT_RANGE, crash_run

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.chain]

POOL = "10.203.0.0/16"
VM = "web-br"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (it builds network namespaces)"
    missing = netns.host_problems()
    return "bridge networking needs " + "; ".join(missing) if missing else None


def sh(argv: list[str]) -> str:
    """One argv, its output; a failure fails the test."""
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


#: runs an argv in the namespace of this process's main thread, the machine's own (the thread running the
#: scenario is in the host namespace, and so is whatever it starts)
OUTSIDE = ["nsenter", f"--net=/proc/{os.getpid()}/ns/net"]


class HostNamespace:
    """The test's "host": a network namespace, and an event loop on a thread that joined it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = ["ip", "netns", "exec", name]
        self.loop = asyncio.new_event_loop()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, name=f"netns-{name}", daemon=True)

    def __enter__(self) -> HostNamespace:
        sh(["ip", "netns", "add", self.name])
        try:
            sh(["ip", "-n", self.name, "link", "set", "lo", "up"])
            self._thread.start()
            self._ready.result(timeout=10)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _serve(self) -> None:
        try:
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                joined = os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(fd).st_ino
            finally:
                os.close(fd)
            assert joined, "the thread is not in the host namespace"
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set_result, None)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` on the namespace's loop (its sockets and subprocesses start inside it)."""

        async def wrapped() -> T:
            return await fn()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wrapped(), self.loop))

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False, timeout=30)


class AnvilIn(Anvil):
    """anvil started inside a namespace (it listens on that namespace's 127.0.0.1)."""

    def __init__(self, prefix: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prefix = prefix

    def argv(self) -> list[str]:
        return [*self.prefix, *super().argv()]


@pytest.fixture
def host() -> Any:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"mvmtest-host-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=30)  # a stale one
    with HostNamespace(name) as h:
        yield h
    # the VM's namespace, whatever happened (its file may be all that is left of it out here)
    subprocess.run(["ip", "netns", "del", netns.ns_name(VM)], capture_output=True, check=False, timeout=30)
    assert name not in sh(["ip", "netns", "list"])


async def test_kill9_of_a_bridge_mode_operator_in_its_own_host_namespace(tmp_path: Path, host: HostNamespace) -> None:
    image_dir = _debian_image()
    _anvil_or_skip()
    key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
    await host.run(lambda: _scenario(tmp_path, host, image_dir, key))


async def _scenario(tmp_path: Path, host: HostNamespace, image_dir: Path, key: Path) -> None:
    pub = key.with_suffix(".pub").read_text().strip()
    vm_ns = netns.ns_name(VM)
    network_env = {"MICROVM_NETWORK": "bridge", "MICROVM_BRIDGE_POOL": POOL, "MICROVM_PUBLISH_ADDR": "127.0.0.1"}
    async with AnvilIn(host.prefix, log_dir=tmp_path) as chain:
        d = await deploy_dev_tangle(chain.rpc_url)
        async with crash_run(tmp_path, d, image_dir, key, network_env, host.prefix) as run:
            api = run.api
            first = await run.operator(0)

            # ---- job 8 + start_vm through the chain; SSH in on the published port, inside the host ----
            await run.job("create_vm_with_config", [VM, "1", "512", "0", "debian", [pub], ["22"]], timeout=120)
            await run.job("start_vm", [VM], timeout=300)
            status, view = await api_get(f"{api}/vms/{VM}")
            assert status == 200 and view["status"] == "running", view
            network = view["network"]
            assert network["mode"] == "bridge", network
            [port] = network["ports"]
            assert port["guest_port"] == 22 and port["host"] == "127.0.0.1", network
            assert PORT_RANGE[0] <= port["host_port"] <= PORT_RANGE[1], network
            ssh_port = port["host_port"]
            await wait_ssh(key, ssh_port)
            boot_id = (await ssh_ok(key, ssh_port, f"echo before-the-kill > /root/marker; {BOOT_ID}")).strip()
            assert boot_id
            assert "172.16.0.2/30" in await ssh_ok(key, ssh_port, "ip -4 -o addr show eth0")
            vmm = qemu_pids(tmp_path)
            assert len(vmm) == 1, vmm
            # the VM's network is the host namespace's: its veth and its nft table there, not out here
            assert vm_ns in sh(["ip", "netns", "list"])
            assert netns.host_veth(VM) in sh([*host.prefix, "ip", "-o", "link"])
            assert netns.host_table(VM) in sh([*host.prefix, "nft", "list", "tables"])
            assert netns.host_veth(VM) not in sh([*OUTSIDE, "ip", "-o", "link"])
            assert netns.vm_key(VM) not in sh([*OUTSIDE, "nft", "list", "ruleset"])

            # ---- kill -9, a new operator (inside the host, same DATA_DIR) re-adopts it: same ports, SSH ----
            second = await run.kill9_and_readopt(first, VM, network, ssh_port, boot_id, vmm)

            # ---- destroy through the chain: the port refuses, nothing of the VM is left ----------------
            await run.destroy(VM, (ssh_port,))
            key_ = netns.vm_key(VM)
            assert key_ not in sh(["ip", "netns", "list"]), sh(["ip", "netns", "list"])
            assert key_ not in sh([*host.prefix, "nft", "list", "ruleset"])
            assert key_ not in sh([*host.prefix, "ip", "-o", "link"])
            assert key_ not in sh([*OUTSIDE, "nft", "list", "ruleset"])
            await run.finish(second)
