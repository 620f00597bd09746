"""Waiting on a condition with a deadline, never sleeping for luck: the tests' one way to wait."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition", *, every: float = 0.01
) -> None:
    """Return once ``cond()`` (a plain or an async predicate) is true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)
