"""Helpers for the tangle layer's chain tests: customer calls, operator audits, a closable TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from eth_abi import decode, encode
from eth_utils import to_checksum_address

from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.calls import JobCall
from microvm_blueprint.tangle.consumer import TangleConsumer, submit_result_data
from microvm_blueprint.tangle.keystore import OperatorKey, import_key
from microvm_blueprint.tangle.producer import TangleProducer
from microvm_blueprint.tangle.rpc import JsonRpc
from microvm_blueprint.tangle.state import TangleState

from .conftest import RealTangleChain

SUBMIT_JOB = contracts.selector_bytes(contracts.SUBMIT_JOB)


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; fail after ``timeout`` seconds (never a sleep for luck)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def send_as(rpc: JsonRpc, sender: str, to: str, data: bytes) -> dict[str, Any]:
    """Send from an anvil-unlocked account and return the mined receipt (anvil automines)."""
    tx = {"from": sender, "to": to, "data": "0x" + data.hex(), "gas": hex(5_000_000)}
    tx_hash = str(await rpc.call("eth_sendTransaction", [tx]))
    receipt = None

    async def mined() -> bool:
        nonlocal receipt
        receipt = await rpc.receipt(tx_hash)
        return receipt is not None

    await wait_for(mined, 20, f"receipt of {tx_hash}")
    assert receipt is not None
    return receipt


async def submit_job(rpc: JsonRpc, chain: RealTangleChain, job_index: int, inputs: bytes) -> tuple[int, dict[str, Any]]:
    """``submitJob`` as the customer (anvil key #0); returns (call id, receipt)."""
    data = SUBMIT_JOB + encode(["uint64", "uint8", "bytes"], [chain.service_id, job_index, inputs])
    receipt = await send_as(rpc, chain.customer, chain.tangle, data)
    assert receipt["status"] == "0x1", receipt
    for entry in receipt["logs"]:
        if entry["topics"][0] == contracts.TOPIC_JOB_SUBMITTED and entry["address"].lower() == chain.tangle.lower():
            return int(entry["topics"][2], 16), receipt
    raise AssertionError("no JobSubmitted log in the receipt")


async def submit_result_directly(rpc: JsonRpc, chain: RealTangleChain, call_id: int, output: bytes) -> dict[str, Any]:
    """The operator's result sent outside the consumer (a replay/race as seen by the consumer)."""
    receipt = await send_as(rpc, chain.operator, chain.tangle, submit_result_data(chain.service_id, call_id, output))
    assert receipt["status"] == "0x1", receipt
    return receipt


async def results_on_chain(rpc: JsonRpc, chain: RealTangleChain, from_block: int = 0) -> dict[int, list[bytes]]:
    """call id -> outputs of every ``JobResultSubmitted`` for our service (exactly-once checks)."""
    logs = await rpc.get_logs(
        address=chain.tangle,
        topics=[contracts.TOPIC_JOB_RESULT_SUBMITTED, "0x" + chain.service_id.to_bytes(32, "big").hex()],
        from_block=from_block, to_block=await rpc.block_number(),
    )
    out: dict[int, list[bytes]] = {}
    for entry in logs:
        (result,) = decode(["bytes"], bytes.fromhex(entry["data"][2:]))
        out.setdefault(int(entry["topics"][2], 16), []).append(result)
    return out


async def transactions_from(rpc: JsonRpc, sender: str, from_block: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (transaction, receipt) sent by ``sender`` since ``from_block``."""
    out = []
    for n in range(from_block, await rpc.block_number() + 1):
        block = await rpc.call("eth_getBlockByNumber", [hex(n), True])
        for tx in block["transactions"]:
            if to_checksum_address(tx["from"]) == to_checksum_address(sender):
                receipt = await rpc.receipt(tx["hash"])
                assert receipt is not None
                out.append((tx, receipt))
    return out


async def job_call(rpc: JsonRpc, chain: RealTangleChain, call_id: int) -> tuple[Any, ...]:
    data = contracts.selector_bytes(contracts.GET_JOB_CALL) + encode(
        ["uint64", "uint64"], [chain.service_id, call_id]
    )
    (value,) = decode(["(uint8,address,uint64,uint32,bool,bool,uint256)"], await rpc.eth_call(chain.tangle, data))
    return tuple(value)


def operator_key(tmp: Path, secret: str) -> OperatorKey:
    return import_key(tmp / "keystore", secret)


class Recorder:
    """Collects what the consumer reports to its observer."""

    def __init__(self) -> None:
        self.submitted: dict[int, str] = {}
        self.dropped: dict[int, str] = {}

    def on_received(self, call: JobCall, job: str) -> None: ...
    def on_done(self, call: JobCall, output: bytes) -> None: ...
    def on_failed(self, call: JobCall, error: str) -> None: ...

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        assert call_id not in self.submitted, f"call {call_id} reported submitted twice"
        self.submitted[call_id] = tx_hash

    def on_dropped(self, call_id: int, reason: str) -> None:
        self.dropped[call_id] = reason


class Pipeline:
    """A producer and a consumer over one state file, with the runner's hand-over reduced to its core:
    each delivered call is recorded (``received``) and, when ``answer`` gives bytes, acknowledged with
    its result (``TangleState.finish``), as the runner does once a handler returns."""

    def __init__(self, chain: RealTangleChain, rpc_url: str, state_path: Path, key: OperatorKey | None, *,
                 from_block: int | None = None, answer: Callable[[JobCall], bytes | None] | None = None,
                 dry_run: bool = False) -> None:
        self.chain = chain
        self.rpc = JsonRpc(rpc_url, timeout=2)
        self.state = TangleState(state_path)
        self.recorder = Recorder()
        self.producer = TangleProducer(
            self.rpc, self.state, contract=chain.tangle, service_id=chain.service_id, from_block=from_block,
            max_range=50, poll_interval=0.05, backoff_cap=0.4,
        )
        self.consumer = TangleConsumer(
            self.rpc, self.state, key, contract=chain.tangle, dry_run=dry_run or key is None, backoff_cap=0.4,
            observer=self.recorder, drain_timeout=5,
        )
        self.answer = answer
        self.received: list[JobCall] = []
        self.queue: asyncio.Queue[JobCall] = asyncio.Queue(maxsize=8)
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _ack(self) -> None:
        while True:
            call = await self.queue.get()
            self.received.append(call)
            if self.answer is not None:
                output = self.answer(call)
                if output is not None:
                    self.state.finish(call.service_id, call.call_id, output)
                    self.consumer.wake()

    async def start(self, *, consumer: bool = True) -> Pipeline:
        self.tasks = [
            asyncio.create_task(self.producer.run(self.queue.put, self.stop_event)),
            asyncio.create_task(self._ack()),
        ]
        if consumer:
            self.tasks.append(asyncio.create_task(self.consumer.run(self.stop_event)))
        return self

    def ids(self) -> list[int]:
        return [c.call_id for c in self.received]

    def finish(self, call_id: int, output: bytes) -> None:
        """Record a call handled with ``output`` (which queues the result), as the runner does."""
        self.state.finish(self.chain.service_id, call_id, output)
        self.consumer.wake()

    async def close(self) -> None:
        self.stop_event.set()
        producer, acker, *rest = self.tasks
        await asyncio.wait_for(producer, 10)
        for task in rest:
            await asyncio.wait_for(task, 10)
        acker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acker
        await self.rpc.aclose()
        self.state.close()


class TcpProxy:
    """A loopback TCP proxy to the chain that can be closed (connections refused, live ones cut) and
    reopened on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.close()
            await self.server.wait_closed()
            self.server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await splice(reader, writer, self.target_port, self.writers)


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target_port: int,
                 writers: set[asyncio.StreamWriter]) -> None:
    """Relay one client connection to 127.0.0.1:``target_port`` both ways until either side closes;
    both writers sit in ``writers`` meanwhile (so a test can cut them)."""
    try:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError:
        writer.close()
        return
    writers |= {writer, up_w}

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    try:
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
    finally:
        writers -= {writer, up_w}


@contextlib.asynccontextmanager
async def producer_running(producer: TangleProducer) -> AsyncIterator[list[JobCall]]:
    """Run ``producer`` in the background; yields the list its calls are delivered into. On exit it is
    stopped (within a deadline) and its state closed."""
    got: list[JobCall] = []

    async def deliver(call: JobCall) -> None:
        got.append(call)

    stop = asyncio.Event()
    task = asyncio.create_task(producer.run(deliver, stop))
    try:
        yield got
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        producer.state.close()
