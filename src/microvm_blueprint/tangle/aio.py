"""Small asyncio helpers shared by the runner, the producer and the result sender."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def wait_first(*aws: Awaitable[Any], timeout: float | None = None) -> int | None:
    """Wait until the first of ``aws`` finishes, or ``timeout`` seconds; return its position (the lowest
    one when several finished together), ``None`` when the time ran out first.

    A coroutine (e.g. ``event.wait()``, ``queue.put(x)``) is run as a task of ours: once one finishes
    (or on timeout, or when the caller is cancelled) the others are cancelled and reaped before this
    returns, and if the first one to finish is ours and raised, that error is raised here. A future or
    task passed in is only watched: it is never cancelled, and its outcome is the caller's to read.
    """
    if not aws:
        raise ValueError("wait_first needs at least one awaitable")
    futures: list[asyncio.Future[Any]] = []
    ours: list[asyncio.Future[Any]] = []
    for aw in aws:
        if asyncio.isfuture(aw):
            futures.append(aw)
        else:
            task: asyncio.Future[Any] = asyncio.ensure_future(aw)
            futures.append(task)
            ours.append(task)
    try:
        done, _ = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left = [f for f in ours if not f.done()]
        for pending in left:
            pending.cancel()
        if left:
            await asyncio.wait(left)
    first: int | None = None
    for i, fut in enumerate(futures):
        if fut in done and first is None:
            first = i
        if fut in ours and fut.done() and not fut.cancelled():
            error = fut.exception()  # read, so that none goes unretrieved
            if error is not None and i == first:
                raise error
    return first
