"""Waits, the event stream and the dashboard of the query API (issue #16), over real HTTP (uvicorn on a
loopback port), a real SQLite store and journal, in-memory VMM."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from microvm_blueprint.blueprint import query
from microvm_blueprint.blueprint.events import EventHub
from microvm_blueprint.blueprint.journal import JobJournal
from microvm_blueprint.blueprint.query import OPENAPI, QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmStatus
from microvm_blueprint.runtime.store import Store
from tests.waiting import until


@dataclass
class Api:
    life: Lifecycle
    journal: JobJournal
    hub: EventHub
    http: httpx.AsyncClient
    server: QueryServer
    task: asyncio.Task[None]


async def _serve(tmp_path: Path, **hub_args: Any) -> Api:
    life = Lifecycle(InMemoryDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")
    journal = JobJournal(tmp_path / "jobs.sqlite3")
    hub = EventHub(life.store, journal, **hub_args)
    server = QueryServer(QueryApp(life, journal, events=hub), "127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    return Api(life, journal, hub, httpx.AsyncClient(base_url=server.url, timeout=20), server, task)


async def _stop(api: Api) -> None:
    await api.http.aclose()
    api.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await api.task


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    served = await _serve(tmp_path)
    yield served
    await _stop(served)


# ---- GET /vms/{id}/wait ----------------------------------------------------------------------------


async def test_wait_answers_at_once_when_already_there(api: Api) -> None:
    await api.life.create_vm("a", None, Origin(1, "0xc"))
    r = await api.http.get("/vms/a/wait", params={"status": "created"})
    assert r.status_code == 200
    assert (r.json()["vm_id"], r.json()["status"]) == ("a", "created")
    assert api.hub.waiting == 0


async def test_wait_wakes_on_the_change(api: Api) -> None:
    await api.life.create_vm("a", None, Origin(1))
    waiting = asyncio.create_task(api.http.get("/vms/a/wait", params={"status": "running", "timeout": "30"}))
    await until(lambda: api.hub.waiting == 1, what="the wait to register")
    started = time.monotonic()
    await api.life.start_vm("a", Origin(2))
    r = await asyncio.wait_for(waiting, 10)
    assert r.status_code == 200
    assert r.json()["status"] == "running"
    assert [h["action"] for h in r.json()["history"]] == ["create", "start"]
    assert time.monotonic() - started < 5  # woken by the change, far before its 30 s timeout
    assert api.hub.waiting == 0


async def test_wait_does_not_poll_the_store(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wait reads the VM when a write touched it, and never otherwise: other VMs' changes and the
    passing of time cost it nothing."""
    await api.life.create_vm("a", None, Origin(1))
    reads: list[str] = []
    real = api.life.get_vm

    async def counting(vm_id: str) -> Any:
        reads.append(vm_id)
        return await real(vm_id)

    monkeypatch.setattr(api.life, "get_vm", counting)
    waiting = asyncio.create_task(api.http.get("/vms/a/wait", params={"status": "stopped"}))
    await until(lambda: api.hub.waiting == 1, what="the wait to register")
    before = len(reads)
    for k in range(5):
        await api.life.create_vm(f"other{k}", None, Origin(10 + k))
    # every write has been handed to the hub (same thread, synchronously) and any wake-up would run
    # before this request is answered
    assert (await api.http.get("/health")).status_code == 200
    assert len(reads) == before
    assert not any(e.is_set() for e in api.hub._vm_waiters["a"])
    await api.life.start_vm("a", Origin(30))  # touches `a`: one read, still not stopped
    await until(lambda: len(reads) == before + 1, what="the wait to re-read a")
    await api.life.stop_vm("a", Origin(31))
    r = await asyncio.wait_for(waiting, 10)
    assert (r.status_code, r.json()["status"]) == (200, "stopped")


async def test_wait_times_out_with_408(api: Api) -> None:
    await api.life.create_vm("a", None, Origin(1))
    started = time.monotonic()
    r = await api.http.get("/vms/a/wait", params={"status": "running", "timeout": "1"})
    assert r.status_code == 408
    assert "still created, not running" in r.json()["error"]
    assert time.monotonic() - started >= 1.0
    assert api.hub.waiting == 0


@pytest.mark.parametrize(
    ("params", "status", "text"),
    [
        ({"status": "running"}, 404, "vm 'nope' not found"),
        ({"status": "booting"}, 400, "status must be one of created, running, stopped, destroyed, failed"),
        ({}, 400, "status must be one of"),
        ({"status": "running", "timeout": "0"}, 400, "timeout must be an integer between 1 and 300"),
        ({"status": "running", "timeout": "301"}, 400, "timeout must be an integer between 1 and 300"),
        ({"status": "running", "timeout": "1.5"}, 400, "timeout must be an integer between 1 and 300"),
    ],
)
async def test_wait_bad_requests(api: Api, params: dict[str, str], status: int, text: str) -> None:
    if status != 404:
        await api.life.create_vm("nope", None, Origin(1))
    r = await api.http.get("/vms/nope/wait", params=params)
    assert r.status_code == status
    assert text in r.json()["error"]


async def test_waiters_are_bounded(tmp_path: Path) -> None:
    api = await _serve(tmp_path, max_waiters=2)
    try:
        await api.life.create_vm("a", None, Origin(1))
        waits = [asyncio.create_task(api.http.get("/vms/a/wait", params={"status": "running"})) for _ in range(2)]
        await until(lambda: api.hub.waiting == 2, what="two waits")
        r = await api.http.get("/vms/a/wait", params={"status": "running"})
        assert r.status_code == 503
        assert "too many requests waiting (at most 2)" in r.json()["error"]
        await api.life.start_vm("a", Origin(2))
        assert [(await w).status_code for w in waits] == [200, 200]
    finally:
        await _stop(api)


async def test_a_waiter_that_disconnects_is_forgotten(api: Api) -> None:
    await api.life.create_vm("a", None, Origin(1))
    async with httpx.AsyncClient(base_url=api.server.url, timeout=20) as other:
        waiting = asyncio.create_task(other.get("/vms/a/wait", params={"status": "running", "timeout": "300"}))
        await until(lambda: api.hub.waiting == 1, what="the wait to register")
        waiting.cancel()  # the client gives up: httpx closes the connection
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await until(lambda: api.hub.waiting == 0, what="the server to forget the waiter")
    assert api.hub._vm_waiters == {}


async def test_a_write_from_another_thread_wakes_the_wait(api: Api) -> None:
    await api.life.create_vm("a", None, Origin(1))
    waiting = asyncio.create_task(api.http.get("/vms/a/wait", params={"status": "failed"}))
    await until(lambda: api.hub.waiting == 1, what="the wait to register")
    await asyncio.to_thread(api.life.store.update_vm, "a", VmStatus.FAILED, Origin(), "vmm_exit", error="gone")
    r = await asyncio.wait_for(waiting, 10)
    assert (r.status_code, r.json()["status"], r.json()["error"]) == (200, "failed", "gone")


async def test_stopping_the_server_ends_waits_and_streams(tmp_path: Path) -> None:
    api = await _serve(tmp_path)
    await api.life.create_vm("a", None, Origin(1))
    waiting = asyncio.create_task(api.http.get("/vms/a/wait", params={"status": "running", "timeout": "300"}))
    lines: list[str] = []

    async def read_stream() -> None:
        async with api.http.stream("GET", "/events") as r:
            async for line in r.aiter_lines():
                lines.append(line)

    streaming = asyncio.create_task(read_stream())
    await until(lambda: api.hub.waiting == 1 and api.hub.subscribers == 1, what="a wait and a stream")
    started = time.monotonic()
    api.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await api.task
    r = await asyncio.wait_for(waiting, 10)
    assert r.status_code == 503
    assert "shutting down" in r.json()["error"]
    await asyncio.wait_for(streaming, 10)  # the stream ended cleanly (no error raised while reading)
    assert time.monotonic() - started < 2  # not cut off by uvicorn's graceful timeout
    assert ": connected" in lines
    await api.http.aclose()


# ---- GET /jobs/{call_id}/wait ----------------------------------------------------------------------


async def test_job_wait_follows_the_journal(api: Api) -> None:
    finished = asyncio.create_task(api.http.get("/jobs/7/wait"))
    result = asyncio.create_task(api.http.get("/jobs/7/wait", params={"until": "result"}))
    await until(lambda: api.hub.waiting == 2, what="two job waits")
    api.journal.received(7, "create_vm", 0, "0xc")  # seen, still pending: both keep waiting
    assert (await api.http.get("/health")).status_code == 200
    assert not finished.done() and not result.done()
    api.journal.finished(7, error=None)
    r = await asyncio.wait_for(finished, 10)
    assert (r.status_code, r.json()["status"], r.json().get("result_tx")) == (200, "done", None)
    assert not result.done()
    api.journal.submitted(7, "0xabc")
    r = await asyncio.wait_for(result, 10)
    assert (r.status_code, r.json()["status"], r.json()["result_tx"]) == (200, "done", "0xabc")
    # settled: answered at once
    r = await api.http.get("/jobs/7/wait", params={"until": "result"})
    assert (r.status_code, r.json()["result_tx"]) == (200, "0xabc")


async def test_job_wait_failed_dropped_timeout_and_bad_input(api: Api) -> None:
    api.journal.received(8, "start_vm", 1, None)
    api.journal.finished(8, error="vm 'x' not found")
    r = await api.http.get("/jobs/8/wait", params={"until": "result"})  # a failure is final either way
    assert (r.status_code, r.json()["status"], r.json()["error"]) == (200, "failed", "vm 'x' not found")
    api.journal.received(9, "create_vm", 0, None)
    api.journal.finished(9, error=None)
    waiting = asyncio.create_task(api.http.get("/jobs/9/wait", params={"until": "result"}))
    await until(lambda: api.hub.waiting == 1, what="the wait")
    api.journal.dropped(9, "NotPermittedCaller")
    r = await asyncio.wait_for(waiting, 10)
    assert (r.status_code, r.json()["status"]) == (200, "done")
    assert "NotPermittedCaller" in r.json()["error"]
    r = await api.http.get("/jobs/10/wait", params={"timeout": "1"})
    assert r.status_code == 408
    assert r.json()["error"] == "job call 10 is not seen by the operator yet after 1 s"
    for path, params in [("/jobs/x/wait", {}), ("/jobs/1/wait", {"until": "soon"}), ("/jobs/1/wait", {"timeout": "0"})]:
        assert (await api.http.get(path, params=params)).status_code == 400


# ---- GET /events ------------------------------------------------------------------------------------


async def _events(http: httpx.AsyncClient, n: int, path: str = "/events", headers: dict[str, str] | None = None,
                  comments: list[str] | None = None) -> list[dict[str, Any]]:
    """The first ``n`` events of a stream (with their ids checked against their seq)."""
    out: list[dict[str, Any]] = []
    async with http.stream("GET", path, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event_id = None
        async for line in r.aiter_lines():
            if line.startswith(":") and comments is not None:
                comments.append(line)
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["seq"] == event_id
                out.append(data)
                if len(out) == n:
                    break
    return out


async def test_events_stream_lifecycle_changes(api: Api) -> None:
    reading = asyncio.create_task(_events(api.http, 4))
    await until(lambda: api.hub.subscribers == 1, what="the subscriber")
    await api.life.create_vm("a", None, Origin(1, "0xC0FFEE"))
    await api.life.start_vm("a", Origin(2, "0xC0FFEE"))
    await api.life.snapshot_vm("a", "s1", Origin(3))
    await api.life.destroy_vm("a", Origin(4))
    got = await asyncio.wait_for(reading, 10)
    assert [(e["vm_id"], e["action"], e["status"], e["call_id"]) for e in got] == [
        ("a", "create", "created", 1),
        ("a", "start", "running", 2),
        ("a", "snapshot", "running", 3),
        ("a", "destroy", "destroyed", 4),
    ]
    assert got[0]["caller"] == "0xC0FFEE"
    assert isinstance(got[0]["at"], float)
    assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
    await until(lambda: api.hub.subscribers == 0, what="the subscriber to go when the client does")


async def test_events_filter_resume_and_last(api: Api) -> None:
    for k, name in enumerate(["a", "b", "a", "b"]):
        if k < 2:
            await api.life.create_vm(name, None, Origin(10 + k))
        else:
            await api.life.start_vm(name, Origin(10 + k))
    every = await _events(api.http, 4, "/events?after=0")
    assert [(e["vm_id"], e["action"]) for e in every] == [("a", "create"), ("b", "create"), ("a", "start"), ("b", "start")]
    # Last-Event-ID: only what came after it, past and live
    reading = asyncio.create_task(_events(api.http, 3, headers={"Last-Event-ID": str(every[1]["seq"])}))
    await until(lambda: api.hub.subscribers == 1, what="the subscriber")
    await api.life.stop_vm("a", Origin(20))
    got = await asyncio.wait_for(reading, 10)
    assert [(e["vm_id"], e["action"]) for e in got] == [("a", "start"), ("b", "start"), ("a", "stop")]
    # ?vm_id= with ?last=: the last N of that VM, then its live ones only
    await until(lambda: api.hub.subscribers == 0, what="the last stream to end")
    reading = asyncio.create_task(_events(api.http, 3, "/events?vm_id=b&last=2"))
    await until(lambda: api.hub.subscribers == 1, what="the subscriber")
    await api.life.start_vm("a", Origin(21))  # not b's: filtered out
    await api.life.stop_vm("b", Origin(22))
    got = await asyncio.wait_for(reading, 10)
    assert [(e["vm_id"], e["action"]) for e in got] == [("b", "create"), ("b", "start"), ("b", "stop")]
    r = await api.http.get("/events", headers={"Last-Event-ID": "x1"})
    assert r.status_code == 400


async def test_events_heartbeat(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(query, "HEARTBEAT", 0.05)
    comments: list[str] = []

    async def read() -> None:
        await _events(api.http, 1, comments=comments)

    reading = asyncio.create_task(read())
    await until(lambda: comments.count(": heartbeat") >= 2, what="two heartbeats")
    await api.life.create_vm("a", None, Origin(1))
    await asyncio.wait_for(reading, 10)


async def test_a_slow_reader_is_dropped(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscriber whose queue fills up is dropped at once: its queue is freed and its stream ends
    with a comment saying why (the client can resume with Last-Event-ID)."""
    monkeypatch.setattr("microvm_blueprint.blueprint.events.QUEUE_LIMIT", 2)
    monkeypatch.setattr(query, "BATCH_DELAY", 300.0)  # the stream sits on its first wake-up
    comments: list[str] = []
    reading = asyncio.create_task(_events(api.http, 100, comments=comments))
    await until(lambda: api.hub.subscribers == 1, what="the subscriber")
    for k in range(5):
        await api.life.create_vm(f"v{k}", None, Origin(k + 1))
    got = await asyncio.wait_for(reading, 10)  # ended by the server, long before its 300 s
    assert len(got) < 5
    assert any(c.startswith(": dropped") for c in comments)
    await until(lambda: api.hub.subscribers == 0, what="the dropped subscriber to be gone")


async def test_event_streams_are_bounded(tmp_path: Path) -> None:
    api = await _serve(tmp_path, max_subscribers=1)
    try:
        reading = asyncio.create_task(_events(api.http, 1))
        await until(lambda: api.hub.subscribers == 1, what="the subscriber")
        r = await api.http.get("/events")
        assert r.status_code == 503
        assert "too many event streams (at most 1)" in r.json()["error"]
        await api.life.create_vm("a", None, Origin(1))
        await asyncio.wait_for(reading, 10)
    finally:
        await _stop(api)


# ---- the dashboard and the OpenAPI document ---------------------------------------------------------


async def test_dashboard_is_served_self_contained(api: Api) -> None:
    r = await api.http.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    assert "new EventSource(" in page and "/events" in page
    assert "innerHTML" not in page  # API values are put in the page as text only
    for outside in ("http://", "https://", "//cdn"):
        assert outside not in page  # works offline: nothing is fetched from elsewhere


def test_openapi_lists_the_new_endpoints() -> None:
    paths = OPENAPI["paths"]
    assert {"/", "/vms/{vm_id}/wait", "/jobs/{call_id}/wait", "/events"} <= set(paths)
    assert set(paths["/vms/{vm_id}/wait"]["get"]["responses"]) >= {"200", "400", "404", "408", "503"}
    assert "text/event-stream" in paths["/events"]["get"]["responses"]["200"]["content"]
