"""What a hostile or broken node answers to the typed helpers: always an RpcError, never a bare
KeyError or ValueError. A real HTTP server on loopback plays the node, one canned body at a time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from microvm_blueprint.tangle.errors import RpcError
from microvm_blueprint.tangle.rpc import ContractRevert, JsonRpc

GOOD_HASH = "0x" + "ab" * 32


class CannedNode:
    """Answers every JSON-RPC request with ``result`` (HTTP/1.1, keep-alive)."""

    def __init__(self) -> None:
        self.result: Any = None
        self.error: dict[str, Any] | None = None  # answered instead of ``result`` when set
        self.batch: list[dict[str, Any]] = []  # for a batch: {"result": ...} or {"error": ...} per call
        self.server: asyncio.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                request = json.loads(await reader.readexactly(length))
                if isinstance(request, list):  # a batch: one canned answer per call, in order
                    body = json.dumps([{"jsonrpc": "2.0", "id": r["id"], **a}
                                       for r, a in zip(request, self.batch, strict=False)]).encode()
                else:
                    answer = {"error": self.error} if self.error is not None else {"result": self.result}
                    body = json.dumps({"jsonrpc": "2.0", "id": request["id"], **answer}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def node() -> AsyncIterator[tuple[CannedNode, JsonRpc]]:
    canned = CannedNode()
    canned.server = await asyncio.start_server(canned._client, "127.0.0.1", 0)
    rpc = JsonRpc(f"http://127.0.0.1:{canned.server.sockets[0].getsockname()[1]}", timeout=5)
    yield canned, rpc
    await rpc.aclose()
    canned.server.close()


async def test_head_block_reads_number_and_hash(node: tuple[CannedNode, JsonRpc]) -> None:
    canned, rpc = node
    canned.result = {"number": "0x1f", "hash": GOOD_HASH, "parentHash": "0x" + "00" * 32}
    assert await rpc.head_block() == (31, GOOD_HASH)


@pytest.mark.parametrize("answer", [
    None,
    [],
    "0x1f",
    {"hash": GOOD_HASH},
    {"number": None, "hash": GOOD_HASH},
    {"number": "thirty-one", "hash": GOOD_HASH},
    {"number": 31, "hash": GOOD_HASH},
    {"number": "0x1f"},
    {"number": "0x1f", "hash": "0x1234"},
    {"number": "0x1f", "hash": 12},
    {"number": "0x1f", "hash": "0x" + "zz" * 32},
    {"number": "0x1f", "hash": "0x" + "ab" * 10_000},
])
async def test_a_malformed_head_is_an_rpc_error(node: tuple[CannedNode, JsonRpc], answer: Any) -> None:
    canned, rpc = node
    canned.result = answer
    with pytest.raises(RpcError):
        await rpc.head_block()


HEAD = {"number": "0x1f", "hash": GOOD_HASH}


async def test_head_and_hash_reads_both_in_one_request(node: tuple[CannedNode, JsonRpc]) -> None:
    canned, rpc = node
    other = "0x" + "cd" * 32
    canned.batch = [{"result": HEAD}, {"result": {"number": "0x1e", "hash": other}}]
    assert await rpc.head_and_hash(30) == ((31, GOOD_HASH), other)
    canned.batch = [{"result": HEAD}, {"result": None}]  # no such block: the chain got shorter
    assert await rpc.head_and_hash(40) == ((31, GOOD_HASH), None)


@pytest.mark.parametrize("batch", [
    [{"result": HEAD}, {"result": "0x1e"}],
    [{"result": HEAD}, {"result": {"hash": "0x1234"}}],
    [{"result": HEAD}, {"result": {"hash": "0x" + "ab" * 10_000}}],
    [{"result": HEAD}, {"error": {"code": -32000, "message": "header not found"}}],
    [{"error": {"code": -32000, "message": "busy"}}, {"result": HEAD}],
    [{"result": None}, {"result": HEAD}],
    [{"result": {"number": "0x1f"}}, {"result": HEAD}],
    [{"result": HEAD}],  # an answer missing
    [],
])
async def test_a_malformed_head_and_hash_is_an_rpc_error(
    node: tuple[CannedNode, JsonRpc], batch: list[dict[str, Any]]
) -> None:
    canned, rpc = node
    canned.batch = batch
    with pytest.raises(RpcError):
        await rpc.head_and_hash(30)


JOB_CALL_NOT_FOUND = "0x96c6ebfc" + "00" * 64  # JobCallNotFound(0, 999999)'s selector, zero arguments here

# (what the node answered as the JSON-RPC error, whether it is a revert, its code, its revert name).
# The anvil rows are answers anvil 1.x gave to eth_estimateGas / eth_call against the dev contract.
ERRORS: list[tuple[str, dict[str, Any], bool, int | None, str | None]] = [
    ("anvil: custom error", {"code": 3, "message": "execution reverted: custom error 0x96c6ebfc: \u0000\u0000",
                             "data": JOB_CALL_NOT_FOUND}, True, 3, "JobCallNotFound"),
    ("anvil: revert without data", {"code": 3, "message": "execution reverted", "data": "0x"}, True, 3, None),
    ("anvil: not a revert (-32000)", {"code": -32000, "message": "intrinsic gas too high -- "
                                      "CallGasCostMoreThanGasLimit"}, False, -32000, None),
    ("anvil: insufficient funds", {"code": -32003, "message": "Insufficient funds for gas * price + value"},
     False, -32003, None),
    ("anvil: unknown method", {"code": -32601, "message": "Method not found"}, False, -32601, None),
    ("nested revert data", {"code": -32603, "message": "Error: VM Exception while processing transaction",
                            "data": {"data": JOB_CALL_NOT_FOUND}}, True, -32603, "JobCallNotFound"),
    ("-32015 VM execution error", {"code": -32015, "message": "VM execution error.",
                                   "data": "Reverted " + JOB_CALL_NOT_FOUND}, True, -32015, "JobCallNotFound"),
    ("-32000 with revert data", {"code": -32000, "message": "execution reverted",
                                 "data": JOB_CALL_NOT_FOUND}, True, -32000, "JobCallNotFound"),
    # the word alone decides nothing: no revert code, no revert data
    ("'revert' in an unrelated message", {"code": -32603, "message": "internal error: revert cache unavailable"},
     False, -32603, None),
    ("-32000 execution reverted, no data", {"code": -32000, "message": "execution reverted"}, False, -32000, None),
    ("data that is not revert data", {"code": -32602, "message": "invalid argument 0",
                                      "data": "hex string without 0x prefix"}, False, -32602, None),
]


@pytest.mark.parametrize(("error", "is_revert", "code", "name"), [row[1:] for row in ERRORS],
                         ids=[row[0] for row in ERRORS])
async def test_an_error_answer_keeps_what_was_asked_and_answered(
    node: tuple[CannedNode, JsonRpc], error: dict[str, Any], is_revert: bool, code: int | None, name: str | None
) -> None:
    canned, rpc = node
    canned.batch = [{"error": error}]
    (answer,) = await rpc.batch([("eth_estimateGas", [{"to": "0x" + "11" * 20, "data": "0x"}])])
    assert isinstance(answer, ContractRevert if is_revert else RpcError)
    assert answer.method == "eth_estimateGas" and answer.code == code
    if isinstance(answer, ContractRevert):
        assert answer.name == name
    else:
        assert answer.data == error.get("data")
        assert str(answer).startswith("eth_estimateGas: ")
    canned.error = error
    with pytest.raises(ContractRevert if is_revert else RpcError) as raised:  # the same, raised by call()
        await rpc.call("eth_estimateGas", [{"to": "0x" + "11" * 20, "data": "0x"}])
    assert isinstance(raised.value, ContractRevert | RpcError)  # (pytest types it as their base)
    assert raised.value.code == code


async def test_a_malformed_answer_names_its_method(node: tuple[CannedNode, JsonRpc]) -> None:
    canned, rpc = node
    canned.result = "not a quantity"
    with pytest.raises(RpcError) as raised:
        await rpc.gas_price()
    assert raised.value.method == "eth_gasPrice" and raised.value.code is None


async def test_wait_receipt_returns_the_receipt_once_mined_and_none_past_its_deadline(
        node: tuple[CannedNode, JsonRpc]) -> None:
    canned, rpc = node
    canned.result = None  # not mined
    assert await rpc.wait_receipt(GOOD_HASH, 0.2, every=0.02) is None

    async def mine_later() -> None:
        await asyncio.sleep(0.1)  # the node's answer changes while the wait polls
        canned.result = {"status": "0x1", "transactionHash": GOOD_HASH}

    canned.result = None
    miner = asyncio.create_task(mine_later())
    receipt = await rpc.wait_receipt(GOOD_HASH, 10, every=0.02)
    await miner
    assert receipt == {"status": "0x1", "transactionHash": GOOD_HASH}
    canned.result = "not a receipt"
    with pytest.raises(RpcError):
        await rpc.wait_receipt(GOOD_HASH, 1)
