"""The whole operator, as its own process, against the real Tangle contracts (tnt-core LocalTestnet
deployment in ../shared/tangle): the five lifecycle jobs submitted by a customer, end to end.

The operator runs as an operator would: a separate `microvm-blueprint run` process configured only by
env vars, with its key imported into a blueprint-sdk keystore by `microvm-blueprint keys import`.
The tangle layer alone (producer and consumer in-process, each contract path and revert) is tested
against the same contracts in test_real_tangle_producer_consumer.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.client import TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import (
    ANVIL_KEYS,
    REAL_STAKING,
    REAL_STATUS_REGISTRY,
    REAL_TANGLE,
    Anvil,
    free_port,
    seed_real_tangle,
)
from microvm_blueprint.tangle.environment import Secret

from .conftest import api_get, result_counts, until_healthy

pytestmark = pytest.mark.chain


async def test_operator_against_real_tangle(anvil: Anvil, real_fixture: Path, tmp_path: Path) -> None:
    deployment = await asyncio.to_thread(seed_real_tangle, anvil.rpc_url)
    cli = [sys.executable, "-m", "microvm_blueprint.cli"]
    keystore = tmp_path / "keystore"
    imported = await asyncio.to_thread(
        subprocess.run,
        [*cli, "keys", "import", "--keystore-uri", str(keystore)],
        input=ANVIL_KEYS[1] + "\n", capture_output=True, text=True, timeout=60, check=True,
    )
    assert deployment.operator in imported.stdout
    port = free_port()
    env = {
        **os.environ,
        "HTTP_RPC_URL": anvil.rpc_url,
        "KEYSTORE_URI": str(keystore),
        "DATA_DIR": str(tmp_path / "data"),
        "BLUEPRINT_ID": "0",
        "SERVICE_ID": "0",
        "TANGLE_CONTRACT": REAL_TANGLE,
        "STAKING_CONTRACT": REAL_STAKING,
        "STATUS_REGISTRY_CONTRACT": REAL_STATUS_REGISTRY,
        "MICROVM_API_ADDR": f"127.0.0.1:{port}",
        "POLL_INTERVAL": "0.2",
        "LOG_LEVEL": "INFO",
    }
    child = await Child.spawn([*cli, "run"], tmp_path / "operator.log", env=env)
    customer = TangleCustomer(anvil.rpc_url, REAL_TANGLE, 0, Secret(ANVIL_KEYS[0]))
    api = f"http://127.0.0.1:{port}"
    try:
        await until_healthy(child, api)
        calls = []
        for name, args in [
            ("create_vm", ["vm-1"]),
            ("start_vm", ["vm-1"]),
            ("stop_vm", ["vm-1"]),
            ("snapshot_vm", ["vm-1", "s1"]),
            ("destroy_vm", ["vm-1"]),
        ]:
            job = JOBS_BY_NAME[name]
            sub = await customer.submit(job, encode_args(job.arg_types, args))
            outcome = await customer.wait_result(sub, timeout=60, api_url=api)
            assert outcome.result is True, (name, outcome, child.log_tail())
            calls.append(sub.call_id)
        _, vm = await api_get(f"{api}/vms/vm-1")
        assert vm["status"] == "destroyed" and vm["snapshots"] == ["s1"]
        assert [h["call_id"] for h in vm["history"]] == calls
        counts = await result_counts(anvil.rpc_url, REAL_TANGLE)
        assert all(counts.get(c) == 1 for c in calls), counts
        log = child.log_tail(200_000)
        assert ANVIL_KEYS[1][2:] not in log  # the secret never reaches the logs
    finally:
        await customer.aclose()
        code = await child.stop(grace=15)
    assert code == 0, child.log_tail()
