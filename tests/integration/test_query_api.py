"""The read-only query API over real HTTP (uvicorn on a loopback port), in-memory provider."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from starlette.responses import JSONResponse

from microvm_blueprint.blueprint.journal import JobJournal
from microvm_blueprint.blueprint.query import LIST_CHUNK, QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.blueprint.tangle_sig import SignedReads
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin
from microvm_blueprint.runtime.store import Store


@dataclass
class Api:
    life: Lifecycle
    journal: JobJournal
    http: httpx.AsyncClient
    server: QueryServer


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    life = Lifecycle(InMemoryDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    journal = JobJournal(tmp_path / "jobs.sqlite3")
    server = QueryServer(QueryApp(life, journal, console=SignedReads(public=True)), "127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        yield Api(life, journal, http, server)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_health(api: Api) -> None:
    r = await api.http.get("/health")
    assert (r.status_code, r.text, r.headers["content-type"].split(";")[0]) == (200, "ok", "text/plain")


async def test_connections_are_nodelay(api: Api) -> None:
    """Each response is written as headers then body; with Nagle on, the body waited for the client's
    delayed ACK (44 ms a request on these machines). Every accepted connection must have TCP_NODELAY."""
    assert (await api.http.get("/health")).status_code == 200  # a keep-alive connection stays open
    assert api.server._server is not None
    connections = list(api.server._server.server_state.connections)
    assert connections
    for protocol in connections:
        sock = protocol.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("path", ["/health", "/vms", "/vms/a", "/nowhere"])
async def test_only_get(api: Api, method: str, path: str) -> None:
    r = await api.http.request(method, path, content=b'{"vm_id": "x"}')
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert await api.life.list_vms() == []


async def test_vms_views_and_paging(api: Api) -> None:
    for name in ["b", "a", "c", "d"]:
        await api.life.create_vm(name, None, Origin(1 + ord(name), "0xc"))
    await api.life.start_vm("a", Origin(500))
    await api.life.snapshot_vm("a", "s1", Origin(501))
    await api.life.snapshot_vm("a", "s0", Origin(502))
    full = (await api.http.get("/vms")).json()
    assert [v["vm_id"] for v in full] == ["a", "b", "c", "d"]
    assert full[0]["status"] == "running"
    page1 = (await api.http.get("/vms", params={"limit": 2})).json()
    page2 = (await api.http.get("/vms", params={"limit": 2, "after": page1[-1]["vm_id"]})).json()
    assert [v["vm_id"] for v in page1 + page2] == ["a", "b", "c", "d"]
    one = (await api.http.get("/vms/a")).json()
    assert one["vm_id"] == "a" and one["status"] == "running" and one["snapshots"] == ["s1", "s0"]
    assert [h["action"] for h in one["history"]] == ["create", "start", "snapshot", "snapshot"]
    assert (await api.http.get("/vms/a/snapshots")).json() == ["s1", "s0"]
    snap = (await api.http.get("/vms/a/snapshots/s0")).json()
    assert set(snap) == {"snapshot_id", "created_at", "size_bytes", "vm_status"}
    assert snap["snapshot_id"] == "s0" and snap["vm_status"] == "running" and snap["size_bytes"] > 0


async def test_every_page_shows_each_vms_own_snapshots(api: Api) -> None:
    """A page reads its VMs' snapshots in one statement over its id range: each VM must still get
    exactly its own, in order, whatever the page boundaries."""
    names = ["vm-0", "vm-1", "vm-10", "vm-2", "vm-3", "vm-30", "vm-4"]
    for i, name in enumerate(names):
        await api.life.create_vm(name, None, Origin(100 + i))
    call = 200
    for name in ("vm-1", "vm-10", "vm-3", "vm-4"):
        await api.life.start_vm(name, Origin(call))
        for snap in ("z", "a", name):
            call += 1
            await api.life.snapshot_vm(name, f"{snap}-{name}", Origin(call))
    singles = {n: (await api.http.get(f"/vms/{n}")).json() for n in names}
    for limit in (1, 2, 3, 100):
        listed: list[dict[str, object]] = []
        params: dict[str, str | int] = {"limit": limit}
        while page := (await api.http.get("/vms", params=params)).json():
            listed += page
            params = {"limit": limit, "after": page[-1]["vm_id"]}
        assert [v["vm_id"] for v in listed] == sorted(names)
        for v in listed:
            one = {k: x for k, x in singles[str(v["vm_id"])].items() if k != "history"}
            assert v == one, (limit, v, one)
    assert singles["vm-10"]["snapshots"] == ["z-vm-10", "a-vm-10", "vm-10-vm-10"]
    assert singles["vm-0"]["snapshots"] == []


async def test_the_full_list_is_one_plain_array_whatever_its_size(api: Api) -> None:
    """``GET /vms`` answers the plain JSON array sorted by ``vm_id`` (DESIGN.md §5): whole, with a
    Content-Length, while it fits in one chunk; beyond that streamed chunk by chunk (so it never holds
    the event loop), with the very bytes the whole answer would have had, ``?after`` included."""
    names = [f"vm-{i:04d}" for i in range(2 * LIST_CHUNK + 3)]

    async def expected(after: str | None = None) -> bytes:
        views = await api.life.list_vms(after=after)
        return bytes(JSONResponse([v.to_json(with_history=False) for v in views]).body)

    for i, name in enumerate(names[: LIST_CHUNK - 1]):
        await api.life.create_vm(name, None, Origin(1000 + i))
    r = await api.http.get("/vms")
    assert r.headers["content-length"] == str(len(r.content)) and r.content == await expected()
    for i, name in enumerate(reversed(names[LIST_CHUNK - 1 :])):
        await api.life.create_vm(name, None, Origin(2000 + i))
    for i, name in enumerate(names[LIST_CHUNK - 2 : LIST_CHUNK + 2]):  # snapshots about a chunk's edge
        await api.life.snapshot_vm(name, f"s-{name}", Origin(3000 + i))
    r = await api.http.get("/vms")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
    assert r.content == await expected()
    listed = r.json()
    assert [v["vm_id"] for v in listed] == names
    assert listed[LIST_CHUNK]["snapshots"] == [f"s-{names[LIST_CHUNK]}"] and listed[0]["snapshots"] == []
    # after the third VM: exactly two chunks' worth, so the last chunk read is empty
    r = await api.http.get("/vms", params={"after": names[2]})
    assert r.content == await expected(names[2]) and len(r.json()) == 2 * LIST_CHUNK
    assert (await api.http.get("/vms", params={"after": names[-1]})).json() == []


async def test_not_found_and_bad_input(api: Api) -> None:
    r = await api.http.get("/vms/ghost")
    assert (r.status_code, r.json()) == (404, {"error": "vm 'ghost' not found"})
    r = await api.http.get("/vms/ghost/snapshots")
    assert (r.status_code, r.json()) == (404, {"error": "vm 'ghost' not found"})
    await api.life.create_vm("a", None, Origin())
    r = await api.http.get("/vms/a/snapshots/none")
    assert (r.status_code, r.json()) == (404, {"error": "snapshot 'none' not found for vm 'a'"})
    r = await api.http.get("/vms/" + "x" * 300)
    assert (r.status_code, r.json()) == (400, {"error": "vm_id exceeds maximum length of 256 bytes"})
    r = await api.http.get("/vms/bad%0Aid")
    assert (r.status_code, r.json()) == (400, {"error": "vm_id contains control characters"})
    for bad in ["0", "-1", "abc", "100000"]:
        r = await api.http.get("/vms", params={"limit": bad})
        assert r.status_code == 400, bad
    assert (await api.http.get("/jobs/notanumber")).status_code == 400
    assert (await api.http.get("/jobs/" + "9" * 30)).status_code == 400


async def test_ids_with_slashes_are_one_segment(api: Api) -> None:
    await api.life.create_vm("a/b", None, Origin())
    await api.life.snapshot_vm("a/b", "../../x", Origin())
    r = await api.http.get("/vms/" + quote("a/b", safe=""))
    assert r.status_code == 200 and r.json()["vm_id"] == "a/b"
    r = await api.http.get("/vms/" + quote("a/b", safe="") + "/snapshots/" + quote("../../x", safe=""))
    assert r.status_code == 200 and r.json()["snapshot_id"] == "../../x"
    assert (await api.http.get("/vms/a/b")).status_code == 404


async def test_jobs_journal(api: Api) -> None:
    assert (await api.http.get("/jobs/5")).json() == {"error": "job call 5 not found"}
    api.journal.received(5, "stop_vm", 2, "0xc")
    assert (await api.http.get("/jobs/5")).json()["status"] == "pending"
    api.journal.finished(5, error="vm 'x' not found")
    body = (await api.http.get("/jobs/5")).json()
    assert (body["status"], body["job"], body["error"]) == ("failed", "stop_vm", "vm 'x' not found")
    api.journal.received(6, "create_vm", 0, "0xc")
    api.journal.finished(6, error=None)
    api.journal.submitted(6, "0xabc")
    body = (await api.http.get("/jobs/6")).json()
    assert (body["status"], body["result_tx"]) == ("done", "0xabc") and "error" not in body


async def test_console_and_openapi(api: Api) -> None:
    await api.life.create_vm("a", None, Origin())
    await api.life.start_vm("a", Origin())
    text = (await api.http.get("/vms/a/console", params={"tail": 4096})).text
    assert "MICROVM-READY" in text
    assert len((await api.http.get("/vms/a/console", params={"tail": 5})).text) == 5
    spec = (await api.http.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.") and "/vms/{vm_id}" in spec["paths"]
