"""Router and runner: lookup and ordering keys, bounded concurrency, failures recorded and never sent,
background services first, graceful stop with a deadline, cancellation that leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from microvm_blueprint.errors import TransientError
from microvm_blueprint.tangle.calls import JobCall
from microvm_blueprint.tangle.consumer import TangleConsumer
from microvm_blueprint.tangle.errors import JobError, TangleError
from microvm_blueprint.tangle.router import Args, Router
from microvm_blueprint.tangle.runner import BlueprintRunner
from microvm_blueprint.tangle.state import Cursor, TangleState

from ..waiting import until


def call(call_id: int, job: int = 0, inputs: bytes = b"") -> JobCall:
    return JobCall(service_id=0, call_id=call_id, job_index=job, caller="0x" + "c" * 40, inputs=inputs,
                   block_number=call_id + 1)


class ListProducer:
    """Records the calls in the inbox, as the real producer does, then hands them over."""

    def __init__(self, state: TangleState, calls: list[JobCall], gate: asyncio.Event | None = None) -> None:
        self.state, self.calls, self.gate = state, calls, gate
        self.started = asyncio.Event()

    async def run(self, deliver: Callable[[JobCall], Awaitable[None]], stop: asyncio.Event) -> None:
        self.started.set()
        self.state.advance("k", Cursor(1000, None), self.calls)
        for c in self.calls:
            if self.gate is not None:
                await self.gate.wait()
            await deliver(c)
        await stop.wait()


class Journal:
    def __init__(self, explode: bool = False) -> None:
        self.explode = explode
        self.received: list[int] = []
        self.done: list[int] = []
        self.failed: dict[int, str] = {}

    def on_received(self, c: JobCall, job: str) -> None:
        self.received.append(c.call_id)
        if self.explode:
            raise RuntimeError("journal down")

    def on_done(self, c: JobCall, out: bytes) -> None:
        self.done.append(c.call_id)

    def on_failed(self, c: JobCall, error: str) -> None:
        self.failed[c.call_id] = error

    def on_submitted(self, call_id: int, tx: str) -> None: ...
    def on_dropped(self, call_id: int, why: str) -> None: ...


def make(tmp: Path, router: Router, calls: list[JobCall], **kw: object) -> tuple[BlueprintRunner, TangleState]:
    state = TangleState(tmp / "t.sqlite3")
    consumer = TangleConsumer(None, state, None, contract="0x" + "1" * 40, dry_run=True)  # type: ignore[arg-type]
    producer = ListProducer(state, calls, kw.pop("gate", None))  # type: ignore[arg-type]
    return BlueprintRunner(router, producer, consumer, state, **kw), state  # type: ignore[arg-type]


# ---- router ----


async def ok(c: JobCall, args: Args) -> bytes:
    return b"\x01"


def test_router_lookup_and_validation() -> None:
    router = Router().route(0, ok, name="create_vm").route(5, ok, name="restore_vm", key=lambda c, a: "k")
    route = router.lookup(5)
    assert route is not None and route.name == "restore_vm" and route.handler is ok
    assert router.lookup(1) is None and router.name_of(1) == "unknown(1)"
    with pytest.raises(ValueError, match="already routed to create_vm"):
        router.route(0, ok, name="again")
    with pytest.raises(ValueError, match="not a uint8"):
        router.route(256, ok, name="big")


def test_ordering_keys() -> None:
    def key(c: JobCall, args: Args) -> str | None:
        if c.inputs == b"boom":
            raise ValueError("undecodable")
        return None if c.inputs == b"" else c.inputs.decode()

    router = Router().route(0, ok, name="keyed", key=key).route(1, ok, name="plain")
    assert router.prepare(call(1, 0, b"vm-a")).key == router.prepare(call(2, 0, b"vm-a")).key == "key:vm-a"
    assert router.prepare(call(3, 0, b"")).key == "call:3"  # None: its own key
    assert router.prepare(call(4, 0, b"boom")).key == "call:4"  # raising: its own key
    assert router.prepare(call(5, 1, b"vm-a")).key == "call:5"  # no key function
    assert router.prepare(call(6, 9)).key == "call:6"  # unknown job


# ---- runner ----


async def test_concurrency_is_bounded(tmp_path: Path) -> None:
    running, peak = 0, 0
    release = asyncio.Event()

    async def slow(c: JobCall, args: Args) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return b"\x01"

    router = Router().route(0, slow, name="slow", key=lambda c, a: str(c.call_id))
    runner, state = make(tmp_path, router, [call(i) for i in range(6)], max_concurrency=2)
    task = asyncio.create_task(runner.run())
    await until(lambda: running == 2)
    await asyncio.sleep(0.05)  # give a third a chance to (wrongly) start
    assert running == 2
    release.set()
    await until(lambda: runner.handled == 6)
    assert peak == 2
    runner.stop()
    await asyncio.wait_for(task, 10)
    assert state.unfinished() == []


async def test_failures_are_recorded_and_never_sent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(c: JobCall, args: Args) -> bytes:
        if c.call_id == 0:
            raise JobError("vm 'x' not found")
        if c.call_id == 1:
            raise KeyError("a bug")
        if c.call_id == 2:
            return "not bytes"  # type: ignore[return-value]
        return b"\x01"

    journal = Journal(explode=True)  # an observer that raises breaks nothing
    router = Router().route(0, handler, name="h")
    runner, state = make(tmp_path, router, [call(0), call(1), call(2), call(3), call(4, job=7)], observer=journal)
    task = asyncio.create_task(runner.run())
    await until(lambda: runner.handled == 5)
    runner.stop()
    await asyncio.wait_for(task, 10)
    assert journal.failed == {
        0: "vm 'x' not found",
        1: "internal error while running the job",
        2: "internal error while running the job",
        4: "unknown job index 7",
    }
    assert journal.done == [3]
    assert state.outbox_status(0, 3) == ("done", None)  # (dry run)
    assert all(state.outbox_status(0, i) is None for i in (0, 1, 2, 4))  # nothing to send for a failure
    assert all(state.call_status(0, i) == "done" for i in range(5))
    assert "KeyError: 'a bug'" in caplog.text  # the traceback is logged


async def test_background_services_are_ready_before_the_producer_starts(tmp_path: Path) -> None:
    order: list[str] = []
    go = asyncio.Event()

    class Api:
        name = "api"

        async def run(self, ready: asyncio.Event) -> None:
            order.append("service starting")
            await go.wait()
            order.append("service ready")
            ready.set()
            await asyncio.Event().wait()

    runner, _ = make(tmp_path, Router().route(0, ok, name="ok"), [call(0)], background_services=[Api()])
    producer = runner.producer
    task = asyncio.create_task(runner.run())
    await until(lambda: order == ["service starting"])
    await asyncio.sleep(0.02)
    assert not producer.started.is_set()  # type: ignore[attr-defined]
    go.set()
    await until(lambda: runner.handled == 1)
    runner.stop()
    await asyncio.wait_for(task, 10)


async def test_a_service_that_never_gets_ready_or_fails_stops_the_runner(tmp_path: Path) -> None:
    class Mute:
        name = "mute"

        async def run(self, ready: asyncio.Event) -> None:
            await asyncio.Event().wait()

    class Broken:
        name = "broken"

        async def run(self, ready: asyncio.Event) -> None:
            raise TangleError("port 3000 is taken")

    runner, _ = make(tmp_path, Router(), [], background_services=[Mute()], ready_timeout=0.1)
    with pytest.raises(TangleError, match="mute did not become ready"):
        await asyncio.wait_for(runner.run(), 10)
    runner, _ = make(tmp_path / "b", Router(), [], background_services=[Broken()])
    with pytest.raises(TangleError, match="port 3000 is taken"):
        await asyncio.wait_for(runner.run(), 10)


async def test_stop_finishes_in_flight_jobs_and_leaves_the_rest_for_the_next_start(tmp_path: Path) -> None:
    started: list[int] = []
    release = asyncio.Event()

    async def handler(c: JobCall, args: Args) -> bytes:
        started.append(c.call_id)
        await release.wait()
        return b"\x01"

    # one key: call 1 waits behind call 0; calls 2.. are never taken once stopping
    gate = asyncio.Event()
    router = Router().route(0, handler, name="h", key=lambda c, a: "same")
    runner, state = make(tmp_path, router, [call(i) for i in range(4)], gate=gate, max_concurrency=4)
    task = asyncio.create_task(runner.run())
    gate.set()
    await until(lambda: started == [0])
    runner.stop()
    release.set()
    await asyncio.wait_for(task, 10)
    assert started == [0] and state.call_status(0, 0) == "done"  # what started finished
    assert [r.call_id for r in state.unfinished()] == [1, 2, 3]  # the rest was not started


async def test_the_drain_deadline_cancels_a_stuck_job(tmp_path: Path) -> None:
    async def stuck(c: JobCall, args: Args) -> bytes:
        await asyncio.Event().wait()
        return b""

    runner, state = make(tmp_path, Router().route(0, stuck, name="stuck"), [call(0)], drain_timeout=0.1)
    task = asyncio.create_task(runner.run())
    await until(lambda: len(asyncio.all_tasks()) > 0 and any(t.get_name() == "job:0" for t in asyncio.all_tasks()))
    runner.stop()
    await asyncio.wait_for(task, 10)
    assert [r.call_id for r in state.unfinished()] == [0]  # runs again at the next start
    assert not any(t.get_name() == "job:0" for t in asyncio.all_tasks())


async def test_cancelling_the_runner_leaves_no_job_behind(tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def long(c: JobCall, args: Args) -> bytes:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    runner, _ = make(tmp_path, Router().route(0, long, name="long"), [call(0)])
    task = asyncio.create_task(runner.run())
    await until(lambda: any(t.get_name() == "job:0" for t in asyncio.all_tasks()))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    assert not any(t.get_name().startswith("job:") for t in asyncio.all_tasks())


# ---- backpressure: a slot before a task ----


def live_handler_tasks() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("job:") and not t.done())


async def test_a_large_backlog_never_has_more_live_handler_tasks_than_the_bound(tmp_path: Path) -> None:
    """3,000 calls waiting at once, each job waiting briefly: the live handler tasks, counted from inside
    every handler, never exceed ``max_concurrency`` (the runner used to create a task per call at once)."""
    bound, n = 8, 3000
    peak = 0

    async def brief(c: JobCall, args: Args) -> bytes:
        nonlocal peak
        peak = max(peak, live_handler_tasks())
        await asyncio.sleep(0.001)
        return b"\x01"

    runner, state = make(tmp_path, Router().route(0, brief, name="brief"), [call(i) for i in range(n)],
                         max_concurrency=bound, queue_size=64)
    task = asyncio.create_task(runner.run())
    await until(lambda: runner.handled == n, timeout=120, what="the backlog handled")
    runner.stop()
    await asyncio.wait_for(task, 10)
    assert 0 < peak <= bound
    assert state.unfinished() == []


async def test_a_backlog_on_few_keys_keeps_order_and_bounds_without_deadlock(tmp_path: Path) -> None:
    """More keys than slots, and long runs of calls per key: calls waiting for their key hold no slot
    (no deadlock), each key's calls run in call order, and the calls held behind their key are bounded
    by ``queue_size``."""
    n, bound, queue_size = 1500, 2, 16
    keys = ["a", "b", "c"]
    ran: dict[str, list[int]] = {k: [] for k in keys}
    peak_tasks = peak_waiting = 0

    async def handler(c: JobCall, args: Args) -> bytes:
        nonlocal peak_tasks, peak_waiting
        peak_tasks = max(peak_tasks, live_handler_tasks())
        peak_waiting = max(peak_waiting, sum(len(w) for w in runner._chains.values()))
        ran[c.inputs.decode()].append(c.call_id)
        await asyncio.sleep(0)
        return b"\x01"

    calls = [call(i, inputs=keys[(i // 7) % 3].encode()) for i in range(n)]
    router = Router().route(0, handler, name="h", key=lambda c, a: c.inputs.decode())
    runner, state = make(tmp_path, router, calls, max_concurrency=bound, queue_size=queue_size)
    task = asyncio.create_task(runner.run())
    await until(lambda: runner.handled == n, timeout=120, what="the backlog handled")
    runner.stop()
    await asyncio.wait_for(task, 10)
    for k in keys:
        assert ran[k] == [c.call_id for c in calls if c.inputs.decode() == k]
    assert 0 < peak_tasks <= bound
    assert peak_waiting <= queue_size
    assert state.unfinished() == []


# ---- transient errors: retried, never recorded ----


async def test_a_transient_error_is_retried_and_the_job_then_succeeds(tmp_path: Path) -> None:
    attempts = 0

    async def flaky(c: JobCall, args: Args) -> bytes:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise TransientError("database is locked")
        return b"\x01"

    journal = Journal()
    runner, state = make(tmp_path, Router().route(0, flaky, name="flaky"), [call(0)], observer=journal,
                         retry_attempts=4, retry_backoff=0.01)
    task = asyncio.create_task(runner.run())
    await until(lambda: runner.handled == 1)
    runner.stop()
    await asyncio.wait_for(task, 10)
    assert attempts == 3
    assert journal.done == [0] and journal.failed == {}
    assert state.call_status(0, 0) == "done" and state.outbox_status(0, 0) == ("done", None)  # (dry run)


async def test_a_transient_error_that_persists_leaves_the_call_and_its_key_for_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = 0
    ran: list[int] = []

    async def handler(c: JobCall, args: Args) -> bytes:
        nonlocal attempts
        if c.call_id == 0:
            attempts += 1
            raise TransientError("database is locked")
        ran.append(c.call_id)
        return b"\x01"

    # calls 0 and 1 change the same VM: 1 must not overtake 0; call 2 is another VM's
    journal = Journal()
    router = Router().route(0, handler, name="h", key=lambda c, a: "vm-a" if c.call_id < 2 else "vm-b")
    runner, state = make(tmp_path, router, [call(0), call(1), call(2)], observer=journal,
                         retry_attempts=3, retry_backoff=0.01)
    task = asyncio.create_task(runner.run())
    await until(lambda: runner.handled == 2 and attempts == 3)
    runner.stop()
    await asyncio.wait_for(task, 10)
    assert ran == [2]
    assert journal.failed == {} and journal.done == [2]  # never recorded as a failure
    assert [c.call_id for c in state.unfinished()] == [0, 1]  # both run again at the next start
    assert state.outbox_status(0, 0) is None
    assert "left unfinished" in caplog.text and "database is locked" in caplog.text
