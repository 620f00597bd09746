"""The query API shares its event loop with the operator's jobs: no request may hold that loop (issue 11,
item 3), and stopping its server never swallows a cancellation (item 2). Real HTTP, uvicorn on loopback,
a real SQLite store with 10,000 VMs.

No test here measures a time: each checks an order of events that a loop held by one request, or a
swallowed cancellation, cannot produce."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus
from microvm_blueprint.runtime.store import Store

from ..waiting import until

VMS = 10_000
IDS = [f"vm-{i:05d}" for i in range(VMS)]
#: kernel buffers for the slow reader's connection, both ends (fixed, so the kernel does not grow them):
#: with uvicorn's 64 KiB write buffer and the client's own, well under 1 MiB of the 1.7 MB list fits
#: before the server has to wait for the reader
SOCKET_BUFFER = 64 * 1024


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One store of 10,000 VMs for the module (the tests only read it), written through the store's own
    write path (about 2 s; through ``Lifecycle.create_vm`` it takes 10)."""
    path = tmp_path_factory.mktemp("loop") / "s.sqlite3"
    store = Store(path)
    for i, vm_id in enumerate(IDS):
        store.insert_vm(vm_id, VmStatus.CREATED, VmSpec(), "/nonexistent", None, Origin(call_id=i + 1), "create")
    store.close()
    yield path


class Recorder(QueryApp):
    """The query app, noting the path of each response once the server has taken its last body message."""

    def __init__(self, store: Store, state: Path) -> None:
        super().__init__(Lifecycle(InMemoryDriver(), store, state_dir=state), None)
        self.finished: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def noting(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.finished.append(scope["path"])

        await super().__call__(scope, receive, noting)


class Served:
    def __init__(self, app: Recorder) -> None:
        self.app = app
        self.server = QueryServer(app, "127.0.0.1", 0)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self.task = asyncio.create_task(self.server.run(ready))
        await asyncio.wait_for(ready.wait(), 15)

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.wait([self.task], timeout=15)
        assert self.task.done()

    async def slow_reader(self, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Ask for ``path`` on a connection with fixed small buffers and read only the response's head."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.server.bound_port or 0))
        reader, writer = await asyncio.open_connection(sock=sock)
        uv = self.server._server
        assert uv is not None
        await until(lambda: len(uv.server_state.connections) == 1, what="the server to take the connection")
        for protocol in uv.server_state.connections:
            theirs = protocol.transport.get_extra_info("socket")
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200 "), head
        return reader, writer, head


@pytest.fixture
async def served(store_path: Path, tmp_path: Path) -> AsyncIterator[Served]:
    store = Store(store_path)
    s = Served(Recorder(store, tmp_path / "state"))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()
        store.close()


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    """The rest of a chunked body; IncompleteReadError if the server drops the connection first."""
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return bytes(body)
        body += data[:-2]


async def test_health_is_answered_while_a_full_list_waits_for_its_reader(served: Served) -> None:
    """A client that asks for all 10,000 VMs and then reads slowly holds only its own request: /health,
    asked once the list's answer has begun, is answered while the list is still being sent. Before, the
    whole 1.7 MB list was read and encoded in one go on the loop, so by the time its first byte reached
    the client it was complete, and every other request (and job) had waited for it."""
    reader, writer, head = await served.slow_reader("/vms")
    async with httpx.AsyncClient(base_url=served.server.url, timeout=30) as http:
        health = await http.get("/health")
    assert (health.status_code, health.text) == (200, "ok")
    assert served.app.finished == ["/health"], "the full list was complete before /health was answered"
    assert b"transfer-encoding: chunked" in head.lower()
    body = await asyncio.wait_for(_chunked(reader), 60)
    writer.close()
    listed = json.loads(body)
    assert isinstance(listed, list)
    assert [v["vm_id"] for v in listed] == IDS
    assert served.app.finished == ["/health", "/vms"]


async def test_a_store_failing_mid_list_truncates_the_answer(served: Served) -> None:
    """Once a streamed list has begun, a failing store can no longer turn it into a 500: the connection
    is dropped, so the client sees a broken body and never a shorter list that looks whole."""
    reader, writer, _ = await served.slow_reader("/vms")
    vms = served.app.vms
    assert isinstance(vms, Lifecycle)
    vms.store.close()
    with pytest.raises(asyncio.IncompleteReadError):
        await asyncio.wait_for(_chunked(reader), 60)
    writer.close()
    assert "/vms" not in served.app.finished


async def test_a_cancel_while_the_server_stops_waits_for_the_stop(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled again while uvicorn drains a connection that does not read (its graceful shutdown gives
    the request 2 s, then cancels it), the server still waits for uvicorn to finish before the
    cancellation goes on: nothing is left serving behind a service that says it is gone. Before, the
    second cancel was swallowed and the cleanup abandoned."""
    caplog.set_level(logging.INFO)
    _reader, writer, _ = await served.slow_reader("/vms")
    uv = served.server._server
    task = served.task
    assert uv is not None and task is not None
    task.cancel()
    await until(lambda: uv.should_exit, what="the server to begin stopping")
    assert not task.done()
    task.cancel()
    await asyncio.wait([task], timeout=30)
    assert task.cancelled()
    # uvicorn's own word that it gave up on the request and stopped (logged just before it returns)
    assert any("timeout graceful shutdown exceeded" in r.getMessage() for r in caplog.records)
    writer.close()


async def test_a_cancel_during_the_cleanup_of_a_server_that_stopped_on_its_own_propagates(
    served: Served,
) -> None:
    """uvicorn can end by itself; the service then stops it properly. A cancellation that reaches the
    service during that cleanup is meant for its caller and must end the task as cancelled, not be
    swallowed (``suppress(BaseException)`` did that)."""
    task = served.task
    uv = served.server._server
    assert task is not None and uv is not None
    running: asyncio.Task[None] = task

    class CancelOnStopping(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "query API stopping":
                running.cancel()  # from inside the task, just before its cleanup awaits

    server_log = logging.getLogger("microvm_blueprint.blueprint.server")
    handler = CancelOnStopping()
    server_log.addHandler(handler)
    level = server_log.level
    server_log.setLevel(logging.INFO)
    try:
        uv.should_exit = True
        await asyncio.wait([task], timeout=30)
    finally:
        server_log.removeHandler(handler)
        server_log.setLevel(level)
    assert task.done() and task.cancelled()
