"""Fuzz the query API from its own OpenAPI schema (schemathesis) over real HTTP: no crash, no 5xx."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from microvm_blueprint.blueprint import query  # noqa: E402
from microvm_blueprint.blueprint.journal import JobJournal  # noqa: E402
from microvm_blueprint.blueprint.query import QueryApp  # noqa: E402
from microvm_blueprint.blueprint.server import QueryServer  # noqa: E402
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver  # noqa: E402
from microvm_blueprint.runtime.lifecycle import Lifecycle  # noqa: E402
from microvm_blueprint.runtime.model import NetworkMode, NetworkSettings, Origin, VmSpec  # noqa: E402
from microvm_blueprint.runtime.store import Store  # noqa: E402

#: endless by design (a stream, not an answer): its inputs are checked in test_query_live.py
ENDLESS = {"/events"}


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    # the waits are fuzzed too, holding at most 1 s each: a longer timeout is a 400 here
    mp = pytest.MonkeyPatch()
    mp.setattr(query, "MAX_WAIT", 1)
    mp.setattr(query, "DEFAULT_WAIT", 1)
    loop = asyncio.new_event_loop()
    network = NetworkSettings(mode=NetworkMode.USER, port_range=(43300, 43399))
    life = Lifecycle(InMemoryDriver(), Store(tmp / "s.sqlite3"), state_dir=tmp / "state", network=network)
    journal = JobJournal(tmp / "jobs.sqlite3")

    async def seed() -> None:
        await life.create_vm("vm-1", None, Origin(1, "0xc"))
        await life.start_vm("vm-1", Origin(2))
        await life.snapshot_vm("vm-1", "snap-1", Origin(3))
        await life.create_vm("vm-net", VmSpec(disk_mib=1024, ports=(22, 8080)), Origin(4))  # a network object
        journal.received(1, "create_vm", 0, "0xc")
        journal.finished(1, error=None)

    loop.run_until_complete(seed())
    server = QueryServer(QueryApp(life, journal), "127.0.0.1", 0)
    ready = asyncio.Event()
    stop = threading.Event()

    def serve() -> None:
        task = loop.create_task(server.run(ready))

        async def until_stopped() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            task.cancel()

        loop.run_until_complete(asyncio.gather(task, until_stopped(), return_exceptions=True))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    for _ in range(300):
        if ready.is_set():
            break
        threading.Event().wait(0.05)
    assert ready.is_set(), "query API did not start"
    yield server.url
    stop.set()
    thread.join(10)
    mp.undo()


def test_openapi_fuzz(server_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    failures: list[str] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: object) -> None:
        response = case.call(base_url=server_url)  # type: ignore[attr-defined]
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path}: {response.status_code}")  # type: ignore[attr-defined]
        assert response.status_code < 500

    for op in schema.get_all_operations():
        operation = op.ok()
        if operation.path in ENDLESS:
            continue
        strategy = operation.as_strategy()
        from hypothesis import given

        given(case=strategy)(run)()
    assert failures == []
