"""The embedded local chain: anvil (npm ``@foundry-rs/anvil``) + the DevTangle contract.

``Anvil`` starts and stops the chain; :func:`deploy_dev_tangle` deploys the dev contract and sets
up a blueprint and service with anvil key #1 as the operator and key #0 as the customer;
:func:`seed_real_tangle` replays the real tnt-core deployment from ``../shared/tangle`` instead.
anvil's development keys are public; they are for local chains only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_abi import decode, encode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from ...procs import Child
from ..errors import RpcError, TangleError
from ..rpc import JsonRpc

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
ARTIFACT = HERE / "DevTangle.json"

ANVIL_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
)
ANVIL_ADDRESSES = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
)
#: Addresses of the real deployment after ``replay.py`` (../shared/tangle/README.md).
REAL_TANGLE = "0x0165878A594ca255338adfa4d48449f69242Eb8F"
REAL_STAKING = "0xDc64a140Aa3E981100a9becA4E685f962f0cF6C9"
REAL_STATUS_REGISTRY = "0x2bdCC0de6bE1f7D2ee689a0342D76F52E8EFABa3"

#: jobs the dev blueprint defines (this blueprint has 0-8: create_vm ... create_vm_with_config)
JOB_COUNT = 9


class DevnetError(TangleError):
    """The local chain could not be started or set up."""


def find_anvil() -> Path:
    candidates = [REPO / "node_modules" / ".bin" / "anvil"]
    found = shutil.which("anvil")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.exists():
            return path
    raise DevnetError("anvil not found: run `npm ci` in the repository root (package @foundry-rs/anvil)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on (or holds) ``host:port``: it answers a connect, or the port
    cannot be bound (``SO_REUSEADDR``, as anvil binds, so a closed connection's ``TIME_WAIT`` does not count)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        if s.connect_ex((host, port)) == 0:
            return True
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


#: States (blocks) anvil keeps: how deep an ``anvil_reorg`` can go.
KEEP_STATES = 16

#: Ready transactions anvil's automine takes per block, above any burst a test or benchmark sends.
#: At anvil's default (1,000) a pool holding 1,000 or more ready transactions makes its node loop
#: queue the same batch again on every wake-up while a block is being mined (anvil 1.7.1,
#: ``ReadyTransactionMiner`` keeps ``has_pending_txs``): memory grew ~45 MB/s and the chain mined
#: empty blocks of stale batches for good under a 2,000-transaction burst (with or without
#: ``--prune-history``). Blocks still hold what the block gas limit allows.
MAX_BLOCK_TRANSACTIONS = 1_000_000


class Anvil:
    """A local anvil chain. ``async with Anvil() as chain: chain.rpc_url``."""

    def __init__(
        self,
        *,
        port: int | None = None,
        block_time: float | None = None,
        log_dir: str | Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.block_time = block_time
        self.extra_args = extra_args or []
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="anvil-")
        self.log_path = Path(log_dir or self._tmp.name) / "anvil.log"  # type: ignore[union-attr]
        self.child: Child | None = None

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """anvil answers WebSocket JSON-RPC (subscriptions) on the same port."""
        return f"ws://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [
            str(find_anvil()), "--host", "127.0.0.1", "--port", str(self.port),
            "--base-fee", "0", "--gas-price", "0", "--gas-limit", "100000000",
            "--code-size-limit", "100000", "--silent",
            # keep only the last few states, in memory: by default anvil writes old ones under
            # ~/.foundry/anvil/tmp (up to 1.5 GB a chain here) and leaves them behind when it is
            # stopped through its npm wrapper; 109 test and benchmark chains had filled 77 GB of
            # disk. A few are kept so that ``anvil_reorg`` can replace the newest blocks
            "--prune-history", str(KEEP_STATES),
            "--max-transactions", str(MAX_BLOCK_TRANSACTIONS),
        ]
        if self.block_time:
            argv += ["--block-time", str(self.block_time)]
        return argv + self.extra_args

    async def start(self, timeout: float = 30.0) -> Anvil:
        """Start anvil and wait (deadline) until it answers. A port that already has something
        listening is an error: the chain answering there would be that one, not ours."""
        if port_in_use(self.port):
            await self.stop()
            raise DevnetError(
                f"port {self.port} on 127.0.0.1 already has something listening (a chain left running?): "
                f"stop it or use another port"
            )
        self.child = await Child.spawn(self.argv(), self.log_path)
        rpc = JsonRpc(self.rpc_url, timeout=2)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                if self.child.returncode is not None:
                    raise DevnetError(f"anvil exited with {self.child.returncode}: {self.child.log_tail(1000)}")
                try:
                    await rpc.chain_id()
                    if self.child.returncode is not None:  # what answered was not ours
                        continue
                    return self
                except RpcError:
                    if asyncio.get_running_loop().time() > deadline:
                        await self.stop()
                        raise DevnetError(f"anvil not ready after {timeout}s: {self.child.log_tail(1000)}") from None
                    await asyncio.sleep(0.05)
        finally:
            await rpc.aclose()

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(grace=3)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> Anvil:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.stop())


@dataclass(frozen=True)
class DevDeployment:
    rpc_url: str
    chain_id: int
    contract: str
    blueprint_id: int
    service_id: int
    operator: str
    customer: str
    activation_block: int
    operator_key: str = ANVIL_KEYS[1]
    customer_key: str = ANVIL_KEYS[0]
    #: STATUS_REGISTRY_CONTRACT: on the dev chain the DevTangle contract itself (it checks heartbeats too)
    status_registry: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sel(signature: str) -> bytes:
    return function_signature_to_4byte_selector(signature)


async def send_unlocked(rpc: JsonRpc, sender: str, to: str | None, data: bytes, value: int = 0,
                        timeout: float = 30.0) -> dict[str, Any]:
    """Send from an anvil-unlocked account and wait for the receipt (deadline); raise on revert."""
    tx: dict[str, Any] = {"from": sender, "data": "0x" + data.hex(), "gas": hex(30_000_000), "value": hex(value)}
    if to:
        tx["to"] = to
    tx_hash = await rpc.call("eth_sendTransaction", [tx])
    receipt = await rpc.wait_receipt(str(tx_hash), timeout, every=0.02)
    if receipt is None:
        raise DevnetError(f"no receipt for {tx_hash} after {timeout}s")
    if int(str(receipt["status"]), 16) != 1:
        raise DevnetError(f"transaction {tx_hash} reverted")
    return receipt


async def deploy_dev_tangle(rpc_url: str, *, required_results: int = 1, job_count: int = JOB_COUNT) -> DevDeployment:
    """Deploy DevTangle, a blueprint with 8 jobs, register operator #1, make service with customer #0."""
    artifact = json.loads(ARTIFACT.read_text())
    rpc = JsonRpc(rpc_url)
    try:
        owner, operator = ANVIL_ADDRESSES[0], ANVIL_ADDRESSES[1]
        receipt = await send_unlocked(rpc, owner, None, bytes.fromhex(artifact["bytecode"][2:]))
        contract = to_checksum_address(receipt["contractAddress"])
        await send_unlocked(rpc, owner, contract, _sel("createBlueprint(uint8)") + encode(["uint8"], [job_count]))
        import coincurve

        pub = coincurve.PrivateKey(bytes.fromhex(ANVIL_KEYS[1][2:])).public_key.format(compressed=False)
        await send_unlocked(
            rpc, operator, contract,
            _sel("registerOperator(uint64,bytes,string)") + encode(["uint64", "bytes", "string"], [0, pub, ""]),
        )
        receipt = await send_unlocked(
            rpc, owner, contract,
            _sel("createService(uint64,address[],address[],uint32)")
            + encode(["uint64", "address[]", "address[]", "uint32"], [0, [operator], [owner], required_results]),
        )
        chain_id = await rpc.chain_id()
        return DevDeployment(
            rpc_url=rpc_url, chain_id=chain_id, contract=contract, blueprint_id=0, service_id=0,
            operator=operator, customer=owner, activation_block=int(str(receipt["blockNumber"]), 16),
            status_registry=contract,
        )
    finally:
        await rpc.aclose()


def shared_tangle_dir() -> Path:
    base = Path(os.environ.get("MICROVM_SHARED_DIR", REPO.parent / "shared"))
    return base / "tangle"


def seed_real_tangle(rpc_url: str) -> DevDeployment:
    """Replay the real tnt-core LocalTestnet deployment onto a running anvil (``../shared/tangle``)."""
    folder = shared_tangle_dir()
    script = folder / "replay.py"
    if not script.is_file():
        raise DevnetError(f"real Tangle fixture not available at {folder}")
    proc = subprocess.run(
        [sys.executable, str(script), "--rpc", rpc_url, "--broadcast", str(folder / "localtestnet-broadcast.json")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if proc.returncode != 0:
        raise DevnetError(f"replay of the real Tangle fixture failed: {proc.stderr[-1500:] or proc.stdout[-1500:]}")
    return DevDeployment(
        rpc_url=rpc_url, chain_id=31337, contract=REAL_TANGLE, blueprint_id=0, service_id=0,
        operator=ANVIL_ADDRESSES[1], customer=ANVIL_ADDRESSES[0], activation_block=0,
        status_registry=REAL_STATUS_REGISTRY,
    )


def decode_uint(data: bytes) -> int:
    return int(decode(["uint256"], data)[0])
