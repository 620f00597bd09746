"""Crash safety (DESIGN.md §7 "Crash tests"): named crash points and random kill -9 of the operator
during a run of a few hundred jobs against anvil, restarting each time. In the end every call has
exactly one result on-chain, no result transaction failed (none paid twice), the store matches what
the jobs did, and no VM folder is orphaned."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.client import TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.crashpoints import EXIT_CODE
from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, ANVIL_KEYS, Anvil, deploy_dev_tangle, free_port
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.keystore import import_key
from microvm_blueprint.tangle.rpc import JsonRpc

from .conftest import api_get, result_counts

pytestmark = [pytest.mark.chain, pytest.mark.slow]

CRASH_POINTS = [
    "producer.after_advance",
    "create.after_intent",
    "create.after_vmm",
    "start.after_boot",
    "snapshot.after_intent",
    "snapshot.after_save",
    "destroy.after_vmm",
    "runner.after_handler",
    "runner.after_finish",
    "consumer.after_send",
    "consumer.after_receipt",
]


def plan(vms: int) -> list[tuple[str, list[str]]]:
    jobs: list[tuple[str, list[str]]] = []
    for i in range(vms):
        v = f"vm-{i}"
        jobs += [("create_vm", [v]), ("start_vm", [v]), ("snapshot_vm", [v, "s"]), ("stop_vm", [v]),
                 ("destroy_vm", [v])]
    return jobs


async def failed_operator_txs(rpc_url: str, operator: str) -> int:
    rpc = JsonRpc(rpc_url)
    try:
        failed = 0
        head = await rpc.block_number()
        for n in range(head + 1):
            block = await rpc.call("eth_getBlockByNumber", [hex(n), True])
            for tx in block["transactions"]:
                if tx["from"].lower() == operator.lower():
                    receipt = await rpc.receipt(tx["hash"])
                    failed += int(receipt is not None and int(receipt["status"], 16) == 0)
        return failed
    finally:
        await rpc.aclose()


async def run_crash_rounds(tmp_path: Path, vms: int, provider_env: dict[str, str], seed: int,
                           kills: int, crash_points: list[str], after_max: int = 4) -> None:
    rnd = random.Random(seed)
    print(f"crash test seed {seed}")
    async with Anvil(log_dir=tmp_path) as chain:
        d = await deploy_dev_tangle(chain.rpc_url)
        keystore = tmp_path / "keystore"
        import_key(keystore, ANVIL_KEYS[1])
        port = free_port()
        env = {
            **os.environ, **provider_env,
            "HTTP_RPC_URL": chain.rpc_url, "KEYSTORE_URI": str(keystore), "DATA_DIR": str(tmp_path / "data"),
            "BLUEPRINT_ID": "0", "SERVICE_ID": "0", "TANGLE_CONTRACT": d.contract, "POLL_INTERVAL": "0.1",
            "FROM_BLOCK": str(d.activation_block), "MICROVM_API_ADDR": f"127.0.0.1:{port}",
        }
        customer = TangleCustomer(chain.rpc_url, d.contract, 0, Secret(ANVIL_KEYS[0]))
        jobs = plan(vms)
        total = len(jobs)
        sent = 0

        async def submit_upto(n: int) -> None:
            """Put the next part of the workload on-chain (pipelined), so every round has work to crash in."""
            nonlocal sent
            hashes = []
            for name, args in jobs[sent:n]:
                job = JOBS_BY_NAME[name]
                hashes.append(await customer.send(job, encode_args(job.arg_types, args)))
            for h in hashes:
                await customer.wait_submitted(h)
            sent = max(sent, n)

        cli = [sys.executable, "-m", "microvm_blueprint.cli", "run"]

        async def done() -> bool:
            counts = await result_counts(chain.rpc_url, d.contract)
            return len(counts) == total

        hit: list[str] = []
        rounds = [("point", p) for p in crash_points] + [("kill", str(i)) for i in range(kills)] + [("clean", "")]
        chunk = -(-total // (len(rounds) - 1))
        child: Child | None = None
        try:
            for n, (kind, what) in enumerate(rounds):
                await submit_upto(total if kind == "clean" else min(total, (n + 1) * chunk))
                round_env = dict(env)
                if kind == "point":
                    round_env["MICROVM_CRASH_AT"] = what
                    # per-job points may let a few jobs pass first; per-window/per-batch points fire at once
                    per_job = what.split(".")[0] in {"create", "start", "snapshot", "destroy", "runner"}
                    round_env["MICROVM_CRASH_AFTER"] = str(rnd.randrange(0, after_max) if per_job else 0)
                child = await Child.spawn(cli, tmp_path / f"operator-{n}.log", env=round_env)
                deadline = asyncio.get_running_loop().time() + 120
                if kind == "kill":
                    await asyncio.sleep(rnd.uniform(0.3, 2.5))  # a random moment mid-run: the point of kill -9
                    if child.returncode is None:
                        os.kill(child.pid, signal.SIGKILL)
                    await child.wait(10)
                    continue
                while child.returncode is None and not await done():
                    assert asyncio.get_running_loop().time() < deadline, child.log_tail()
                    await asyncio.sleep(0.2)
                if kind == "point":
                    if child.returncode is None:  # point never reached (work done): stop politely
                        await child.stop(grace=20)
                    else:
                        assert child.returncode == EXIT_CODE, child.log_tail()
                        hit.append(what)
                    continue
                # the clean round: wait until everything is in and the API answers, then check it
                while True:
                    try:
                        if (await api_get(f"http://127.0.0.1:{port}/health"))[0] == 200:
                            break
                    except Exception:  # noqa: BLE001 - not listening yet
                        pass
                    assert child.returncode is None, child.log_tail()
                    assert asyncio.get_running_loop().time() < deadline, child.log_tail()
                    await asyncio.sleep(0.1)
                status, views = await api_get(f"http://127.0.0.1:{port}/vms")
                assert status == 200
                assert {v["vm_id"]: (v["status"], v["snapshots"]) for v in views} == {
                    f"vm-{i}": ("destroyed", ["s"]) for i in range(vms)
                }
                assert await child.stop(grace=20) == 0, child.log_tail()
        finally:  # a failed round must not leave its operator (and its VMMs) running
            if child is not None and child.returncode is None:
                await child.stop(grace=20)
        print(f"crash points hit: {hit}")
        assert len(hit) >= len(crash_points) // 2, f"too few crash points were reached: {hit}"
        counts = await result_counts(chain.rpc_url, d.contract)
        assert counts == {i: 1 for i in range(total)}
        assert await failed_operator_txs(chain.rpc_url, ANVIL_ADDRESSES[1]) == 0
        leftovers = list((tmp_path / "data" / "vms" / "vms").iterdir())
        assert leftovers == [], leftovers
        await customer.aclose()


async def test_crash_points_and_kill9_in_memory(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    await run_crash_rounds(tmp_path, vms=60, provider_env={"MICROVM_PROVIDER": "in-memory"}, seed=seed, kills=4,
                           crash_points=CRASH_POINTS)


@pytest.mark.qemu
async def test_crash_round_with_real_qemu_guests(tmp_path: Path) -> None:
    from ..qemu_support import ensure_image, qemu_pids

    image_dir = ensure_image()
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    await run_crash_rounds(
        tmp_path, vms=3, seed=seed, kills=1,
        provider_env={"MICROVM_PROVIDER": "qemu", "MICROVM_IMAGE_DIR": str(image_dir), "MICROVM_QEMU_ACCEL": "tcg",
                      "MICROVM_STOP_VMS_ON_EXIT": "true"},
        crash_points=["create.after_vmm", "start.after_boot", "snapshot.after_save", "destroy.after_vmm"],
        after_max=1,
    )
    assert qemu_pids(tmp_path) == set(), "an orphaned QEMU process was left behind"
