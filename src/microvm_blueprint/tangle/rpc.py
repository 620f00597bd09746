"""A small async JSON-RPC client for the chain (httpx), with errors mapped into the Tangle tree.

It speaks the dozen ``eth_*`` methods the operator and the customer use, keeps one HTTP connection
pool, and turns every transport or protocol failure into :class:`RpcError` and every revert into :class:`ContractRevert`.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from .contracts import REVERT_NAMES
from .errors import RpcError, RpcUnavailable, TangleError

#: JSON-RPC error codes that mean "the EVM reverted": 3 (geth, anvil, reth: execution reverted, with
#: the revert data) and -32015 (OpenEthereum/Nethermind style "VM execution error").
REVERT_CODES = frozenset({3, -32015})


class ContractRevert(TangleError):
    """A call or gas estimate reverted. ``data`` is the revert data (``0x`` + selector + arguments,
    ``None`` when the node gave none), ``name`` the custom error's name when known; ``method`` and
    ``code`` are what was asked and the JSON-RPC error code answered."""

    def __init__(self, message: str, data: str | None, *, method: str | None = None, code: int | None = None) -> None:
        self.data = data
        self.method = method
        self.code = code
        self.selector = data[:10] if data and len(data) >= 10 else None
        self.name = REVERT_NAMES.get(self.selector or "", None)
        super().__init__(f"reverted: {self.name or message}")


def _fail(method: str, text: str, *, code: int | None = None, data: object = None) -> RpcError:
    return RpcError(f"{method}: {text}", method=method, code=code, data=data)


def redact_url(url: str) -> str:
    """``scheme://host:port`` of an RPC URL, for logs and errors: providers put API keys in the path,
    the query or the user part (``https://eth.example/v2/KEY``), so those show as ``/***``."""
    try:
        parsed = urlsplit(url)
        host = parsed.hostname or "?"
        port = f":{parsed.port}" if parsed.port else ""
    except ValueError:
        return "(malformed URL)"
    if ":" in host:
        host = f"[{host}]"
    hidden = parsed.path not in ("", "/") or parsed.query or parsed.fragment or "@" in parsed.netloc
    return f"{parsed.scheme}://{host}{port}{'/***' if hidden else ''}"


_HASH = re.compile(r"0x[0-9a-fA-F]{64}")


def _hex(value: int) -> str:
    return hex(value)


class JsonRpc:
    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self._ids = itertools.count(1)
        #: requests that failed in transport or protocol (not reverts): the metrics and the heartbeat read it
        self.errors = 0
        self._client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16)
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, method: str, what: str, payload: Any) -> Any:
        try:
            return await self._post_once(method, what, payload)
        except RpcError:
            self.errors += 1
            raise

    async def _post_once(self, method: str, what: str, payload: Any) -> Any:
        try:
            response = await self._client.post(self.url, json=payload)
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise RpcUnavailable(
                f"{what}: chain RPC unreachable at {redact_url(self.url)}: {type(exc).__name__}", method=method
            ) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise RpcUnavailable(f"{what}: chain RPC answered HTTP {response.status_code}", method=method)
        if response.status_code != 200:
            raise RpcError(f"{what}: chain RPC answered HTTP {response.status_code}", method=method)
        try:
            return response.json()
        except ValueError as exc:
            raise RpcError(f"{what}: chain RPC answered non-JSON", method=method) from exc

    async def call(self, method: str, params: list[Any]) -> Any:
        payload = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        result = _answer(method, await self._post(method, method, payload))
        if isinstance(result, TangleError):
            raise result
        return result

    async def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Several calls in one HTTP request (JSON-RPC batch). Returns one entry per call, in order: its
        result, or the :class:`RpcError` / :class:`ContractRevert` it answered (not raised, so one bad
        entry does not hide the others). Raises when the batch as a whole fails."""
        if not calls:
            return []
        ids = [next(self._ids) for _ in calls]
        payload = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in zip(ids, calls, strict=True)]
        what = f"batch of {len(calls)} ({calls[0][0]}...)"
        body = await self._post("batch", what, payload)
        if not isinstance(body, list):
            raise RpcError(f"{what}: chain RPC answered an unexpected shape", method="batch")
        by_id = {e.get("id"): e for e in body if isinstance(e, dict)}
        out: list[Any] = []
        for i, (method, _) in zip(ids, calls, strict=True):
            entry = by_id.get(i)
            out.append(_fail(method, "no answer in the batch") if entry is None else _answer(method, entry))
        return out

    # ---- typed helpers (a malformed answer is an RpcError, never a bare ValueError) ----

    async def chain_id(self) -> int:
        return _quantity("eth_chainId", await self.call("eth_chainId", []))

    async def block_number(self) -> int:
        return _quantity("eth_blockNumber", await self.call("eth_blockNumber", []))

    async def get_block(self, number: int | str) -> dict[str, Any] | None:
        tag = _hex(number) if isinstance(number, int) else number
        result = await self.call("eth_getBlockByNumber", [tag, False])
        if result is not None and not isinstance(result, dict):
            raise _fail("eth_getBlockByNumber", "unexpected result")
        return result

    async def head_block(self) -> tuple[int, str]:
        """``(number, hash)`` of the newest block, in one request (a poll needs both)."""
        return _head(await self.get_block("latest"))

    async def head_and_hash(self, number: int) -> tuple[tuple[int, str], str | None]:
        """``(number, hash)`` of the newest block and the hash of block ``number`` (``None`` when the
        node has no such block), in one request: a poll checks that the block it read last is still
        on the chain (a reorg replaces it)."""
        head, block = await self.batch(
            [("eth_getBlockByNumber", ["latest", False]), ("eth_getBlockByNumber", [_hex(number), False])]
        )
        for answer in (head, block):
            if isinstance(answer, TangleError):
                raise answer
        if block is None:
            return _head(head), None
        if not isinstance(block, dict):
            raise _fail("eth_getBlockByNumber", "unexpected result")
        return _head(head), _block_hash(block)

    async def get_logs(self, *, address: str, topics: list[Any], from_block: int, to_block: int) -> list[dict[str, Any]]:
        result = await self.call(
            "eth_getLogs",
            [{"address": address, "topics": topics, "fromBlock": _hex(from_block), "toBlock": _hex(to_block)}],
        )
        if not isinstance(result, list) or not all(isinstance(e, dict) for e in result):
            raise _fail("eth_getLogs", "unexpected result")
        return result

    async def eth_call(self, to: str, data: bytes, sender: str | None = None, block: str = "latest") -> bytes:
        tx: dict[str, Any] = {"to": to, "data": "0x" + data.hex()}
        if sender:
            tx["from"] = sender
        return _data("eth_call", await self.call("eth_call", [tx, block]))

    async def estimate_gas(self, to: str, data: bytes, sender: str) -> int:
        result = await self.call("eth_estimateGas", [{"to": to, "data": "0x" + data.hex(), "from": sender}])
        return _quantity("eth_estimateGas", result)

    async def gas_price(self) -> int:
        return _quantity("eth_gasPrice", await self.call("eth_gasPrice", []))

    async def nonce(self, address: str, block: str = "pending") -> int:
        return _quantity("eth_getTransactionCount", await self.call("eth_getTransactionCount", [address, block]))

    async def send_raw(self, raw: bytes) -> str:
        result = await self.call("eth_sendRawTransaction", ["0x" + raw.hex()])
        if not isinstance(result, str) or not result.startswith("0x"):
            raise _fail("eth_sendRawTransaction", "unexpected result")
        return result

    async def receipts(self, tx_hashes: Sequence[str]) -> list[dict[str, Any] | RpcError | None]:
        """Receipts of several transactions in one request; an entry that failed is its RpcError."""
        answers = await self.batch([("eth_getTransactionReceipt", [h]) for h in tx_hashes])
        out: list[dict[str, Any] | RpcError | None] = []
        for a in answers:
            if isinstance(a, RpcError) or a is None or isinstance(a, dict):
                out.append(a)
            elif isinstance(a, TangleError):
                out.append(_fail("eth_getTransactionReceipt", str(a)))
            else:
                out.append(_fail("eth_getTransactionReceipt", "unexpected result"))
        return out

    async def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        result = await self.call("eth_getTransactionReceipt", [tx_hash])
        if result is not None and not isinstance(result, dict):
            raise _fail("eth_getTransactionReceipt", "unexpected result")
        return result

    async def wait_receipt(self, tx_hash: str, timeout: float, *, every: float = 0.1) -> dict[str, Any] | None:
        """The receipt of ``tx_hash`` once it is mined, asked every ``every`` seconds; ``None`` when it
        is not mined within ``timeout`` seconds (the caller says what that means)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (receipt := await self.receipt(tx_hash)) is None:
            if loop.time() > deadline:
                return None
            await asyncio.sleep(every)
        return receipt


def _block_hash(block: dict[str, Any]) -> str:
    block_hash = block.get("hash")
    if not isinstance(block_hash, str) or not _HASH.fullmatch(block_hash):
        raise _fail("eth_getBlockByNumber", "malformed block hash")
    return block_hash


def _head(block: Any) -> tuple[int, str]:
    if block is None:
        raise _fail("eth_getBlockByNumber(latest)", "no block")
    if not isinstance(block, dict):
        raise _fail("eth_getBlockByNumber(latest)", "unexpected result")
    return _quantity("eth_getBlockByNumber", block.get("number")), _block_hash(block)


def _answer(method: str, body: Any) -> Any:
    """A JSON-RPC response object -> its result, or the error it carries (returned, not raised)."""
    if not isinstance(body, dict):
        return _fail(method, "chain RPC answered an unexpected shape")
    if body.get("error"):
        err = body["error"]
        message = str(err.get("message", "")) if isinstance(err, dict) else str(err)
        raw_code = err.get("code") if isinstance(err, dict) else None
        code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        data = err.get("data") if isinstance(err, dict) else None
        revert_data = _revert_data(data)
        if code in REVERT_CODES or (revert_data is not None and len(revert_data) >= 10):
            return ContractRevert(message, revert_data, method=method, code=code)
        return _fail(method, message[:300], code=code, data=data)
    return body.get("result")


_REVERT_DATA = re.compile(r"0x(?:[0-9a-fA-F]{2})*")


def _revert_data(data: Any) -> str | None:
    """The revert data in a JSON-RPC error's ``data`` (``0x``-hex; nested as ``{"data": ...}`` by some
    nodes, prefixed ``Reverted `` by OpenEthereum-style ones), or ``None``."""
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str):
        text = data.removeprefix("Reverted ").strip()
        if _REVERT_DATA.fullmatch(text):
            return text
    return None


def _quantity(method: str, value: Any) -> int:
    """A JSON-RPC QUANTITY (``0x``-prefixed hex) as an int."""
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise _fail(method, f"expected a hex quantity, got {str(value)[:40]!r}")


def _data(method: str, value: Any) -> bytes:
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            pass
    raise _fail(method, f"expected hex data, got {str(value)[:40]!r}")
