"""wait_first(): the position of the first awaitable to finish (None on timeout); what it started is
cancelled and reaped whatever happens, what it was given is only watched."""

from __future__ import annotations

import asyncio

import pytest

from microvm_blueprint.tangle.aio import wait_first

from ..waiting import until


class Watched:
    """An awaitable that notes being cancelled."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.cancelled = False
        self.started = False

    async def wait(self) -> None:
        self.started = True
        try:
            await self.event.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_the_first_to_finish_wins_and_the_rest_is_cancelled() -> None:
    a, b = Watched(), Watched()
    b.event.set()
    assert await wait_first(a.wait(), b.wait(), timeout=10) == 1
    assert a.cancelled and not b.cancelled


async def test_a_timeout_is_none_and_cancels_what_it_started() -> None:
    a = Watched()
    assert await wait_first(a.wait(), timeout=0.01) is None
    assert a.cancelled


async def test_a_task_it_was_given_is_only_watched() -> None:
    a = Watched()
    task = asyncio.create_task(a.wait())
    assert await wait_first(task, timeout=0.01) is None
    assert not task.done() and not a.cancelled
    a.event.set()
    assert await wait_first(task, Watched().wait(), timeout=10) == 0
    assert task.done()


async def test_the_error_of_a_winner_it_started_is_raised() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    a = Watched()
    with pytest.raises(ValueError, match="boom"):
        await wait_first(a.wait(), boom(), timeout=10)
    assert a.cancelled


async def test_cancelling_the_caller_cancels_what_it_started() -> None:
    a, b = Watched(), Watched()
    waiter = asyncio.create_task(wait_first(a.wait(), b.wait()))
    await until(lambda: a.started and b.started)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert a.cancelled and b.cancelled


async def test_a_queue_put_that_lost_leaves_nothing_behind() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
    queue.put_nowait(1)
    stop = asyncio.Event()
    stop.set()
    assert await wait_first(queue.put(2), stop.wait(), timeout=10) == 1
    assert queue.qsize() == 1 and queue.get_nowait() == 1
