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
from .errors import RpcError, TangleError


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
        except httpx.HTTPError as exc:
            raise RpcError(f"{method}: chain RPC unreachable at {self.url}: {type(exc).__name__}") from exc
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

    # ---- typed helpers ----

    async def chain_id(self) -> int:
        return int(await self.call("eth_chainId", []), 16)

    async def block_number(self) -> int:
        return int(await self.call("eth_blockNumber", []), 16)

    async def get_block(self, number: int | str) -> dict[str, Any] | None:
        tag = _hex(number) if isinstance(number, int) else number
        result = await self.call("eth_getBlockByNumber", [tag, False])
        return result if isinstance(result, dict) else None

    async def get_logs(self, *, address: str, topics: list[Any], from_block: int, to_block: int) -> list[dict[str, Any]]:
        result = await self.call(
            "eth_getLogs",
            [{"address": address, "topics": topics, "fromBlock": _hex(from_block), "toBlock": _hex(to_block)}],
        )
        if not isinstance(result, list):
            raise RpcError("eth_getLogs: unexpected result")
        return result

    async def eth_call(self, to: str, data: bytes, sender: str | None = None, block: str = "latest") -> bytes:
        tx: dict[str, Any] = {"to": to, "data": "0x" + data.hex()}
        if sender:
            tx["from"] = sender
        result = await self.call("eth_call", [tx, block])
        return bytes.fromhex(str(result)[2:])

    async def estimate_gas(self, to: str, data: bytes, sender: str) -> int:
        result = await self.call("eth_estimateGas", [{"to": to, "data": "0x" + data.hex(), "from": sender}])
        return int(result, 16)

    async def gas_price(self) -> int:
        return int(await self.call("eth_gasPrice", []), 16)

    async def nonce(self, address: str, block: str = "pending") -> int:
        return int(await self.call("eth_getTransactionCount", [address, block]), 16)

    async def send_raw(self, raw: bytes) -> str:
        return str(await self.call("eth_sendRawTransaction", ["0x" + raw.hex()]))

    async def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        result = await self.call("eth_getTransactionReceipt", [tx_hash])
        return result if isinstance(result, dict) else None
