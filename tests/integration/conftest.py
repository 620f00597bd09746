"""Chain fixtures: a real anvil per test, the dev contract or the real Tangle deployment, and an
operator running in-process against it (its own keystore, data dir and query API port)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from microvm_blueprint.blueprint.client import Outcome, TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.blueprint.operator import Operator
from microvm_blueprint.blueprint.settings import OperatorSettings
from microvm_blueprint.runtime.driver import VmmDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import ANVIL_KEYS, Anvil, DevDeployment, DevnetError, find_anvil
from microvm_blueprint.tangle.environment import BlueprintEnvironment, Secret
from microvm_blueprint.tangle.keystore import import_key


def _anvil_or_skip() -> None:
    try:
        find_anvil()
    except DevnetError as exc:
        pytest.skip(str(exc))


@pytest.fixture
async def anvil(tmp_path: Path) -> AsyncIterator[Anvil]:
    _anvil_or_skip()
    async with Anvil(log_dir=tmp_path) as chain:
        yield chain


@dataclass
class RunningOperator:
    operator: Operator
    task: asyncio.Task[None]
    api_url: str

    async def stop(self, timeout: float = 30) -> None:
        self.operator.stop()
        await asyncio.wait_for(self.task, timeout)


@dataclass
class Harness:
    deployment: DevDeployment
    tmp: Path
    rpc_url: str
    customer: TangleCustomer
    running: list[RunningOperator] = field(default_factory=list)

    def env(self, **extra: str) -> BlueprintEnvironment:
        keystore = self.tmp / "keystore"
        if not keystore.exists():
            import_key(keystore, ANVIL_KEYS[1])
        return BlueprintEnvironment.load(
            {
                "HTTP_RPC_URL": self.rpc_url,
                "DATA_DIR": str(self.tmp / "operator"),
                "KEYSTORE_URI": str(keystore),
                "BLUEPRINT_ID": str(self.deployment.blueprint_id),
                "SERVICE_ID": str(self.deployment.service_id),
                "TANGLE_CONTRACT": self.deployment.contract,
                "POLL_INTERVAL": "0.1",
                **extra,
            }
        )

    async def start_operator(self, *, driver: VmmDriver | None = None, env: dict[str, str] | None = None,
                             settings_env: dict[str, str] | None = None) -> RunningOperator:
        e = self.env(**(env or {}))
        settings = OperatorSettings.from_env(settings_env or {}, e.data_dir, api_host="127.0.0.1", api_port=0)
        op = Operator.assemble(e, settings, driver=driver)
        task = asyncio.create_task(op.run())
        ready = asyncio.create_task(op.runner.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            await task
        assert ready in done, "operator did not become ready"
        running = RunningOperator(op, task, op.server.url)
        self.running.append(running)
        return running

    async def job(self, name: str, *args: Any, timeout: float = 60, api_url: str | None = None) -> Outcome:
        job = JOBS_BY_NAME[name]
        sub = await self.customer.submit(job, encode_args(job.arg_types, list(args)))
        url = api_url or (self.running[-1].api_url if self.running else None)
        return await self.customer.wait_result(sub, timeout=timeout, api_url=url)


HarnessFactory = Callable[[DevDeployment], Awaitable[Harness]]


@pytest.fixture
async def harness_for(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    async def make(deployment: DevDeployment) -> Harness:
        customer = TangleCustomer(deployment.rpc_url, deployment.contract, deployment.service_id,
                                  Secret(ANVIL_KEYS[0]))
        h = Harness(deployment, tmp_path, deployment.rpc_url, customer)
        made.append(h)
        return h

    yield make
    for h in made:
        for r in h.running:
            if not r.task.done():
                with contextlib.suppress(Exception):
                    await r.stop()
        await h.customer.aclose()


async def api_get(url: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(url)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text


async def result_counts(rpc_url: str, contract: str) -> dict[int, int]:
    """call id -> number of JobResultSubmitted logs on-chain (exactly-once checks)."""
    from collections import Counter

    from microvm_blueprint.tangle.contracts import TOPIC_JOB_RESULT_SUBMITTED
    from microvm_blueprint.tangle.rpc import JsonRpc

    rpc = JsonRpc(rpc_url)
    try:
        logs = await rpc.get_logs(address=contract, topics=[TOPIC_JOB_RESULT_SUBMITTED], from_block=0,
                                  to_block=await rpc.block_number())
    finally:
        await rpc.aclose()
    return dict(Counter(int(e["topics"][2], 16) for e in logs))


@pytest.fixture
async def life(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Lifecycle]:
    """A lifecycle over real QEMU guests (TCG); keeps every console when the test failed and checks
    that no QEMU process or VM folder is left."""
    from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
    from microvm_blueprint.runtime.model import Origin, VmStatus
    from microvm_blueprint.runtime.store import Store

    from ..qemu_support import ensure_image, qemu_pids

    image_dir = ensure_image()
    driver = QemuDriver(QemuSettings(image_dir=image_dir, accel="tcg", boot_timeout=120))
    lc = Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    yield lc
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:  # keep the evidence
        for vm in await lc.list_vms():
            text = await lc.console(vm.vm_id, 8000)
            (tmp_path / f"console-{vm.vm_id}.log").write_text(text)
            print(f"--- console of {vm.vm_id} ---\n{text}")
    for vm in await lc.list_vms():
        if vm.status is not VmStatus.DESTROYED:
            await lc.destroy_vm(vm.vm_id, Origin())
    await lc.close(stop_vms=True)
    assert qemu_pids(tmp_path) == set(), "a QEMU process was left behind"
    assert list((tmp_path / "state" / "vms").iterdir()) == [], "a VM folder was left behind"
