"""Change notification for the query API: waits that wake on a change, and the lifecycle event stream.

The store and the job journal call a listener after every committed write (``Store.add_listener``,
``JobJournal.add_listener``); the :class:`EventHub` turns those calls into

* wake-ups of the requests waiting on a VM (``GET /vms/{id}/wait``) or a job call
  (``GET /jobs/{call_id}/wait``): one :class:`asyncio.Event` per waiting request, set only when a write
  touched that VM or call, so nothing polls the store. A bounded number of them (:class:`TooBusy`
  past it); a waiter is forgotten the moment its request ends (answered, timed out or disconnected);
* Server-Sent Events (``GET /events``): after writes, one *pump* (a loop callback, coalescing all the
  writes since the last one) reads the new rows of the store's history (its ``seq`` is the event id),
  encodes each once and appends it to every subscriber's bounded queue. A subscriber whose queue is
  full (it does not read) is dropped: its queue is freed and its stream ends, and it can resume with
  ``Last-Event-ID``. With no subscriber there is no pump and a write costs one function call.

A write may come from a worker thread; the listener then hands over to the loop's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from ..errors import MicrovmBlueprintError
from ..runtime.store import HistoryEvent, Store
from .journal import JobJournal

log = logging.getLogger(__name__)

#: requests waiting at once (``/vms/{id}/wait`` and ``/jobs/{id}/wait`` together) before 503
MAX_WAITERS = 1000
#: ``/events`` streams at once before 503
MAX_SUBSCRIBERS = 200
#: events queued for one subscriber before it counts as too slow and is dropped
QUEUE_LIMIT = 1024
#: history rows one pump reads (the next pump is another loop turn)
PUMP_BATCH = 256


class Unavailable(MicrovmBlueprintError):
    """A live endpoint cannot serve now: answered 503 (too busy, shutting down, or no event hub)."""


class TooBusy(Unavailable):
    """Too many waiters or subscribers: the request is answered 503."""


class Closed(Unavailable):
    """The hub is shutting down (the server is stopping)."""


def event_json(ev: HistoryEvent) -> dict[str, Any]:
    """One lifecycle event as ``/events`` sends it (``seq`` is also its SSE id)."""
    return {
        "seq": ev.seq,
        "vm_id": ev.vm_id,
        "status": ev.status.value,
        "action": ev.action,
        "call_id": ev.call_id,
        "caller": ev.caller,
        "at": ev.at,
    }


def sse_bytes(ev: HistoryEvent) -> bytes:
    """``ev`` as one SSE message: ``id: <seq>`` and one ``data:`` line of compact JSON."""
    data = json.dumps(event_json(ev), ensure_ascii=False, separators=(",", ":"))
    return f"id: {ev.seq}\ndata: {data}\n\n".encode()


class Subscriber:
    """One ``/events`` stream: its filter and its bounded queue of encoded events."""

    __slots__ = ("closed", "dropped", "queue", "stop", "vm_id", "wake")

    def __init__(self, vm_id: str | None) -> None:
        self.vm_id = vm_id
        self.queue: deque[bytes] = deque()
        self.wake = asyncio.Event()  # set when something was queued (or the stream must end)
        self.stop = asyncio.Event()  # set when the stream must end: dropped, closed, client gone
        self.dropped = False
        self.closed = False

    def push(self, data: bytes) -> None:
        if self.dropped:
            return
        if len(self.queue) >= QUEUE_LIMIT:
            self.dropped = True
            self.queue.clear()  # the memory goes at once, not when the stream task next runs
            self.stop.set()
        else:
            self.queue.append(data)
        self.wake.set()

    def end(self) -> None:
        """The stream ends (the client went, or the server stops)."""
        self.closed = True
        self.stop.set()
        self.wake.set()

    def take(self) -> list[bytes]:
        """Everything queued, oldest first; clears the wake-up."""
        out = list(self.queue)
        self.queue.clear()
        self.wake.clear()
        return out


class EventHub:
    """Waiters and subscribers of one store (and job journal); use it from one event loop."""

    def __init__(
        self,
        store: Store,
        journal: JobJournal | None = None,
        *,
        max_waiters: int = MAX_WAITERS,
        max_subscribers: int = MAX_SUBSCRIBERS,
    ) -> None:
        self.store = store
        self.journal = journal
        self.max_waiters = max_waiters
        self.max_subscribers = max_subscribers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._vm_waiters: dict[str, set[asyncio.Event]] = {}
        self._job_waiters: dict[int, set[asyncio.Event]] = {}
        self._waiting = 0
        self._subs: set[Subscriber] = set()
        self._seq = 0  # the newest history row handed to subscribers (valid while there are some)
        self._pump_due = False
        self._closed = False
        store.add_listener(self._on_store_write)
        if journal is not None:
            journal.add_listener(self._on_journal_write)

    # ---- figures (tests, the benchmark, the dashboard) ------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        return self._waiting

    @property
    def subscribers(self) -> int:
        """``/events`` streams now."""
        return len(self._subs)

    def close(self) -> None:
        """End every wait (they answer 503) and every stream; later ones are refused. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.store.remove_listener(self._on_store_write)
        if self.journal is not None:
            self.journal.remove_listener(self._on_journal_write)
        for waiters in (*self._vm_waiters.values(), *self._job_waiters.values()):
            for event in waiters:
                event.set()
        for sub in self._subs:
            sub.end()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- listeners (called by the store and the journal, in the writing thread) ---------------

    def _attach(self) -> None:
        if self._closed:
            raise Closed("the query API is shutting down")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.get_ident()

    def _hand_over(self, fn: Any, arg: Any) -> bool:
        """True when the caller may run ``fn(arg)`` now (it is on the loop's thread); else it is
        scheduled on the loop and False."""
        if self._loop is None:
            return False  # nobody has ever waited or subscribed: nothing to do
        if threading.get_ident() == self._thread:
            return True
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop is closed
            pass
        return False

    def _on_store_write(self, touches: tuple[str, ...] | None) -> None:
        if (self._vm_waiters or self._subs) and self._hand_over(self._store_changed, touches):
            self._store_changed(touches)

    def _on_journal_write(self, call_id: int) -> None:
        if self._job_waiters and self._hand_over(self._journal_changed, call_id):
            self._journal_changed(call_id)

    def _store_changed(self, touches: tuple[str, ...] | None) -> None:
        if self._vm_waiters:
            if touches is None:
                for waiters in self._vm_waiters.values():
                    for event in waiters:
                        event.set()
            else:
                for vm_id in touches:
                    for event in self._vm_waiters.get(vm_id, ()):
                        event.set()
        if self._subs and not self._pump_due and self._loop is not None:
            self._pump_due = True
            self._loop.call_soon(self._pump)

    def _journal_changed(self, call_id: int) -> None:
        for event in self._job_waiters.get(call_id, ()):
            event.set()

    # ---- waits ---------------------------------------------------------------------------------

    @contextmanager
    def _waiter(self, table: dict[Any, set[asyncio.Event]], key: Any) -> Iterator[asyncio.Event]:
        self._attach()
        if self._waiting >= self.max_waiters:
            raise TooBusy(f"too many requests waiting (at most {self.max_waiters}); try again later")
        event = asyncio.Event()
        table.setdefault(key, set()).add(event)
        self._waiting += 1
        try:
            yield event
        finally:
            self._waiting -= 1
            waiters = table.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del table[key]

    def vm_waiter(self, vm_id: str) -> AbstractContextManager[asyncio.Event]:
        """``with hub.vm_waiter(id) as changed:`` ``changed`` is set after each write touching the VM
        (clear it before reading the VM). Raises :class:`TooBusy`, :class:`Closed`."""
        return self._waiter(self._vm_waiters, vm_id)

    def job_waiter(self, call_id: int) -> AbstractContextManager[asyncio.Event]:
        """As :meth:`vm_waiter`, for changes to a job call's journal entry."""
        return self._waiter(self._job_waiters, call_id)

    # ---- the event stream ------------------------------------------------------------------------

    def subscribe(self, vm_id: str | None) -> tuple[Subscriber, int]:
        """A new subscriber and the ``seq`` of the newest event it will *not* get from its queue (send
        it the history up to there first, when resuming). Raises :class:`TooBusy`, :class:`Closed`."""
        self._attach()
        if len(self._subs) >= self.max_subscribers:
            raise TooBusy(f"too many event streams (at most {self.max_subscribers}); try again later")
        if not self._subs:
            self._seq = self.store.last_event_seq()  # no pump ran while nobody listened
        sub = Subscriber(vm_id)
        self._subs.add(sub)
        return sub, self._seq

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)
        sub.queue.clear()

    def _pump(self) -> None:
        """Hand the history rows written since the last pump to the subscribers (a loop callback)."""
        self._pump_due = False
        if not self._subs or self._closed:
            return
        try:
            rows = self.store.events_after(self._seq, limit=PUMP_BATCH)
        except MicrovmBlueprintError as exc:  # a locked database: the next write pumps again
            log.warning("event stream could not read the history: %s", exc)
            return
        for ev in rows:
            data = sse_bytes(ev)
            for sub in self._subs:
                if sub.vm_id is None or sub.vm_id == ev.vm_id:
                    sub.push(data)
        if rows:
            self._seq = rows[-1].seq
        if len(rows) == PUMP_BATCH and self._loop is not None:  # more: on the next loop turn
            self._pump_due = True
            self._loop.call_soon(self._pump)
