"""QoS heartbeats against the REAL OperatorStatusRegistry (tnt-core LocalTestnet deployment from
../shared/tangle; operator 1 of service 0), sent through the result sender's nonces."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from eth_abi import decode, encode
from eth_utils import to_checksum_address

from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.abi import encode_result
from microvm_blueprint.tangle.consumer import TangleConsumer
from microvm_blueprint.tangle.heartbeat import (
    HeartbeatService,
    domain_separator,
    encode_metrics,
)
from microvm_blueprint.tangle.rpc import ContractRevert, JsonRpc
from microvm_blueprint.tangle.state import TangleState

from .conftest import RealTangleChain
from .tangle_chain import Recorder, operator_key, submit_job, transactions_from, wait_for

pytestmark = pytest.mark.chain

TRUE = encode_result("bool", True)


def _call(fn: dict, *args: object) -> bytes:  # type: ignore[type-arg]
    types = [i["type"] for i in fn["inputs"]]
    return contracts.selector_bytes(fn) + encode(types, list(args))


async def is_online(rpc: JsonRpc, chain: RealTangleChain) -> bool:
    raw = await rpc.eth_call(chain.status_registry, _call(contracts.IS_ONLINE, chain.service_id, chain.operator))
    return bool(decode(["bool"], raw)[0])


async def last_heartbeat(rpc: JsonRpc, chain: RealTangleChain) -> int:
    raw = await rpc.eth_call(chain.status_registry,
                             _call(contracts.GET_LAST_HEARTBEAT, chain.service_id, chain.operator))
    return int(decode(["uint256"], raw)[0])


class Sender:
    """A result sender (TangleConsumer) running on the real chain, with a heartbeat beside it."""

    def __init__(self, chain: RealTangleChain, tmp: Path, *, metrics: list[tuple[str, int]] | None = None) -> None:
        self.rpc = JsonRpc(chain.rpc_url, timeout=5)
        self.state = TangleState(tmp / "tangle.sqlite3")
        self.key = operator_key(tmp, chain.operator_key)
        self.recorder = Recorder()
        self.consumer = TangleConsumer(self.rpc, self.state, self.key, contract=chain.tangle, backoff_cap=0.4,
                                       observer=self.recorder, drain_timeout=5, linger=0)
        self.heartbeat = HeartbeatService(
            self.rpc, self.consumer, self.key, registry=chain.status_registry, service_id=chain.service_id,
            blueprint_id=chain.blueprint_id, interval=300, metrics=lambda: metrics or [], receipt_timeout=20,
        )
        self.stop = asyncio.Event()


@contextlib.asynccontextmanager
async def running(chain: RealTangleChain, tmp: Path, **kw: list[tuple[str, int]]) -> AsyncIterator[Sender]:
    s = Sender(chain, tmp, **kw)
    task = asyncio.create_task(s.consumer.run(s.stop))
    try:
        yield s
    finally:
        s.stop.set()
        await asyncio.wait_for(task, 15)
        await s.rpc.aclose()
        s.state.close()


async def test_domain_separator_matches_the_deployed_registry(real_tangle: RealTangleChain) -> None:
    rpc = JsonRpc(real_tangle.rpc_url)
    try:
        raw = await rpc.eth_call(real_tangle.status_registry, _call(contracts.DOMAIN_SEPARATOR))
        assert raw == domain_separator(await rpc.chain_id(), real_tangle.status_registry)
        raw = await rpc.eth_call(real_tangle.status_registry, _call(contracts.HEARTBEAT_TYPEHASH))
        from microvm_blueprint.tangle.heartbeat import HEARTBEAT_TYPEHASH

        assert raw == HEARTBEAT_TYPEHASH
    finally:
        await rpc.aclose()


async def test_heartbeat_puts_the_operator_online(real_tangle: RealTangleChain, tmp_path: Path) -> None:
    chain = real_tangle
    metrics = [("vms_running", 2), ("vms_total", 3), ("jobs_done", 7), ("jobs_failed", 1), ("guest_memory_mib", 512)]
    async with running(chain, tmp_path, metrics=metrics) as s:
        assert await is_online(s.rpc, chain) is False
        assert await last_heartbeat(s.rpc, chain) == 0
        beat = await s.heartbeat.beat()
        assert await is_online(s.rpc, chain) is True
        first = await last_heartbeat(s.rpc, chain)
        block = await s.rpc.get_block(beat.block_number)
        assert block is not None and first == int(block["timestamp"], 16) > 0
        receipt = await s.rpc.receipt(beat.tx_hash)
        assert receipt is not None and receipt["status"] == "0x1"
        tx = await s.rpc.call("eth_getTransactionByHash", [beat.tx_hash])
        assert to_checksum_address(tx["to"]) == chain.status_registry
        assert tx["input"][:10] == "0x2bf4d6a7"
        # what was signed is what was sent: the metrics and a status code of 0
        _sid, _bid, code, sent_metrics, ts, sig = decode(
            ["uint64", "uint64", "uint8", "bytes", "uint64", "bytes"], bytes.fromhex(tx["input"][10:])
        )
        assert (code, sent_metrics, ts, len(sig)) == (0, encode_metrics(metrics), beat.timestamp, 65)
        # a later heartbeat moves getLastHeartbeat
        chain.rpc("evm_increaseTime", [30])
        await s.heartbeat.beat()
        assert await last_heartbeat(s.rpc, chain) >= first + 30


async def test_stale_or_future_timestamps_are_never_sent(real_tangle: RealTangleChain, tmp_path: Path) -> None:
    """On a chain idle for 10 minutes the latest block's time is stale by the next block: the
    simulation says so, the heartbeat is signed again with the simulated block's time, and exactly one
    (successful) transaction goes out. A timestamp from the future is refused by the simulation: no
    transaction at all."""
    chain = real_tangle
    async with running(chain, tmp_path) as s:
        start = await s.rpc.block_number()
        latest = await s.rpc.get_block("latest")
        assert latest is not None
        chain.rpc("evm_increaseTime", [600])
        beat = await s.heartbeat.beat()
        assert beat.timestamp >= int(latest["timestamp"], 16) + 600
        with pytest.raises(ContractRevert) as info:
            await s.heartbeat.send(0, b"", beat.timestamp + 3600)
        assert info.value.name == "HeartbeatFromFuture"
        with pytest.raises(ContractRevert) as info:
            await s.heartbeat.send(0, b"", beat.timestamp - 3600)
        assert info.value.name == "HeartbeatStale"
        sent = await transactions_from(s.rpc, chain.operator, start + 1)
        assert [(tx["hash"], r["status"]) for tx, r in sent] == [(beat.tx_hash, "0x1")]
        assert await is_online(s.rpc, chain) is True


async def test_heartbeats_and_results_share_one_nonce_sequence(real_tangle: RealTangleChain, tmp_path: Path) -> None:
    """Results and heartbeats sent at the same time from one key: every transaction is mined, the
    nonces are consecutive, and no result waits for a heartbeat."""
    chain = real_tangle
    async with running(chain, tmp_path) as s:
        start = await s.rpc.block_number()
        nonce0 = await s.rpc.nonce(chain.operator)
        ids = [(await submit_job(s.rpc, chain, 0, encode(["string"], [f"vm-{i}"])))[0] for i in range(3)]
        beats = [asyncio.create_task(s.heartbeat.beat())]
        for call_id in ids:
            s.state.finish(chain.service_id, call_id, TRUE)
            s.consumer.wake()
        beats.append(asyncio.create_task(s.heartbeat.beat()))
        done = await asyncio.wait_for(asyncio.gather(*beats), 30)
        await wait_for(lambda: len(s.recorder.submitted) == 3, 20, "three results")
        sent = await transactions_from(s.rpc, chain.operator, start)
        assert all(r["status"] == "0x1" for _, r in sent)
        assert sorted(int(tx["nonce"], 16) for tx, _ in sent) == list(range(nonce0, nonce0 + len(sent)))
        assert {b.tx_hash for b in done} <= {tx["hash"] for tx, _ in sent}
        assert await is_online(s.rpc, chain) is True


async def test_an_rpc_outage_is_logged_once_and_survived(real_tangle: RealTangleChain, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    chain = real_tangle
    async with running(chain, tmp_path) as s:
        real_url = s.rpc.url
        s.rpc.url = "http://127.0.0.1:9"  # nothing listens there
        hb = s.heartbeat
        with caplog.at_level("DEBUG", logger="microvm_blueprint.tangle.heartbeat"):
            await hb._beat_logged()
            await hb._beat_logged()
            warnings = [r for r in caplog.records if r.levelname == "WARNING" and "heartbeat not sent" in r.message]
            assert len(warnings) == 1 and hb.failed == 2 and hb.sent == 0
            s.rpc.url = real_url
            await hb._beat_logged()
        assert hb.sent == 1
        assert any("heartbeats resumed" in r.message for r in caplog.records)
        assert await is_online(s.rpc, chain) is True


async def test_the_operator_beats_every_interval(real_tangle: RealTangleChain, tmp_path: Path) -> None:
    """The whole operator (in-process, in-memory VMs) with HEARTBEAT_INTERVAL_SECS=1: online at once,
    getLastHeartbeat moves with later beats, the heartbeat carries the VM and job counts, and /metrics
    shows the last one."""
    import httpx

    from microvm_blueprint.blueprint.operator import Operator
    from microvm_blueprint.blueprint.settings import OperatorSettings
    from microvm_blueprint.tangle.environment import BlueprintEnvironment

    chain = real_tangle
    operator_key(tmp_path, chain.operator_key)
    env = BlueprintEnvironment.load({
        "HTTP_RPC_URL": chain.rpc_url, "DATA_DIR": str(tmp_path / "op"), "KEYSTORE_URI": str(tmp_path / "keystore"),
        "BLUEPRINT_ID": "0", "SERVICE_ID": "0", "TANGLE_CONTRACT": chain.tangle,
        "STATUS_REGISTRY_CONTRACT": chain.status_registry, "HEARTBEAT_INTERVAL_SECS": "1", "POLL_INTERVAL": "0.1",
    })
    settings = OperatorSettings.from_env({}, env.data_dir, api_host="127.0.0.1", api_port=0)
    op = Operator.assemble(env, settings)
    assert op.heartbeat is not None
    task = asyncio.create_task(op.run())
    rpc = JsonRpc(chain.rpc_url)
    try:
        await wait_for(lambda: op.runner.ready.is_set() or task.done(), 30, "the operator")
        assert not task.done()
        await wait_for(lambda: is_online(rpc, chain), 20, "isOnline")
        first = await last_heartbeat(rpc, chain)
        chain.rpc("evm_increaseTime", [5])
        await wait_for(lambda: _after(rpc, chain, first), 20, "a later heartbeat")
        hb = op.heartbeat
        assert hb.last is not None and hb.failed == 0
        tx = await rpc.call("eth_getTransactionByHash", [hb.last.tx_hash])
        _sid, _bid, code, sent_metrics, _ts, _sig = decode(
            ["uint64", "uint64", "uint8", "bytes", "uint64", "bytes"], bytes.fromhex(tx["input"][10:])
        )
        assert code == 0
        (pairs,) = decode(["(string,uint256)[]"], sent_metrics)
        assert [name for name, _ in pairs] == ["vms_running", "vms_total", "jobs_done", "jobs_failed",
                                               "guest_memory_mib"]
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(f"{op.server.url}/metrics")).text
        (line,) = [x for x in text.splitlines() if x.startswith("blueprint_last_heartbeat ")]
        assert int(line.split()[1]) >= hb.last.timestamp - 5 > 0
    finally:
        op.stop()
        await asyncio.wait_for(task, 30)
        await rpc.aclose()


async def _after(rpc: JsonRpc, chain: RealTangleChain, first: int) -> bool:
    return await last_heartbeat(rpc, chain) > first


async def test_a_heartbeat_in_flight_never_holds_a_result_back(real_tangle: RealTangleChain, tmp_path: Path) -> None:
    """With mining paused, a heartbeat waits in the pool; a result finished meanwhile is sent at once
    (it does not wait for the heartbeat's receipt to gather into a batch)."""
    chain = real_tangle
    async with running(chain, tmp_path) as s:
        call_id = (await submit_job(s.rpc, chain, 0, encode(["string"], ["vm-x"])))[0]
        chain.rpc("evm_setAutomine", [False])
        try:
            beat = asyncio.create_task(s.heartbeat.beat())
            await wait_for(lambda: any(fl.extra is not None for fl in s.consumer._in_flight.values()), 10,
                           "the heartbeat in flight")
            s.state.finish(chain.service_id, call_id, TRUE)
            s.consumer.wake()
            await wait_for(lambda: (s.state.outbox_status(chain.service_id, call_id) or ("",))[0] == "sent", 5,
                           "the result sent while the heartbeat is unmined")
            assert not beat.done()
            chain.rpc("evm_mine", [])
        finally:
            chain.rpc("evm_setAutomine", [True])
        await asyncio.wait_for(beat, 20)
        await wait_for(lambda: call_id in s.recorder.submitted, 20, "the result mined")
        assert await is_online(s.rpc, chain) is True
