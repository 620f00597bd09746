"""A WebSocket upgrade on the query API (DESIGN.md §9, #13 item 8): refused with a 4xx, never a 500,
and the server goes on answering. A real WebSocket client against the real server (uvicorn)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.store import Store


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[QueryServer]:
    life = Lifecycle(InMemoryDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    srv = QueryServer(QueryApp(life, None), "127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(srv.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    yield srv
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("path", ["/health", "/vms", "/vms/a/console", "/nowhere"])
async def test_a_websocket_upgrade_gets_a_4xx(server: QueryServer, path: str) -> None:
    url = server.url.replace("http://", "ws://") + path
    with pytest.raises(InvalidStatus) as err:
        async with connect(url, open_timeout=10):
            pass
    status = err.value.response.status_code
    assert status == 403, status  # before: 500 (the app returned without answering the handshake)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/health")).text == "ok"  # and the server is fine


async def test_without_the_http_response_extension_the_upgrade_is_closed(tmp_path: Path) -> None:
    """An ASGI server without ``websocket.http.response``: a close before accept (1008), which servers
    answer with a 403; never a silent return."""
    life = Lifecycle(InMemoryDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await QueryApp(life, None)({"type": "websocket", "path": "/vms", "headers": []}, receive, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008}]
