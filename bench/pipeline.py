"""Job pipeline on anvil with the in-memory provider, against a bare pipelined submitResult loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from eth_abi import encode
from eth_account import Account

from microvm_blueprint.blueprint.client import TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.consumer import submit_result_data
from microvm_blueprint.tangle.contracts import TOPIC_JOB_RESULT_SUBMITTED, TOPIC_JOB_SUBMITTED
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, ANVIL_KEYS, Anvil, deploy_dev_tangle, free_port
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.keystore import import_key
from microvm_blueprint.tangle.rpc import JsonRpc

from .common import cpu_seconds, emit, median, pct

CREATE = JOBS_BY_NAME["create_vm"]
#: The watcher's poll interval: latencies are +-10 ms; a tighter loop costs the chain it measures.
POLL = 0.02


async def _send_all(customer: TangleCustomer, names: list[str]) -> list[str]:
    return [await customer.send(CREATE, encode_args(CREATE.arg_types, [n])) for n in names]


async def _bare_baseline(rpc_url: str, contract: str, call_ids: list[int]) -> float:
    """Seconds for a bare loop: sign + send every submitResult pipelined, then wait for every receipt."""
    rpc = JsonRpc(rpc_url)
    acct = Account.from_key(ANVIL_KEYS[1])
    try:
        nonce = await rpc.nonce(acct.address)
        chain_id = await rpc.chain_id()
        gas_price = await rpc.gas_price()
        t0 = time.perf_counter()
        hashes = []
        for i, call_id in enumerate(call_ids):
            tx = {"to": contract, "data": submit_result_data(0, call_id, encode(["bool"], [True])), "gas": 200_000,
                  "gasPrice": gas_price, "nonce": nonce + i, "chainId": chain_id, "value": 0}
            hashes.append(await rpc.send_raw(bytes(acct.sign_transaction(tx).raw_transaction)))
        for h in hashes:
            while await rpc.receipt(h) is None:
                await asyncio.sleep(0.005)
        return time.perf_counter() - t0
    finally:
        await rpc.aclose()


class ChainWatcher:
    """One poll loop over the contract's logs: when each call was first seen submitted (JobSubmitted)
    and when its result was first seen (JobResultSubmitted), on the client's clock."""

    def __init__(self, rpc_url: str, contract: str, from_block: int) -> None:
        self.rpc = JsonRpc(rpc_url)
        self.contract = contract
        self.next_block = from_block
        self.submitted: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            head = await self.rpc.block_number()
            if head >= self.next_block:
                logs = await self.rpc.get_logs(
                    address=self.contract, topics=[[TOPIC_JOB_RESULT_SUBMITTED, TOPIC_JOB_SUBMITTED]],
                    from_block=self.next_block, to_block=head,
                )
                now = time.perf_counter()
                for e in logs:
                    target = self.seen if e["topics"][0] == TOPIC_JOB_RESULT_SUBMITTED else self.submitted
                    target.setdefault(int(e["topics"][2], 16), now)
                self.next_block = head + 1
            await asyncio.sleep(POLL)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait(self, ids: list[int], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not all(i in self.seen and i in self.submitted for i in ids):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{sum(i not in self.seen for i in ids)} results missing")
            await asyncio.sleep(0.01)

    def latencies(self, ids: list[int]) -> list[float]:
        return [self.seen[i] - self.submitted[i] for i in ids]

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.rpc.aclose()


async def run(jobs: int = 500, steady_rate: float = 20.0, steady_seconds: float = 10.0) -> None:
    async with Anvil() as chain:
        d = await deploy_dev_tangle(chain.rpc_url)
        customer = TangleCustomer(chain.rpc_url, d.contract, 0, Secret(ANVIL_KEYS[0]))
        # baseline: the same number of bare submitResult transactions, pipelined, one key. anvil's
        # cost per transaction grows with the length of its chain (measured: x2-3 over 2,000 blocks),
        # so the baseline brackets the burst: once before it and once after, and the pipeline is
        # compared with the baseline interpolated to the burst's chain height (the baseline's calls are
        # made now, before the operator's first block)
        base_hashes = await _send_all(customer, [f"base-{i}" for i in range(2 * jobs)])
        base_ids = [(await customer.wait_submitted(h)).call_id for h in base_hashes]
        anvil_pid = chain.child.pid if chain.child else None
        cpu0 = (cpu_seconds(anvil_pid), cpu_seconds())
        h0 = await customer.rpc.block_number()
        bare_before = await _bare_baseline(chain.rpc_url, d.contract, base_ids[:jobs])
        h_before = (h0 + await customer.rpc.block_number()) / 2
        bare_cpu = {"anvil": cpu_seconds(anvil_pid) - cpu0[0], "client": cpu_seconds() - cpu0[1]}
        start_block = (await customer.rpc.block_number()) + 1
        with tempfile.TemporaryDirectory() as tmp:
            keystore = Path(tmp) / "ks"
            import_key(keystore, ANVIL_KEYS[1])
            env = {
                **os.environ, "HTTP_RPC_URL": chain.rpc_url, "DATA_DIR": tmp, "KEYSTORE_URI": str(keystore),
                "BLUEPRINT_ID": "0", "SERVICE_ID": "0", "TANGLE_CONTRACT": d.contract,
                "FROM_BLOCK": str(start_block), "POLL_INTERVAL": "0.05", "MICROVM_API_ADDR": f"127.0.0.1:{free_port()}",
                "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            }
            # the operator runs as its own process, as in production (the customer and the chain
            # watcher below share this one)
            op = await Child.spawn([sys.executable, *(["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []), "-m", "microvm_blueprint.cli", "run"], Path(tmp) / "op.log",
                                   env=env)
            # production operators are up before jobs arrive: start the clock once it answers
            await _wait_healthy(f"http://{env['MICROVM_API_ADDR']}/health", op, 60)
            watcher = ChainWatcher(chain.rpc_url, d.contract, start_block)
            watcher.start()
            first = base_ids[-1] + 1
            # burst: 500 create_vm as fast as the chain takes them (sends pipelined, no waiting)
            cpu0 = (cpu_seconds(anvil_pid), cpu_seconds(), cpu_seconds(op.pid))
            h0 = await customer.rpc.block_number()
            t0 = time.perf_counter()
            await _send_all(customer, [f"vm-{i}" for i in range(jobs)])
            sent_s = time.perf_counter() - t0
            ids = list(range(first, first + jobs))
            await watcher.wait(ids, 300)
            burst_s = max(watcher.seen[i] for i in ids) - t0
            burst_lat = watcher.latencies(ids)
            burst_cpu = {"anvil": cpu_seconds(anvil_pid) - cpu0[0], "customer": cpu_seconds() - cpu0[1],
                         "operator": cpu_seconds(op.pid) - cpu0[2]}
            h_burst = (h0 + await customer.rpc.block_number()) / 2
            # steady: 20 jobs/s; latency from the customer seeing its call on-chain to seeing the result
            n = int(steady_rate * steady_seconds)
            t_next = time.perf_counter()
            for i in range(n):
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
                t_next += 1 / steady_rate
                await customer.send(CREATE, encode_args(CREATE.arg_types, [f"steady-{i}"]))
            steady_ids = list(range(first + jobs, first + jobs + n))
            await watcher.wait(steady_ids, 120)
            steady = watcher.latencies(steady_ids)
            result_txs = await _count_txs_from(chain.rpc_url, start_block, ANVIL_ADDRESSES[1])
            await op.stop(grace=20)
            # the second half of the bracket, with the operator's key, so only once the operator is gone
            h0 = await customer.rpc.block_number()
            bare_after = await _bare_baseline(chain.rpc_url, d.contract, base_ids[jobs:])
            h_after = (h0 + await customer.rpc.block_number()) / 2
            if os.environ.get("BENCH_KEEP_LOG"):  # the operator's log, for digging into a figure
                shutil.copy(Path(tmp) / "op.log", os.environ["BENCH_KEEP_LOG"])
            await watcher.close()
        await customer.aclose()
    jobs_per_s = jobs / burst_s
    bare_s = bare_before + (bare_after - bare_before) * (h_burst - h_before) / (h_after - h_before)
    bare_per_s = jobs / bare_s
    emit(
        "job_pipeline",
        {
            "jobs": jobs, "jobs_per_s": round(jobs_per_s, 1), "customer_send_seconds": round(sent_s, 2),
            "burst_seconds": round(burst_s, 2), "burst_p50_ms": round(median(burst_lat) * 1000, 1),
            "burst_p99_ms": round(pct(burst_lat, 99) * 1000, 1), "steady_rate": steady_rate,
            "steady_p50_ms": round(median(steady) * 1000, 1), "steady_p99_ms": round(pct(steady, 99) * 1000, 1),
            "result_transactions": result_txs, "burst_cpu_seconds": {k: round(v, 2) for k, v in burst_cpu.items()},
        },
        {"bare_submitResult_per_s": round(bare_per_s, 1), "bare_seconds": round(bare_s, 2),
         "bare_seconds_before_after": [round(bare_before, 2), round(bare_after, 2)],
         "chain_height_mid_before_burst_after": [h_before, h_burst, h_after],
         "bare_cpu_seconds": {k: round(v, 2) for k, v in bare_cpu.items()}},
        {"jobs_per_s_vs_bare": round(jobs_per_s / bare_per_s, 2)},
        targets={"jobs_per_s_vs_bare": ">= 1.0", "steady_p50_ms": "<= 300"},
    )


async def _wait_healthy(url: str, op: Child, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            if op.returncode is not None:
                raise RuntimeError(f"operator exited with {op.returncode}: {op.log_tail(2000)}")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"operator not healthy after {timeout:.0f}s: {op.log_tail(2000)}")
            await asyncio.sleep(0.05)


async def _count_txs_from(rpc_url: str, from_block: int, sender: str) -> int:
    rpc = JsonRpc(rpc_url)
    try:
        count = 0
        for n in range(from_block, await rpc.block_number() + 1):
            block = await rpc.call("eth_getBlockByNumber", [hex(n), True])
            count += sum(tx["from"].lower() == sender.lower() for tx in block["transactions"])
        return count
    finally:
        await rpc.aclose()
