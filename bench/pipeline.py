"""Job pipeline on anvil with the in-memory provider, against a bare pipelined submitResult loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from eth_abi import encode
from websockets.asyncio.client import ClientConnection, connect

from microvm_blueprint.blueprint.client import TangleCustomer
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.procs import Child
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.consumer import submit_result_data
from microvm_blueprint.tangle.contracts import TOPIC_JOB_RESULT_SUBMITTED, TOPIC_JOB_SUBMITTED
from microvm_blueprint.tangle.devnet import ANVIL_ADDRESSES, ANVIL_KEYS, Anvil, deploy_dev_tangle, free_port
from microvm_blueprint.tangle.environment import Secret
from microvm_blueprint.tangle.keystore import import_key, key_from_hex
from microvm_blueprint.tangle.rpc import JsonRpc
from microvm_blueprint.tangle.signing import LegacyTx, sign_legacy

from .common import cpu_seconds, emit, median, pct

CREATE = JOBS_BY_NAME["create_vm"]


async def _send_all(customer: TangleCustomer, names: list[str]) -> list[str]:
    return [await customer.send(CREATE, encode_args(CREATE.arg_types, [n])) for n in names]


async def _bare_baseline(rpc_url: str, contract: str, call_ids: list[int]) -> float:
    """Seconds for a bare loop: sign + send every submitResult pipelined, then wait for every receipt."""
    rpc = JsonRpc(rpc_url)
    key = key_from_hex(ANVIL_KEYS[1])
    try:
        nonce = await rpc.nonce(key.address)
        chain_id = await rpc.chain_id()
        gas_price = await rpc.gas_price()
        t0 = time.perf_counter()
        hashes = []
        for i, call_id in enumerate(call_ids):
            tx = LegacyTx(nonce=nonce + i, gas_price=gas_price, gas=200_000, to=contract,
                          data=submit_result_data(0, call_id, encode(["bool"], [True])), chain_id=chain_id)
            hashes.append(await rpc.send_raw(sign_legacy(tx, key.secret.reveal())))
        for h in hashes:
            while await rpc.receipt(h) is None:
                await asyncio.sleep(0.005)
        return time.perf_counter() - t0
    finally:
        await rpc.aclose()


class ChainWatcher:
    """When each call was first seen submitted (``JobSubmitted``) and when its result was first seen
    (``JobResultSubmitted``), on the client's clock, from a log subscription on the node's WebSocket.

    Push, not polling: between events, measuring costs the chain and the customer's event loop
    nothing (the 20 ms poll loop it replaces made ~100 RPCs/s in the customer's process during the
    burst, which the bare baseline did not pay), and each time is the moment the node told us.
    """

    def __init__(self, ws_url: str, contract: str) -> None:
        self.ws_url = ws_url
        self.contract = contract
        self.submitted: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._ws = await connect(self.ws_url, max_size=None)
        topics = [[TOPIC_JOB_RESULT_SUBMITTED, TOPIC_JOB_SUBMITTED]]
        await self._ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe",
                                        "params": ["logs", {"address": self.contract, "topics": topics}]}))
        answer = json.loads(await asyncio.wait_for(self._ws.recv(), 10))
        if "result" not in answer:
            raise RuntimeError(f"eth_subscribe refused: {answer}")
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._ws is not None  # start() made it
        async for message in self._ws:
            now = time.perf_counter()
            entry = json.loads(message).get("params", {}).get("result")
            if not isinstance(entry, dict) or entry.get("removed"):
                continue
            target = self.seen if entry["topics"][0] == TOPIC_JOB_RESULT_SUBMITTED else self.submitted
            target.setdefault(int(entry["topics"][2], 16), now)

    async def wait(self, ids: list[int], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not all(i in self.seen and i in self.submitted for i in ids):
            if self._task is not None and self._task.done():
                raise RuntimeError(f"the log subscription ended: {self._task.exception()!r}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{sum(i not in self.seen for i in ids)} results missing")
            await asyncio.sleep(0.01)

    def latencies(self, ids: list[int]) -> list[float]:
        return [self.seen[i] - self.submitted[i] for i in ids]

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._ws is not None:
            await self._ws.close()


@dataclass(frozen=True)
class Burst:
    """One burst of ``create_vm`` calls answered by the operator, and the bare loop's pace at its height."""

    jobs_per_s: float
    bare_per_s: float  # the bare baseline interpolated to this burst's chain height
    send_s: float
    burst_s: float
    chain_took_s: float
    blocks: int
    height: float
    latencies: list[float]
    result_txs: int
    cpu: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.jobs_per_s / self.bare_per_s


@dataclass(frozen=True)
class Round:
    """Both bursts on one fresh chain, and the bare baseline bracketing them."""

    flood: Burst
    loop: Burst
    bare_cpu: dict[str, float]
    bare_before_after: tuple[float, float]
    heights: tuple[float, float]  # chain height at the middle of the bare run before, and after


async def run(jobs: int = 500, rounds: int = 5, steady_rate: float = 20.0, steady_seconds: float = 10.0) -> None:
    ws = not os.environ.get("BENCH_NO_WS")  # BENCH_NO_WS=1: the operator polls over HTTP every 50 ms instead
    done: list[Round] = []
    for r in range(rounds):
        # each round on a fresh chain: anvil's cost per block grows with the chain's length, so rounds
        # on one chain would not be alike
        done.append(await _round(jobs, ws=ws))
        print(f"pipeline round {r + 1}/{rounds}: flood {done[-1].flood.jobs_per_s:.1f} jobs/s vs bare "
              f"{done[-1].flood.bare_per_s:.1f}/s = {done[-1].flood.ratio:.2f}; customer loop "
              f"{done[-1].loop.jobs_per_s:.1f} vs {done[-1].loop.bare_per_s:.1f} = {done[-1].loop.ratio:.2f}",
              file=sys.stderr, flush=True)
    steady = await _steady(steady_rate, steady_seconds, ws=ws)
    mid = sorted(done, key=lambda x: x.flood.ratio)[len(done) // 2]  # the median round's figures
    mid_loop = sorted(done, key=lambda x: x.loop.ratio)[len(done) // 2]
    emit(
        "job_pipeline",
        {
            "jobs": jobs, "rounds": rounds, **_burst_figures(mid.flood),
            "customer_loop": _burst_figures(mid_loop.loop),
            "steady_rate": steady_rate,
            "steady_p50_ms": round(median(steady) * 1000, 1), "steady_p99_ms": round(pct(steady, 99) * 1000, 1),
        },
        {"bare_submitResult_per_s": round(mid.flood.bare_per_s, 1),
         "bare_seconds": round(jobs / mid.flood.bare_per_s, 2),
         "bare_seconds_before_after": [round(x, 2) for x in mid.bare_before_after],
         "chain_height_bare_before_flood_loop_bare_after": [mid.heights[0], mid.flood.height, mid.loop.height,
                                                            mid.heights[1]],
         "bare_cpu_seconds": {k: round(v, 2) for k, v in mid.bare_cpu.items()}},
        {"jobs_per_s_vs_bare": round(mid.flood.ratio, 2), "every_round": [round(x.flood.ratio, 2) for x in done],
         "customer_loop_vs_bare": round(mid_loop.loop.ratio, 2),
         "customer_loop_every_round": [round(x.loop.ratio, 2) for x in done]},
        operator_new_blocks="websocket wake-ups + 1 s poll" if ws else "HTTP poll every 50 ms",
        targets={"jobs_per_s_vs_bare": ">= 1.0 (median round)", "steady_p50_ms": "<= 300"},
    )


def _burst_figures(b: Burst) -> dict[str, object]:
    return {
        "jobs_per_s": round(b.jobs_per_s, 1), "customer_send_seconds": round(b.send_s, 2),
        "burst_seconds": round(b.burst_s, 2), "last_call_on_chain_seconds": round(b.chain_took_s, 2),
        "burst_blocks": b.blocks, "burst_p50_ms": round(median(b.latencies) * 1000, 1),
        "burst_p99_ms": round(pct(b.latencies, 99) * 1000, 1), "result_transactions": b.result_txs,
        "burst_cpu_seconds": {k: round(v, 2) for k, v in b.cpu.items()},
    }


@contextlib.asynccontextmanager
async def _operator(
    chain: Anvil, contract: str, start_block: int, *, ws: bool, extra_env: dict[str, str] | None = None
) -> AsyncIterator[Child]:
    """The operator as its own process, as in production, answering ``/health`` before it is yielded
    (production operators are up before jobs arrive). ``ws``: configured with ``WS_RPC_URL`` (new blocks
    wake its poll) and the default ``POLL_INTERVAL``; otherwise HTTP polling alone every 50 ms."""
    with tempfile.TemporaryDirectory() as tmp:
        keystore = Path(tmp) / "ks"
        import_key(keystore, ANVIL_KEYS[1])
        env = {
            **os.environ, "HTTP_RPC_URL": chain.rpc_url, "DATA_DIR": tmp, "KEYSTORE_URI": str(keystore),
            "BLUEPRINT_ID": "0", "SERVICE_ID": "0", "TANGLE_CONTRACT": contract,
            "FROM_BLOCK": str(start_block), "MICROVM_API_ADDR": f"127.0.0.1:{free_port()}",
            **({"WS_RPC_URL": chain.ws_url} if ws else {"POLL_INTERVAL": "0.05"}),
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            **(extra_env or {}),
        }
        profile = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
        op = await Child.spawn([sys.executable, *profile, "-m", "microvm_blueprint.cli", "run"],
                               Path(tmp) / "op.log", env=env)
        try:
            await _wait_healthy(f"http://{env['MICROVM_API_ADDR']}/health", op, 60)
            yield op
        finally:
            await op.stop(grace=20)
            if os.environ.get("BENCH_KEEP_LOG"):  # the operator's log, for digging into a figure
                shutil.copy(Path(tmp) / "op.log", os.environ["BENCH_KEEP_LOG"])


async def _round(jobs: int, *, ws: bool = True) -> Round:
    async with Anvil() as chain:
        d = await deploy_dev_tangle(chain.rpc_url)
        customer = TangleCustomer(chain.rpc_url, d.contract, 0, Secret(ANVIL_KEYS[0]))
        # baseline: the same number of bare submitResult transactions, pipelined, one key. anvil's
        # cost per transaction grows with the length of its chain (x2-3 over 2,000 blocks), so the
        # baseline brackets the bursts, once just before them and once just after, and each burst is
        # compared with the baseline interpolated to its chain height (the baseline's calls are made
        # now, before the operator's first block)
        base_hashes = await _send_all(customer, [f"base-{i}" for i in range(2 * jobs)])
        base_ids = [(await customer.wait_submitted(h)).call_id for h in base_hashes]
        anvil_pid = chain.child.pid if chain.child else None
        cpu0 = (cpu_seconds(anvil_pid), cpu_seconds())
        h0 = await customer.rpc.block_number()
        bare_before = await _bare_baseline(chain.rpc_url, d.contract, base_ids[:jobs])
        h_before = (h0 + await customer.rpc.block_number()) / 2
        bare_cpu = {"anvil": cpu_seconds(anvil_pid) - cpu0[0], "client": cpu_seconds() - cpu0[1]}
        start_block = (await customer.rpc.block_number()) + 1
        watcher = ChainWatcher(chain.ws_url, d.contract)
        try:
            async with _operator(chain, d.contract, start_block, ws=ws) as op:
                await watcher.start()
                first = base_ids[-1] + 1
                # the flood: the customer's calls signed beforehand and sent in JSON-RPC batches, so the
                # chain, not the customer's HTTP client, sets the pace ("as fast as the chain takes them")
                raws = [await customer.sign(CREATE, encode_args(CREATE.arg_types, [f"vm-{i}"])) for i in range(jobs)]
                flood = await _burst(customer, chain, op, watcher, list(range(first, first + jobs)),
                                     lambda: customer.send_signed(raws))
                # the customer's own loop: each call signed and sent on its own, one request each
                # (the same loop as the bare baseline's): its pace, not the operator's, sets this figure
                loop = await _burst(customer, chain, op, watcher, list(range(first + jobs, first + 2 * jobs)),
                                    lambda: _send_all(customer, [f"loop-{i}" for i in range(jobs)]))
        finally:
            await watcher.close()
        # the second half of the bracket, with the operator's key, so only once the operator is gone
        h0 = await customer.rpc.block_number()
        bare_after = await _bare_baseline(chain.rpc_url, d.contract, base_ids[jobs:])
        h_after = (h0 + await customer.rpc.block_number()) / 2
        await customer.aclose()

    def at(height: float) -> float:
        return bare_before + (bare_after - bare_before) * (height - h_before) / (h_after - h_before)

    return Round(
        flood=dataclasses.replace(flood, bare_per_s=jobs / at(flood.height)),
        loop=dataclasses.replace(loop, bare_per_s=jobs / at(loop.height)),
        bare_cpu=bare_cpu, bare_before_after=(bare_before, bare_after), heights=(h_before, h_after),
    )


async def _burst(
    customer: TangleCustomer, chain: Anvil, op: Child, watcher: ChainWatcher, ids: list[int],
    send: Callable[[], Awaitable[object]],
) -> Burst:
    """Send one burst, wait for every result, and time it: from the first send to the last result seen."""
    anvil_pid = chain.child.pid if chain.child else None
    cpu1 = (cpu_seconds(anvil_pid), cpu_seconds(), cpu_seconds(op.pid))
    h0 = await customer.rpc.block_number()
    t0 = time.perf_counter()
    await send()
    sent_s = time.perf_counter() - t0
    await watcher.wait(ids, 300)
    burst_s = max(watcher.seen[i] for i in ids) - t0
    # when the chain had taken the last call: what is left after it is the operator's tail
    chain_took_s = max(watcher.submitted[i] for i in ids) - t0
    cpu = {"anvil": cpu_seconds(anvil_pid) - cpu1[0], "customer": cpu_seconds() - cpu1[1],
           "operator": cpu_seconds(op.pid) - cpu1[2]}
    h1 = await customer.rpc.block_number()
    result_txs = await _count_txs(chain.rpc_url, h0 + 1, h1, ANVIL_ADDRESSES[1])
    return Burst(jobs_per_s=len(ids) / burst_s, bare_per_s=float("nan"), send_s=sent_s, burst_s=burst_s,
                 chain_took_s=chain_took_s, blocks=h1 - h0, height=(h0 + h1) / 2,
                 latencies=watcher.latencies(ids), result_txs=result_txs, cpu=cpu)


async def _steady(
    rate: float, seconds: float, *, ws: bool = True, extra_env: dict[str, str] | None = None
) -> list[float]:
    """Latencies at a steady ``rate`` jobs/s on a fresh chain: from the customer seeing its call on-chain
    to seeing the result."""
    async with Anvil() as chain:
        d = await deploy_dev_tangle(chain.rpc_url)
        customer = TangleCustomer(chain.rpc_url, d.contract, 0, Secret(ANVIL_KEYS[0]))
        watcher = ChainWatcher(chain.ws_url, d.contract)
        try:
            async with _operator(chain, d.contract, await customer.rpc.block_number() + 1, ws=ws,
                                 extra_env=extra_env):
                await watcher.start()
                hashes = []
                t_next = time.perf_counter()
                for i in range(int(rate * seconds)):
                    await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
                    t_next += 1 / rate
                    hashes.append(await customer.send(CREATE, encode_args(CREATE.arg_types, [f"steady-{i}"])))
                ids = [(await customer.wait_submitted(h)).call_id for h in hashes]
                await watcher.wait(ids, 120)
                return watcher.latencies(ids)
        finally:
            await watcher.close()
            await customer.aclose()


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


async def _count_txs(rpc_url: str, from_block: int, to_block: int, sender: str) -> int:
    """Transactions from ``sender`` in blocks ``from_block..to_block`` (one batch request)."""
    rpc = JsonRpc(rpc_url)
    try:
        blocks = await rpc.batch([("eth_getBlockByNumber", [hex(n), True]) for n in range(from_block, to_block + 1)])
        count = 0
        for block in blocks:
            if not isinstance(block, dict):
                raise RuntimeError(f"eth_getBlockByNumber: {block!r}")
            count += sum(tx["from"].lower() == sender.lower() for tx in block["transactions"])
        return count
    finally:
        await rpc.aclose()
