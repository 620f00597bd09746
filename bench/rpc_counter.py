"""A loopback HTTP proxy in front of a JSON-RPC node that counts what an operator asks of it.

Point ``HTTP_RPC_URL`` at :attr:`CountingProxy.url`: each HTTP request is forwarded to the node as it
came and counted, and so is each JSON-RPC call in it by method (a batch is one request of several
calls). The idle benchmark (``bench/idle.py``) and the idle-cost chain test read the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Counts:
    """What passed through the proxy so far: HTTP requests, and JSON-RPC calls by method."""

    requests: int
    methods: Counter[str]

    def __sub__(self, earlier: Counts) -> Counts:
        return Counts(self.requests - earlier.requests, self.methods - earlier.methods)


class CountingProxy:
    """HTTP/1.1 keep-alive proxy (POST with ``Content-Length``, as JSON-RPC clients send) on loopback."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests = 0
        self.methods: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def counts(self) -> Counts:
        """A snapshot; subtract two to count what a stretch of time sent."""
        return Counts(self.requests, Counter(self.methods))

    async def start(self) -> CountingProxy:
        self._client = httpx.AsyncClient(timeout=30)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._client is not None:
            await self._client.aclose()

    async def __aenter__(self) -> CountingProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _count(self, body: bytes) -> None:
        self.requests += 1
        try:
            payload = json.loads(body)
        except ValueError:
            self.methods["(not JSON)"] += 1
            return
        for call in payload if isinstance(payload, list) else [payload]:
            self.methods[str(call.get("method")) if isinstance(call, dict) else "(malformed)"] += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._client is not None
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self._count(body)
                answer = await self._client.post(self.upstream, content=body,
                                                 headers={"content-type": "application/json"})
                writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                             % (answer.status_code, answer.reason_phrase.encode(), len(answer.content)))
                writer.write(answer.content)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, httpx.HTTPError,
                ValueError):
            pass  # the client left, or sent what this proxy does not speak: drop the connection
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
