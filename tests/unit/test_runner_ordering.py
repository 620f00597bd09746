"""The runner runs calls on different keys concurrently and calls on the same key in call order;
a crashing handler never takes the service down."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from microvm_blueprint.tangle.calls import JobCall
from microvm_blueprint.tangle.consumer import TangleConsumer
from microvm_blueprint.tangle.router import Args, Router
from microvm_blueprint.tangle.runner import BlueprintRunner
from microvm_blueprint.tangle.state import TangleState


class ListProducer:
    def __init__(self, calls: list[JobCall]) -> None:
        self.calls = calls

    async def run(self, deliver: Callable[[JobCall], Awaitable[None]], stop: asyncio.Event) -> None:
        for c in self.calls:
            await deliver(c)
        await stop.wait()


def call(call_id: int, key: str, job: int = 0) -> JobCall:
    return JobCall(service_id=0, call_id=call_id, job_index=job, caller="0x" + "c" * 40, inputs=key.encode())


async def test_per_key_order_and_cross_key_concurrency(tmp_path: Path) -> None:
    events: list[str] = []
    release = {i: asyncio.Event() for i in range(5)}
    started = {i: asyncio.Event() for i in range(5)}

    async def handler(c: JobCall, args: Args) -> bytes:
        events.append(f"start {c.call_id}")
        started[c.call_id].set()
        await asyncio.wait_for(release[c.call_id].wait(), 10)
        events.append(f"end {c.call_id}")
        return b"\x01"

    router = Router().route(0, handler, name="h", key=lambda c, a: c.inputs.decode())
    state = TangleState(tmp_path / "t.sqlite3")
    consumer = TangleConsumer(None, state, None, contract="0x" + "0" * 40, dry_run=True)  # type: ignore[arg-type]
    calls = [call(0, "a"), call(1, "a"), call(2, "b"), call(3, "a"), call(4, "c")]
    for c in calls:  # the inbox holds them, as the producer would have recorded
        state.advance("k", __import__("microvm_blueprint.tangle.state", fromlist=["Cursor"]).Cursor(1, None),
                      [c])
    runner = BlueprintRunner(router, ListProducer(calls), consumer, state)  # type: ignore[arg-type]
    task = asyncio.create_task(runner.run())
    # a, b and c start at once; the second and third "a" wait for the first
    await asyncio.wait_for(asyncio.gather(started[0].wait(), started[2].wait(), started[4].wait()), 10)
    assert not started[1].is_set() and not started[3].is_set()
    release[0].set()
    await asyncio.wait_for(started[1].wait(), 10)
    assert not started[3].is_set()
    release[1].set()
    await asyncio.wait_for(started[3].wait(), 10)
    for e in release.values():
        e.set()
    deadline = asyncio.get_running_loop().time() + 10
    while runner.handled < 5:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    a_events = [e for e in events if e.split()[1] in {"0", "1", "3"}]
    assert a_events == ["start 0", "end 0", "start 1", "end 1", "start 3", "end 3"]
    runner.stop()
    await asyncio.wait_for(task, 10)


async def test_a_crashing_handler_does_not_stop_the_service(tmp_path: Path) -> None:
    failures: list[tuple[int, str]] = []

    class Obs:
        def on_received(self, c: JobCall, job: str) -> None: ...
        def on_done(self, c: JobCall, out: bytes) -> None: ...
        def on_failed(self, c: JobCall, error: str) -> None:
            failures.append((c.call_id, error))
        def on_submitted(self, call_id: int, tx: str) -> None: ...
        def on_dropped(self, call_id: int, why: str) -> None: ...

    async def boom(c: JobCall, args: Args) -> bytes:
        if c.call_id == 0:
            raise RuntimeError("kaboom with a secret 0xdeadbeef")
        return b"\x01"

    router = Router().route(0, boom, name="boom")
    state = TangleState(tmp_path / "t.sqlite3")
    consumer = TangleConsumer(None, state, None, contract="0x" + "0" * 40, dry_run=True)  # type: ignore[arg-type]
    producer = ListProducer([call(0, "x"), call(1, "y"), call(2, "z", job=9)])
    runner = BlueprintRunner(router, producer, consumer, state, observer=Obs())  # type: ignore[arg-type]
    task = asyncio.create_task(runner.run())
    deadline = asyncio.get_running_loop().time() + 10
    while runner.handled < 3:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    assert failures == [(0, "internal error while running the job"), (2, "unknown job index 9")]
    runner.stop()
    await asyncio.wait_for(task, 10)
