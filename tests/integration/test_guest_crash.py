"""Kill -9 of a real operator process with a networked `debian` VM running (issue #12): the operator
(`microvm-blueprint run`, QEMU provider, user-mode networking) on a real anvil with the dev contract takes
job 8 and `start_vm` from the chain; the customer SSHes in on the published port; the operator is killed
with SIGKILL; a new operator on the same DATA_DIR re-adopts the VM, which keeps its host ports (seen through
the query API) and its guest (the same boot id, SSH with the same key); `destroy_vm` through the chain then
frees the ports (connection refused, no ports in the view).

One `debian` boot under TCG (~10-30 s here); every wait has a deadline. On failure the guest's console
and the operators' logs are kept in the test's folder and printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from microvm_blueprint.blueprint.client import Outcome, TangleCustomer, encode_job_args
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.procs import Child, kill_pid
from microvm_blueprint.tangle.devnet import ANVIL_KEYS, Anvil, DevDeployment, deploy_dev_tangle, free_port
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.keystore import import_key

from ..qemu_support import qemu_pids
from ..waiting import until
from .conftest import _anvil_or_skip, api_get, result_counts
from .test_guest_access import _debian_image, _keygen, refused, ssh_ok, wait_ssh

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.chain]

PORT_RANGE = (44000, 44999)
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


async def _job(customer: TangleCustomer, api_url: str, name: str, args: list[Any], timeout: float) -> Outcome:
    job = JOBS_BY_NAME[name]
    sub = await customer.submit(job, encode_job_args(job, args))
    return await customer.wait_result(sub, timeout=timeout, api_url=api_url)


async def _spawn_operator(env: dict[str, str], log: Path, api_url: str, prefix: Sequence[str] = ()) -> Child:
    """`microvm-blueprint run` as its own process, once its query API answers `/health`; ``prefix``: an
    argv that runs it somewhere else (``ip netns exec <ns>``)."""
    child = await Child.spawn([*prefix, sys.executable, "-m", "microvm_blueprint.cli", "run"], log, env=env)

    async def healthy() -> bool:
        assert child.returncode is None, f"the operator exited ({child.returncode}):\n{child.log_tail()}"
        try:
            return (await api_get(f"{api_url}/health"))[0] == 200
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    await until(healthy, 60, "the operator's /health", every=0.2)
    return child


def _keep_evidence(tmp_path: Path, children: list[Child]) -> None:
    for log in sorted((tmp_path / "data").rglob("console.log")):
        text = log.read_text(errors="replace")[-8000:]
        (tmp_path / f"console-{log.parent.name}.log").write_text(text)
        print(f"--- console of {log.parent.name} ---\n{text}")
    for child in children:
        print(f"--- {child.log_path.name} (exit {child.returncode}) ---\n{child.log_tail(6000)}")


@dataclass
class CrashRun:
    """What a kill -9 scenario (this file's and test_bridge_crash.py's) carries from step to step: the
    operators' env and query API, the customer on the chain, the guest's SSH key, the chain calls made
    (each must get its result once) and the operator processes started (``prefix``: an argv that runs
    them somewhere else, ``ip netns exec <ns>``)."""

    tmp_path: Path
    d: DevDeployment
    env: dict[str, str]
    api: str
    customer: TangleCustomer
    key: Path
    prefix: Sequence[str] = ()
    children: list[Child] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    async def operator(self, n: int) -> Child:
        """Operator number ``n`` (log ``operator-<n>.log``), once its `/health` answers."""
        child = await _spawn_operator(self.env, self.tmp_path / f"operator-{n}.log", self.api, self.prefix)
        self.children.append(child)
        return child

    async def job(self, name: str, args: list[Any], timeout: float) -> Outcome:
        """One job through the chain, which must succeed; its call is remembered for :meth:`finish`."""
        outcome = await _job(self.customer, self.api, name, args, timeout)
        assert outcome.result is True, outcome
        self.calls.append(outcome.call_id)
        return outcome

    async def kill9_and_readopt(self, first: Child, vm: str, network: dict[str, Any], ssh_port: int,
                                boot_id: str, vmm: set[int]) -> Child:
        """SIGKILL ``first``: QEMU outlives it and the guest still answers; a new operator on the same
        DATA_DIR re-adopts the VM (``running``, the same ``network``, the same QEMU, the same guest over
        SSH with the same key: its marker and boot id). Returns the new operator."""
        # ---- kill -9 the operator process: QEMU outlives it, the guest still answers ---------
        os.kill(first.pid, signal.SIGKILL)
        assert await first.wait(30) == -signal.SIGKILL
        assert qemu_pids(self.tmp_path) == vmm
        assert (await ssh_ok(self.key, ssh_port, BOOT_ID)).strip() == boot_id  # no operator running now

        # ---- a new operator on the same DATA_DIR re-adopts it: same ports, same guest, SSH ----
        second = await self.operator(1)
        status, after = await api_get(f"{self.api}/vms/{vm}")
        assert status == 200 and after["status"] == "running", after
        assert after["network"] == network  # the same host ports, from the store
        assert qemu_pids(self.tmp_path) == vmm  # re-adopted, not restarted
        await wait_ssh(self.key, ssh_port, 60)
        out = await ssh_ok(self.key, ssh_port, f"cat /root/marker; {BOOT_ID}")
        assert out.split() == ["before-the-kill", boot_id]
        return second

    async def destroy(self, vm: str, ports: Sequence[int]) -> None:
        """`destroy_vm` through the chain: the view says ``destroyed`` with no ports, every one of
        ``ports`` refuses connections, and the VM's QEMU exits."""
        await self.job("destroy_vm", [vm], timeout=120)
        status, gone = await api_get(f"{self.api}/vms/{vm}")
        assert status == 200 and gone["status"] == "destroyed", gone
        assert gone["network"]["ports"] == [], gone["network"]
        for port in ports:
            assert await asyncio.to_thread(refused, port), f"port {port} still answers after destroy"

        async def vmm_gone() -> bool:
            return qemu_pids(self.tmp_path) == set()

        await until(vmm_gone, 30, "the VM's QEMU to exit")

    async def finish(self, second: Child) -> None:
        """Each call's result is on the chain once, ``second`` stops cleanly, no VM folder is left."""
        assert await result_counts(self.d.rpc_url, self.d.contract) == {c: 1 for c in self.calls}  # each result once
        assert await second.stop(grace=30) == 0, second.log_tail()
        assert list((self.tmp_path / "data" / "vms" / "vms").iterdir()) == []


@contextlib.asynccontextmanager
async def crash_run(tmp_path: Path, d: DevDeployment, image_dir: Path, key: Path,
                    network: dict[str, str], prefix: Sequence[str] = ()) -> AsyncIterator[CrashRun]:
    """A :class:`CrashRun` against the dev contract ``d``: the operator's key in a
    keystore, an API port, the env of a QEMU operator (``network``: its ``MICROVM_NETWORK`` settings).
    On failure the consoles and operator logs are kept and printed; whatever happened, no operator
    and no QEMU of this test is left running."""
    keystore = tmp_path / "keystore"
    import_key(keystore, ANVIL_KEYS[1])
    api_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MICROVM_") or k == "MICROVM_SHARED_DIR"},
        "MICROVM_PROVIDER": "qemu", "MICROVM_IMAGE_DIR": str(image_dir), "MICROVM_QEMU_ACCEL": "tcg",
        **network, "MICROVM_PORT_RANGE": f"{PORT_RANGE[0]}-{PORT_RANGE[1]}",
        "MICROVM_BOOT_TIMEOUT_S": "240", "MICROVM_API_ADDR": f"127.0.0.1:{api_port}",
        "HTTP_RPC_URL": d.rpc_url, "KEYSTORE_URI": str(keystore), "DATA_DIR": str(tmp_path / "data"),
        "BLUEPRINT_ID": "0", "SERVICE_ID": "0", "TANGLE_CONTRACT": d.contract, "POLL_INTERVAL": "0.1",
        "FROM_BLOCK": str(d.activation_block),
    }  # MICROVM_STOP_VMS_ON_EXIT is left at its default (false): VMs outlive their operator
    run = CrashRun(tmp_path, d, env, f"http://127.0.0.1:{api_port}",
                   TangleCustomer(d.rpc_url, d.contract, 0, Secret(ANVIL_KEYS[0])), key, tuple(prefix))
    try:
        yield run
    except BaseException:
        _keep_evidence(tmp_path, run.children)
        raise
    finally:  # never leave an operator or a QEMU behind, whatever failed
        for child in run.children:
            if child.returncode is None:
                await child.stop(grace=20)
        for pid in qemu_pids(tmp_path):  # only QEMUs running in this test's folders
            await kill_pid(pid)
        with contextlib.suppress(Exception):
            await run.customer.aclose()


async def test_kill9_of_the_operator_process_keeps_a_networked_vm_its_ports_and_ssh(tmp_path: Path) -> None:
    image_dir = _debian_image()
    _anvil_or_skip()
    key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
    pub = key.with_suffix(".pub").read_text().strip()
    async with Anvil(log_dir=tmp_path) as chain:
        d = await deploy_dev_tangle(chain.rpc_url)
        async with crash_run(tmp_path, d, image_dir, key, {"MICROVM_NETWORK": "user"}) as run:
            api = run.api
            first = await run.operator(0)

            # ---- job 8 + start_vm through the chain; SSH in on the published port ----------------
            await run.job("create_vm_with_config", ["web-1", "1", "512", "0", "debian", [pub], ["22", "8080"]],
                          timeout=120)
            await run.job("start_vm", ["web-1"], timeout=300)
            status, view = await api_get(f"{api}/vms/web-1")
            assert status == 200 and view["status"] == "running", view
            network = view["network"]
            assert network["mode"] == "user" and network["guest_ip"] == "10.0.2.15", network
            ports = {p["guest_port"]: p for p in network["ports"]}
            assert sorted(ports) == [22, 8080], network
            assert all(p["host"] == "127.0.0.1" and PORT_RANGE[0] <= p["host_port"] <= PORT_RANGE[1]
                       for p in ports.values()), network
            ssh_port, web_port = ports[22]["host_port"], ports[8080]["host_port"]
            await wait_ssh(key, ssh_port)
            boot_id = (await ssh_ok(key, ssh_port, f"echo before-the-kill > /root/marker; {BOOT_ID}")).strip()
            assert boot_id
            vmm = qemu_pids(tmp_path)
            assert len(vmm) == 1, vmm

            second = await run.kill9_and_readopt(first, "web-1", network, ssh_port, boot_id, vmm)

            # ---- destroy through the chain frees the ports ----------------------------------------
            await run.destroy("web-1", (ssh_port, web_port))
            await run.finish(second)
