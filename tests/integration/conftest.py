"""Chain fixtures: a real anvil per test, the dev contract or the real Tangle deployment, and an
operator running in-process against it (its own keystore, data dir and query API port)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from microvm_blueprint.blueprint.client import Outcome, TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.blueprint.operator import Operator
from microvm_blueprint.blueprint.settings import OperatorSettings
from microvm_blueprint.procs import Child
from microvm_blueprint.runtime.driver import VmmDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import (
    ANVIL_KEYS,
    KEEP_STATES,
    MAX_BLOCK_TRANSACTIONS,
    Anvil,
    DevDeployment,
    DevnetError,
    find_anvil,
    shared_tangle_dir,
)
from microvm_blueprint.tangle.environment import BlueprintEnvironment, Secret
from microvm_blueprint.tangle.keystore import import_key

from ..waiting import until


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


async def until_healthy(child: Child, api: str, timeout: float = 60) -> None:
    """Wait (with a deadline) until the operator process ``child`` answers ``GET {api}/health``; its
    early exit fails at once, with its log."""

    async def healthy() -> bool:
        assert child.returncode is None, child.log_tail()
        try:
            return (await api_get(f"{api}/health"))[0] == 200
        except httpx.HTTPError:
            return False

    await until(healthy, timeout, f"the operator's query API at {api}")


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


# ---- the real Tangle contracts on one anvil per session (tangle layer tests) ----------------------


@dataclass(frozen=True)
class RealTangleChain:
    """An anvil seeded with the real tnt-core deployment (../shared/tangle/README.md for the values)."""

    rpc_url: str
    log_path: Path
    tangle: str = "0x0165878A594ca255338adfa4d48449f69242Eb8F"
    staking: str = "0xDc64a140Aa3E981100a9becA4E685f962f0cF6C9"
    status_registry: str = "0x2bdCC0de6bE1f7D2ee689a0342D76F52E8EFABa3"
    blueprint_id: int = 0
    service_id: int = 0
    customer: str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    customer_key: str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
    operator: str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    operator_key: str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
    #: anvil key #3: funded, but no operator of the service
    stranger: str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
    stranger_key: str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"

    def rpc(self, method: str, params: list[Any]) -> Any:
        """A synchronous JSON-RPC call (fixtures; tests use the async client)."""
        return _rpc_sync(self.rpc_url, method, params)


def _rpc_sync(url: str, method: str, params: list[Any], timeout: float = 10.0) -> Any:
    import json
    import urllib.request

    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer = json.loads(resp.read())
    if answer.get("error"):
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer.get("result")


def _find_anvil_binary() -> Path | None:
    import shutil

    local = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "anvil"
    if local.exists():
        return local
    found = shutil.which("anvil")
    return Path(found) if found else None


@pytest.fixture
def real_fixture() -> Path:
    """The real Tangle fixture's folder (../shared/tangle, for tests that seed their own anvil from it);
    skips with the reason when it is absent."""
    folder = shared_tangle_dir()
    if not (folder / "replay.py").is_file():
        pytest.skip(f"the real Tangle fixture is not available at {folder} (set MICROVM_SHARED_DIR)")
    return folder


@pytest.fixture(scope="session")
def real_tangle_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealTangleChain]:
    """One anvil for the session with the real Tangle deployment replayed onto it (~2 s).

    Skips with the reason when anvil (npm ci) or ../shared/tangle (MICROVM_SHARED_DIR) is absent.
    Use ``real_tangle`` in tests: it reverts the chain to this state after each test.
    """
    import socket
    import subprocess
    import sys
    import time

    from ..conftest import shared_dir

    fixture = shared_dir() / "tangle"
    if not (fixture / "replay.py").is_file() or not (fixture / "localtestnet-broadcast.json").is_file():
        pytest.skip(f"the real Tangle fixture is not available at {fixture} (set MICROVM_SHARED_DIR)")
    anvil = _find_anvil_binary()
    if anvil is None:
        pytest.skip("anvil not found: run `npm ci` in the repository root (package @foundry-rs/anvil)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    folder = tmp_path_factory.mktemp("real-tangle")
    log_path = folder / "anvil.log"
    argv = [str(anvil), "--host", "127.0.0.1", "--port", str(port), "--base-fee", "0", "--gas-price", "0",
            "--gas-limit", "100000000", "--code-size-limit", "100000",
            # as the devnet: no state left under ~/.foundry/anvil/tmp, yet a few states kept in memory, since with
            # none a call on "latest" racing a new block failed with "BlockOutOfRangeError" (a heartbeat test)
            "--prune-history", str(KEEP_STATES),
            "--max-transactions", str(MAX_BLOCK_TRANSACTIONS)]  # as the devnet: a burst does not stall it
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    chain = RealTangleChain(rpc_url=f"http://127.0.0.1:{port}", log_path=log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"anvil exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                chain.rpc("eth_chainId", [])
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"anvil not ready after 30 s: {log_path.read_text()[-2000:]}")
                time.sleep(0.05)
        replay = subprocess.run(
            [sys.executable, str(fixture / "replay.py"), "--rpc", chain.rpc_url,
             "--broadcast", str(fixture / "localtestnet-broadcast.json")],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if replay.returncode != 0:
            pytest.fail(f"replay.py failed: {replay.stderr[-2000:] or replay.stdout[-2000:]}")
        yield chain
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def real_tangle(real_tangle_chain: RealTangleChain) -> Iterator[RealTangleChain]:
    """The session's real-Tangle chain, reverted to its seeded state after the test (evm_snapshot)."""
    snapshot = real_tangle_chain.rpc("evm_snapshot", [])
    yield real_tangle_chain
    assert real_tangle_chain.rpc("evm_revert", [snapshot]) is True
