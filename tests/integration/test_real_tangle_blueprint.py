"""This blueprint's own definition on the real Tangle contracts (tnt-core LocalTestnet deployment in
../shared/tangle): `microvm-blueprint blueprint deploy` creates it, the fixture's two operators
register to it, the customer requests a service and both operators approve it, and a real
`microvm-blueprint run` operator process answers every job 0-8 there, each result on-chain.

The fixture's own blueprint 0 defines 8 jobs (0-7), so job 8 (create_vm_with_config) can only run
on the real contracts through a blueprint like this one.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode

from microvm_blueprint.blueprint.client import TangleCustomer
from microvm_blueprint.blueprint.definition import blueprint_definition, native_source
from microvm_blueprint.blueprint.jobs import JOBS, JOBS_BY_NAME
from microvm_blueprint.procs import Child
from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.definition import (
    DefinitionError,
    approve_service_data,
    create_blueprint,
    decode_definition,
    decode_schema,
    request_service_data,
)
from microvm_blueprint.tangle.devnet import (
    ANVIL_ADDRESSES,
    ANVIL_KEYS,
    REAL_STAKING,
    REAL_STATUS_REGISTRY,
    REAL_TANGLE,
    Anvil,
    free_port,
    seed_real_tangle,
    send_unlocked,
)
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.keystore import key_from_hex
from microvm_blueprint.tangle.registration import is_operator_registered, register_operator
from microvm_blueprint.tangle.rpc import ContractRevert, JsonRpc

from .conftest import api_get, until_healthy

pytestmark = pytest.mark.chain

CLI = [sys.executable, "-m", "microvm_blueprint.cli"]
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFNGMa6e5RyWvtnugA0FwZ1M6BZasAb9bkLLhGTcR/y3 test@example"
OWNER, OP1, OP2 = ANVIL_ADDRESSES
SEL_GET_DEFINITION = contracts.selector_bytes(contracts.GET_BLUEPRINT_DEFINITION)
SEL_SUBMIT_JOB = contracts.selector_bytes(contracts.SUBMIT_JOB)


def _cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def _artifact(tmp: Path) -> Path:
    path = tmp / "microvm-blueprint-linux-amd64.tar.gz"
    path.write_bytes(b"the release archive of this test\n")
    return path


async def _service(rpc: JsonRpc, blueprint_id: int) -> int:
    """Register both fixture operators, request a service with them (customer #0), approve it as each:
    the new service id (from ServiceActivated)."""
    for secret in (ANVIL_KEYS[1], ANVIL_KEYS[2]):
        key = key_from_hex(secret)
        done = await register_operator(rpc, REAL_TANGLE, blueprint_id, key, "http://127.0.0.1:1")
        assert not done.already
        assert await is_operator_registered(rpc, REAL_TANGLE, blueprint_id, key.address)
    receipt = await send_unlocked(rpc, OWNER, REAL_TANGLE, request_service_data(blueprint_id, [OP1, OP2], [OWNER]))
    (request_id,) = [int(e["topics"][1], 16) for e in receipt["logs"]
                     if e["topics"][0] == contracts.topic(contracts.SERVICE_REQUESTED)]
    activated: list[dict[str, Any]] = []
    for operator in (OP1, OP2):
        receipt = await send_unlocked(rpc, operator, REAL_TANGLE, approve_service_data(request_id))
        activated += [e for e in receipt["logs"] if e["topics"][0] == contracts.TOPIC_SERVICE_ACTIVATED
                      and e["address"].lower() == REAL_TANGLE.lower()]
    assert len(activated) == 1, "the service activates with the second approval"
    assert int(activated[0]["topics"][3], 16) == blueprint_id
    return int(activated[0]["topics"][1], 16)


async def _job_call(rpc: JsonRpc, service_id: int, call_id: int) -> tuple[Any, ...]:
    from eth_abi import decode

    data = contracts.selector_bytes(contracts.GET_JOB_CALL) + encode(["uint64", "uint64"],
                                                                                   [service_id, call_id])
    (value,) = decode(["(uint8,address,uint64,uint32,bool,bool,uint256)"], await rpc.eth_call(REAL_TANGLE, data))
    return tuple(value)


async def test_deploy_register_request_approve_and_run_every_job(anvil: Anvil, real_fixture: Path,
                                                                 tmp_path: Path) -> None:
    await asyncio.to_thread(seed_real_tangle, anvil.rpc_url)
    owner_keys = tmp_path / "owner-keystore"
    assert _cli("keys", "import", "--keystore-uri", str(owner_keys), stdin=ANVIL_KEYS[0] + "\n").returncode == 0
    artifact = _artifact(tmp_path)
    deployed = await asyncio.to_thread(
        _cli, "blueprint", "deploy", "--artifact", str(artifact), "--artifact-uri", "https://example.org/mvb.tar.gz",
        env={"HTTP_RPC_URL": anvil.rpc_url, "TANGLE_CONTRACT": REAL_TANGLE, "KEYSTORE_URI": str(owner_keys)},
    )
    assert deployed.returncode == 0, deployed.stderr
    m = re.search(r"BLUEPRINT_ID=(\d+)", deployed.stdout)
    assert m, deployed.stdout
    blueprint_id = int(m.group(1))
    assert blueprint_id == 1  # the fixture has blueprint 0

    rpc = JsonRpc(anvil.rpc_url)
    customer = TangleCustomer(anvil.rpc_url, REAL_TANGLE, 0, Secret(ANVIL_KEYS[0]))
    child: Child | None = None
    try:
        # what the contract keeps: 9 jobs in the job table's order, the name, the binary's sha256 via the event
        on_chain = decode_definition(await rpc.eth_call(REAL_TANGLE, SEL_GET_DEFINITION + encode(["uint64"],
                                                                                                  [blueprint_id])))
        assert len(on_chain[7]) == len(JOBS) == 9  # type: ignore[arg-type]
        assert on_chain[6][0] == "microvm-blueprint"  # type: ignore[index]
        expected = blueprint_definition([native_source(artifact, "https://example.org/mvb.tar.gz")])
        assert on_chain[1] == expected.metadata_hash

        service_id = await _service(rpc, blueprint_id)
        customer.service_id = service_id

        keystore = tmp_path / "keystore"
        assert _cli("keys", "import", "--keystore-uri", str(keystore), stdin=ANVIL_KEYS[1] + "\n").returncode == 0
        port = free_port()
        env = {
            **os.environ, "HTTP_RPC_URL": anvil.rpc_url, "KEYSTORE_URI": str(keystore),
            "DATA_DIR": str(tmp_path / "data"), "BLUEPRINT_ID": str(blueprint_id), "SERVICE_ID": str(service_id),
            "TANGLE_CONTRACT": REAL_TANGLE, "STAKING_CONTRACT": REAL_STAKING,
            "STATUS_REGISTRY_CONTRACT": REAL_STATUS_REGISTRY, "MICROVM_API_ADDR": f"127.0.0.1:{port}",
            "MICROVM_PROVIDER": "in-memory", "MICROVM_NETWORK": "user", "POLL_INTERVAL": "0.2",
            "LOG_LEVEL": "INFO",
        }
        child = await Child.spawn([*CLI, "run"], tmp_path / "operator.log", env=env)
        api = f"http://127.0.0.1:{port}"
        await until_healthy(child, api)

        plan: list[tuple[str, list[Any]]] = [
            ("create_vm", ["vm-1"]),
            ("start_vm", ["vm-1"]),
            ("stop_vm", ["vm-1"]),
            ("snapshot_vm", ["vm-1", "s1"]),
            ("restore_vm", ["vm-1", "s1", "vm-2"]),
            ("create_vm_with_spec", ["vm-3", 1, 256, ""]),
            ("delete_snapshot", ["vm-1", "s1"]),
            ("create_vm_with_config", ["vm-4", 1, 256, 0, "", [SSH_KEY], [22]]),
            ("destroy_vm", ["vm-1"]),
        ]
        assert sorted(JOBS_BY_NAME[n].index for n, _ in plan) == list(range(9))
        calls: dict[int, str] = {}
        for name, args in plan:
            job = JOBS_BY_NAME[name]
            sub = await customer.submit(job, encode_args(job.arg_types, args))
            outcome = await customer.wait_result(sub, timeout=60, api_url=api)
            assert outcome.result is True, (name, outcome, child.log_tail())
            calls[sub.call_id] = name
        for call_id, name in calls.items():
            job_index, caller, _, result_count, completed, _, _ = await _job_call(rpc, service_id, call_id)
            assert (job_index, caller.lower(), result_count, completed) == (
                JOBS_BY_NAME[name].index, OWNER.lower(), 1, True), name
        logs = await rpc.get_logs(address=REAL_TANGLE, topics=[contracts.TOPIC_JOB_RESULT_SUBMITTED,
                                                               "0x" + service_id.to_bytes(32, "big").hex()],
                                  from_block=0, to_block=await rpc.block_number())
        assert sorted(int(e["topics"][2], 16) for e in logs) == sorted(calls)  # one result each, by operator 1
        assert {"0x" + e["topics"][3][-40:] for e in logs} == {OP1.lower()}
        _, vm4 = await api_get(f"{api}/vms/vm-4")
        assert vm4["spec"]["ssh_keys"] == 1 and [p["guest_port"] for p in vm4["network"]["ports"]] == [22]
        _, vm1 = await api_get(f"{api}/vms/vm-1")
        assert vm1["status"] == "destroyed" and vm1["snapshots"] == []
    finally:
        await customer.aclose()
        await rpc.aclose()
        if child is not None:
            code = await child.stop(grace=15)
            assert code == 0, child.log_tail()


async def test_schemas_on_chain_refuse_abi_payloads_and_reverts_are_named(anvil: Anvil, real_fixture: Path,
                                                                          tmp_path: Path) -> None:
    """Why the definition keeps its schemas off-chain by default: once stored, tnt-core validates a
    job's inputs in its compact format, and an ABI-encoded call (what this project's customers and
    blueprint-sdk's jobs send) is refused. And a createBlueprint the contract refuses is named before
    any gas is spent."""
    await asyncio.to_thread(seed_real_tangle, anvil.rpc_url)
    rpc = JsonRpc(anvil.rpc_url)
    owner = key_from_hex(ANVIL_KEYS[0])
    try:
        source = native_source(_artifact(tmp_path), "ipfs://bafy-test")
        nonce = await rpc.nonce(owner.address)
        from dataclasses import replace

        with pytest.raises(DefinitionError, match=r"reverted: InvalidRevision \(the master blueprint service manager registry has no such revision\)"):
            await create_blueprint(rpc, REAL_TANGLE, owner, replace(blueprint_definition([source]),
                                                                    master_manager_revision=99))
        assert await rpc.nonce(owner.address) == nonce, "a refused definition must cost nothing"

        created = await create_blueprint(rpc, REAL_TANGLE, owner, blueprint_definition([source], schemas_on_chain=True))
        on_chain = decode_definition(await rpc.eth_call(REAL_TANGLE, SEL_GET_DEFINITION + encode(
            ["uint64"], [created.blueprint_id])))
        jobs_on_chain: Any = on_chain[7]
        assert [decode_schema(j[3]) for j in jobs_on_chain] == [list(zip(j.arg_names, j.arg_types, strict=True))
                                                                for j in JOBS]
        assert all(decode_schema(j[4]) == [("ok", "bool")] for j in jobs_on_chain)
        service_id = await _service(rpc, created.blueprint_id)

        def submit(inputs: bytes) -> bytes:
            return SEL_SUBMIT_JOB + encode(["uint64", "uint8", "bytes"], [service_id, 0, inputs])

        with pytest.raises(ContractRevert) as refused:
            await rpc.estimate_gas(REAL_TANGLE, submit(encode(["string"], ["vm-1"])), OWNER)
        assert refused.value.name == "SchemaValidationFailed"
        assert await rpc.estimate_gas(REAL_TANGLE, submit(bytes([4]) + b"vm-1"), OWNER) > 0  # compact form passes
    finally:
        await rpc.aclose()
