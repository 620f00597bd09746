"""The operator launched as blueprint-sdk's manager launches a blueprint (DESIGN.md §11): the binary with
argv ``run --pretty -v -v``, configured by the manager's env vars, stdin closed, reporting to a bridge
(the real gRPC service on a Unix socket, tests/bridge_server.py); registration mode; ``register``; and
the start-up refusal of a key that is no operator of the service. On a real anvil, with the dev contract
and with the real Tangle deployment of ../shared/tangle."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from eth_abi import decode
from eth_utils import keccak

from microvm_blueprint.blueprint.client import TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, ANVIL_KEYS, Anvil, deploy_dev_tangle, free_port
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.keystore import import_key
from microvm_blueprint.tangle.registration import is_operator_registered
from microvm_blueprint.tangle.rpc import JsonRpc

from ..bridge_server import FakeManagerBridge, serving
from ..waiting import until
from .conftest import RealTangleChain, result_counts

pytestmark = pytest.mark.chain

#: What the manager sets (crates/manager/src/sources/mod.rs BlueprintEnvVars::encode) and ours it may not.
MANAGER_VARS = (
    "HTTP_RPC_URL", "WS_RPC_URL", "KEYSTORE_URI", "DATA_DIR", "BLUEPRINT_ID", "SERVICE_ID", "PROTOCOL", "CHAIN",
    "BOOTNODES", "TANGLE_CONTRACT", "STAKING_CONTRACT", "STATUS_REGISTRY_CONTRACT", "BRIDGE_SOCKET_PATH",
    "REGISTRATION_MODE_ON", "REGISTRATION_OUTPUT_PATH", "REGISTRATION_CAPTURE_ONLY", "TEST_MODE", "PRETTY",
    "LOG_LEVEL", "MICROVM_API_ADDR",
)
TOPIC_OPERATOR_REGISTERED = "0x" + keccak(text="OperatorRegistered(uint64,address,bytes,string)").hex()


def blueprint_binary() -> list[str]:
    """The installed ``microvm-blueprint`` script, as the manager runs it (``-m`` where none is installed)."""
    script = Path(sys.executable).parent / "microvm-blueprint"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "microvm_blueprint.cli"]


def manager_env(tmp: Path, rpc_url: str, contract: str, *, key: str, **extra: str) -> dict[str, str]:
    keystore = tmp / "keystore"
    if not keystore.exists():
        import_key(keystore, key)
    env = {k: v for k, v in os.environ.items() if k not in MANAGER_VARS}
    env.update({
        "HTTP_RPC_URL": rpc_url, "WS_RPC_URL": rpc_url.replace("http://", "ws://"),
        "KEYSTORE_URI": str(keystore), "DATA_DIR": str(tmp / "blueprint-0-0"),
        "BLUEPRINT_ID": "0", "SERVICE_ID": "0", "PROTOCOL": "tangle", "CHAIN": "local_testnet", "BOOTNODES": "",
        "TANGLE_CONTRACT": contract, "POLL_INTERVAL": "0.2",
    })
    env.update(extra)
    return env


async def cli(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*blueprint_binary(), *argv], env=env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=timeout, check=False,
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_launched_like_the_manager_pings_first_binds_the_granted_port_and_takes_a_job(
    anvil: Anvil, tmp_path: Path
) -> None:
    dep = await deploy_dev_tangle(anvil.rpc_url)
    customer = TangleCustomer(anvil.rpc_url, dep.contract, dep.service_id, Secret(ANVIL_KEYS[0]))
    job = JOBS_BY_NAME["create_vm"]
    asked, granted = free_port(), free_port()
    assert asked != granted
    seen_at_ping: dict[str, object] = {}

    async def at_ping() -> None:  # what the operator had done when its Ping came
        seen_at_ping["results"] = await result_counts(anvil.rpc_url, dep.contract)
        seen_at_ping["api_listening"] = await port_open(granted) or await port_open(asked)

    sock = tmp_path / "bridge.sock"
    env = manager_env(tmp_path, anvil.rpc_url, dep.contract, key=ANVIL_KEYS[1], BRIDGE_SOCKET_PATH=str(sock),
                      MICROVM_API_ADDR=f"127.0.0.1:{asked}")
    try:
        # a job waiting on-chain before the operator starts
        sub = await customer.submit(job, encode_args(job.arg_types, ["vm-m"]))
        async with serving(sock, FakeManagerBridge(grant=granted, on_ping=at_ping)) as bridge:
            child = await Child.spawn([*blueprint_binary(), "run", "--pretty", "-v", "-v"], tmp_path / "op.log",
                                      env=env)
            try:
                async def healthy() -> bool:
                    assert child.returncode is None, child.log_tail()
                    try:
                        async with httpx.AsyncClient(timeout=2) as http:
                            return (await http.get(f"http://127.0.0.1:{granted}/health")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await until(healthy, 60, "the query API on the port the bridge granted", every=0.1)
                outcome = await customer.wait_result(sub, timeout=60, api_url=f"http://127.0.0.1:{granted}")
                assert outcome.result is True, (outcome, child.log_tail())
                assert bridge.record.calls[:2] == ["Ping", f"RequestPort({asked})"], bridge.record.calls
                assert not await port_open(asked)  # the port asked for is not the one bound
            finally:
                code = await child.stop(grace=15)
        assert code == 0, child.log_tail()
        assert seen_at_ping == {"results": {}, "api_listening": False}  # Ping came before any job or the API
        log = child.log_tail(200_000)
        assert f"query API port {granted} (asked {asked})" in log
        assert not any(line.startswith("{") for line in log.splitlines())  # --pretty: human lines, no JSON
        assert ANVIL_KEYS[1][2:] not in log
    finally:
        await customer.aclose()


async def test_a_bridge_that_refuses_ping_ends_run_with_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "bridge.sock"
    contract = "0x0165878A594ca255338adfa4d48449f69242Eb8F"  # never reached: Ping is first
    env = manager_env(tmp_path, f"http://127.0.0.1:{free_port()}", contract, key=ANVIL_KEYS[1],
                      BRIDGE_SOCKET_PATH=str(sock), MICROVM_API_ADDR=f"127.0.0.1:{free_port()}")
    async with serving(sock, FakeManagerBridge(grant=None, refuse=True)) as bridge:
        done = await cli(["run", "--pretty", "-v", "-v"], env)
    assert bridge.record.calls == ["Ping"]
    assert done.returncode == 1, done.stderr
    assert last_line(done.stderr) == (f"error: blueprint manager bridge at {sock}: Ping failed "
                                      "(UNAVAILABLE: launch cancelled by the test manager)")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("mode", ["REGISTRATION_MODE_ON", "REGISTRATION_CAPTURE_ONLY"])
async def test_registration_mode_writes_empty_inputs_and_exits(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "manager" / "registration_inputs.bin"
    env = manager_env(tmp_path, f"http://127.0.0.1:{free_port()}", "0x0165878A594ca255338adfa4d48449f69242Eb8F",
                      key=ANVIL_KEYS[1], **{mode: "true", "REGISTRATION_OUTPUT_PATH": str(out)})
    done = await cli(["run", "--pretty", "-v", "-v"], env)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"" and f"written to {out}" in done.stdout
    # without REGISTRATION_OUTPUT_PATH: blueprint-sdk's default, DATA_DIR/registration_inputs.bin
    del env["REGISTRATION_OUTPUT_PATH"]
    done = await cli(["run"], env)
    assert done.returncode == 0, done.stderr
    assert (Path(env["DATA_DIR"]) / "registration_inputs.bin").read_bytes() == b""


async def test_register_from_scratch_on_the_dev_contract(anvil: Anvil, tmp_path: Path) -> None:
    dep = await deploy_dev_tangle(anvil.rpc_url)  # registers key #1 only
    env = manager_env(tmp_path, anvil.rpc_url, dep.contract, key=ANVIL_KEYS[2])
    me = ANVIL_ADDRESSES[2]
    rpc = JsonRpc(anvil.rpc_url)
    try:
        assert not await is_operator_registered(rpc, dep.contract, 0, me)
        # registered, but no operator of service 0: run refuses to start, in one line
        done = await cli(["register", "--rpc-address", "https://op2.example:8443"], env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"registered operator {me} for blueprint 0 (tx 0x"), done.stdout
        assert await is_operator_registered(rpc, dep.contract, 0, me)
        logs = await rpc.get_logs(address=dep.contract, topics=[TOPIC_OPERATOR_REGISTERED], from_block=0,
                                  to_block=await rpc.block_number())
        ours = [e for e in logs if int(e["topics"][2], 16) == int(me, 16)]
        assert len(ours) == 1
        key, address = decode(["bytes", "string"], bytes.fromhex(ours[0]["data"][2:]))
        assert len(key) == 65 and key[0] == 4 and address == "https://op2.example:8443"
        nonce = await rpc.nonce(me)
        again = await cli(["register", "--rpc-address", "https://op2.example:8443"], env)
        assert again.returncode == 0 and again.stdout.strip() == f"operator {me} is already registered for blueprint 0"
        assert await rpc.nonce(me) == nonce  # nothing sent
        refused = await cli(["run"], {**env, "MICROVM_API_ADDR": f"127.0.0.1:{free_port()}"})
        assert refused.returncode == 1
        assert last_line(refused.stderr).startswith(f"error: operator {me} is not an operator of service 0 on "), \
            refused.stderr
        assert "Traceback" not in refused.stderr
        assert refused.stderr.count("no blueprint manager present") == 1
    finally:
        await rpc.aclose()


async def test_real_tangle_already_registered_and_strangers(real_tangle: RealTangleChain, tmp_path: Path) -> None:
    rpc = JsonRpc(real_tangle.rpc_url)
    try:
        env = manager_env(tmp_path / "op1", real_tangle.rpc_url, real_tangle.tangle, key=real_tangle.operator_key,
                          STAKING_CONTRACT=real_tangle.staking, STATUS_REGISTRY_CONTRACT=real_tangle.status_registry)
        nonce = await rpc.nonce(real_tangle.operator)
        done = await cli(["register", "--rpc-address", "http://127.0.0.1:9944"], env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"operator {real_tangle.operator} is already registered for blueprint 0"
        assert await rpc.nonce(real_tangle.operator) == nonce

        stranger = manager_env(tmp_path / "op3", real_tangle.rpc_url, real_tangle.tangle,
                               key=real_tangle.stranger_key, STAKING_CONTRACT=real_tangle.staking,
                               STATUS_REGISTRY_CONTRACT=real_tangle.status_registry,
                               MICROVM_API_ADDR=f"127.0.0.1:{free_port()}")
        nonce = await rpc.nonce(real_tangle.stranger)
        done = await cli(["register", "--rpc-address", "http://127.0.0.1:9944"], stranger)
        assert done.returncode == 1
        assert last_line(done.stderr) == (
            f"error: registerOperator(0) from {real_tangle.stranger} reverted: OperatorNotActive (the operator is "
            "not an active operator in the staking contract (stake and join first))"), done.stderr
        assert await rpc.nonce(real_tangle.stranger) == nonce  # refused before sending: no gas spent
        refused = await cli(["run", "--pretty", "-v", "-v"], stranger)
        assert refused.returncode == 1
        assert last_line(refused.stderr) == (
            f"error: operator {real_tangle.stranger} is not an operator of service 0 on {real_tangle.tangle}: "
            "register it (`microvm-blueprint register`) and have the service approve it, or check SERVICE_ID and "
            "the keystore"), refused.stderr
    finally:
        await rpc.aclose()
