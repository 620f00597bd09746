"""A small async JSON-RPC client for the chain (httpx), with errors mapped into the Tangle tree.

web3.py's provider stack is heavier than an operator needs on its hot path; this speaks the
dozen ``eth_*`` methods used here, keeps one HTTP connection pool, and turns every transport or
protocol failure into :class:`RpcError` and every revert into :class:`ContractRevert`.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx

from .contracts import ERROR_BY_SELECTOR
from .errors import RpcError, RpcUnavailable, TangleError


class ContractRevert(TangleError):
    """A call or gas estimate reverted. ``name`` is the custom error's name when known."""

    def __init__(self, message: str, data: str | None) -> None:
        self.data = data
        self.selector = data[:10] if data and len(data) >= 10 else None
        self.name = ERROR_BY_SELECTOR.get(self.selector or "", None)
        super().__init__(f"reverted: {self.name or message}")


def _hex(value: int) -> str:
    return hex(value)


class JsonRpc:
    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self._ids = itertools.count(1)
        self._client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16)
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, params: list[Any]) -> Any:
        payload = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        try:
            response = await self._client.post(self.url, json=payload)
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise RpcUnavailable(f"{method}: chain RPC unreachable at {self.url}: {type(exc).__name__}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise RpcUnavailable(f"{method}: chain RPC answered HTTP {response.status_code}")
        if response.status_code != 200:
            raise RpcError(f"{method}: chain RPC answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise RpcError(f"{method}: chain RPC answered non-JSON") from exc
        if not isinstance(body, dict):
            raise RpcError(f"{method}: chain RPC answered an unexpected shape")
        if body.get("error"):
            err = body["error"]
            message = str(err.get("message", "")) if isinstance(err, dict) else str(err)
            data = err.get("data") if isinstance(err, dict) else None
            if isinstance(data, dict):
                data = data.get("data")
            if "revert" in message.lower() or (isinstance(data, str) and data.startswith("0x") and len(data) >= 10):
                raise ContractRevert(message, data if isinstance(data, str) else None)
            raise RpcError(f"{method}: {message[:300]}")
        return body.get("result")

    # ---- typed helpers (a malformed answer is an RpcError, never a bare ValueError) ----

    async def chain_id(self) -> int:
        return _quantity("eth_chainId", await self.call("eth_chainId", []))

    async def block_number(self) -> int:
        return _quantity("eth_blockNumber", await self.call("eth_blockNumber", []))

    async def get_block(self, number: int | str) -> dict[str, Any] | None:
        tag = _hex(number) if isinstance(number, int) else number
        result = await self.call("eth_getBlockByNumber", [tag, False])
        if result is not None and not isinstance(result, dict):
            raise RpcError("eth_getBlockByNumber: unexpected result")
        return result

    async def get_logs(self, *, address: str, topics: list[Any], from_block: int, to_block: int) -> list[dict[str, Any]]:
        result = await self.call(
            "eth_getLogs",
            [{"address": address, "topics": topics, "fromBlock": _hex(from_block), "toBlock": _hex(to_block)}],
        )
        if not isinstance(result, list) or not all(isinstance(e, dict) for e in result):
            raise RpcError("eth_getLogs: unexpected result")
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
            raise RpcError("eth_sendRawTransaction: unexpected result")
        return result

    async def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        result = await self.call("eth_getTransactionReceipt", [tx_hash])
        if result is not None and not isinstance(result, dict):
            raise RpcError("eth_getTransactionReceipt: unexpected result")
        return result


def _quantity(method: str, value: Any) -> int:
    """A JSON-RPC QUANTITY (``0x``-prefixed hex) as an int."""
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise RpcError(f"{method}: expected a hex quantity, got {str(value)[:40]!r}")


def _data(method: str, value: Any) -> bytes:
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            pass
    raise RpcError(f"{method}: expected hex data, got {str(value)[:40]!r}")
