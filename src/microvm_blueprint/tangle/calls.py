"""What a job call is, and who hears what becomes of it: shared by the producer (which finds calls),
the state (which stores them), the router, the runner and the result sender (which report on them)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobCall:
    """One ``JobSubmitted`` (or ``JobSubmittedFromQuote``) call, as read from the chain and kept in the inbox."""

    service_id: int
    call_id: int
    job_index: int
    caller: str
    inputs: bytes
    block_number: int = 0
    block_hash: str = ""
    log_index: int = 0
    tx_hash: str = ""
    from_quote: bool = False


class JobObserver(Protocol):
    """Hears what becomes of each call (the blueprint layer's job journal). Called directly by the
    runner (received, done, failed) and the result sender (submitted, dropped), always through a
    :class:`GuardedObserver`, so a failing observer is logged and never hurts the job."""

    def on_received(self, call: JobCall, job: str) -> None:
        """The runner is about to run ``call`` as the job named ``job`` (again, after a restart)."""

    def on_done(self, call: JobCall, output: bytes) -> None:
        """The job succeeded with ``output``; told before the outcome is recorded (a crash re-tells)."""

    def on_failed(self, call: JobCall, error: str) -> None:
        """The job failed with the customer-facing ``error``; nothing is sent for it."""

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        """The result of ``call_id`` is on-chain in transaction ``tx_hash``."""

    def on_dropped(self, call_id: int, reason: str) -> None:
        """The result of ``call_id`` will never be sent (a permanent revert, or a reorg gave the id away)."""


class _Nobody:
    """An observer that hears nothing."""

    def on_received(self, call: JobCall, job: str) -> None:
        """Ignored."""

    def on_done(self, call: JobCall, output: bytes) -> None:
        """Ignored."""

    def on_failed(self, call: JobCall, error: str) -> None:
        """Ignored."""

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        """Ignored."""

    def on_dropped(self, call_id: int, reason: str) -> None:
        """Ignored."""


def _safely(event: Callable[..., None], call_id: int, *args: object) -> None:
    try:
        event(*args)
    except Exception:
        log.exception("job observer failed on %s of call %d", event.__name__, call_id,
                      extra={"call_id": call_id})


class GuardedObserver:
    """A :class:`JobObserver` that passes every event on to ``inner`` (none: nobody) and logs, never
    raises, its failure."""

    def __init__(self, inner: JobObserver | None = None) -> None:
        self.inner: JobObserver = inner if inner is not None else _Nobody()

    def on_received(self, call: JobCall, job: str) -> None:
        """See :meth:`JobObserver.on_received`."""
        _safely(self.inner.on_received, call.call_id, call, job)

    def on_done(self, call: JobCall, output: bytes) -> None:
        """See :meth:`JobObserver.on_done`."""
        _safely(self.inner.on_done, call.call_id, call, output)

    def on_failed(self, call: JobCall, error: str) -> None:
        """See :meth:`JobObserver.on_failed`."""
        _safely(self.inner.on_failed, call.call_id, call, error)

    def on_submitted(self, call_id: int, tx_hash: str) -> None:
        """See :meth:`JobObserver.on_submitted`."""
        _safely(self.inner.on_submitted, call_id, call_id, tx_hash)

    def on_dropped(self, call_id: int, reason: str) -> None:
        """See :meth:`JobObserver.on_dropped`."""
        _safely(self.inner.on_dropped, call_id, call_id, reason)
