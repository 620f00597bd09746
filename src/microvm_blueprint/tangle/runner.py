"""BlueprintRunner: producer -> bounded queue -> router/handlers -> outbox -> consumer (DESIGN.md §2).

One root task group. Background services start first and must signal ready (within a deadline)
before the producer starts. Calls flow through a bounded queue; calls with the same ordering key
run one at a time in call order, others concurrently (bounded). One bad job never takes the service
down: a handler's :class:`JobError` is the job's failure text, anything else is logged with its
traceback and recorded as an internal error. A failed job is never sent on-chain.

``stop()`` (wired to SIGINT/SIGTERM by the entry point) stops taking calls, lets in-flight handlers
finish within ``drain_timeout``, flushes the outbox best-effort, then cancels the rest. Calls that
were queued but not started stay ``new`` in the inbox and run at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from ..crashpoints import crash_point
from ..errors import MicrovmBlueprintError
from .consumer import TangleConsumer
from .errors import JobError, TangleError
from .producer import JobCall, TangleProducer
from .router import Router
from .state import TangleState

log = logging.getLogger(__name__)


class BackgroundService(Protocol):
    """Runs beside the job pipeline (e.g. the query API)."""

    name: str

    async def run(self, ready: asyncio.Event) -> None:
        """Serve until cancelled; set ``ready`` once serving. Raise to stop the whole runner."""


class JobObserver(Protocol):
    """Hears what becomes of each call (the blueprint layer's job journal). Must not raise."""

    def on_received(self, call: JobCall, job: str) -> None: ...
    def on_done(self, call: JobCall, output: bytes) -> None: ...
    def on_failed(self, call: JobCall, error: str) -> None: ...
    def on_submitted(self, call_id: int, tx_hash: str) -> None: ...
    def on_dropped(self, call_id: int, reason: str) -> None: ...


class _NullObserver:
    def on_received(self, call: JobCall, job: str) -> None: ...
    def on_done(self, call: JobCall, output: bytes) -> None: ...
    def on_failed(self, call: JobCall, error: str) -> None: ...
    def on_submitted(self, call_id: int, tx_hash: str) -> None: ...
    def on_dropped(self, call_id: int, reason: str) -> None: ...


class BlueprintRunner:
    def __init__(
        self,
        router: Router,
        producer: TangleProducer,
        consumer: TangleConsumer,
        state: TangleState,
        *,
        background_services: Sequence[BackgroundService] = (),
        observer: JobObserver | None = None,
        max_concurrency: int = 16,
        queue_size: int = 256,
        ready_timeout: float = 30.0,
        drain_timeout: float = 30.0,
        producer_grace: float = 1.0,
    ) -> None:
        self.router = router
        self.producer = producer
        self.consumer = consumer
        self.state = state
        self.services = list(background_services)
        self.observer: JobObserver = observer or _NullObserver()
        self.queue: asyncio.Queue[JobCall] = asyncio.Queue(maxsize=queue_size)
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.producer_grace = producer_grace
        self._sem = asyncio.Semaphore(max_concurrency)
        self._stop = asyncio.Event()
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()
        self.handled = 0

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent, callable from a signal handler)."""
        if not self._stop.is_set():
            log.info("shutdown requested: no new jobs; finishing in-flight ones")
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`stop` (then shut down gracefully) or until cancelled (then at once)."""
        try:
            await self._run()
        except* MicrovmBlueprintError as group:
            raise group.exceptions[0] from None
        finally:
            await self._cancel_handlers()

    async def _cancel_handlers(self) -> None:
        """Handler tasks live outside the task group (they outlive the dispatcher during a drain): make
        sure none survives the runner, whatever way it ends."""
        left = [t for t in self._handlers if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            service_tasks = []
            for svc in self.services:
                ready = asyncio.Event()
                task = tg.create_task(svc.run(ready), name=f"service:{svc.name}")
                service_tasks.append(task)
                waiter = asyncio.create_task(ready.wait())
                done, _ = await asyncio.wait({waiter, task}, timeout=self.ready_timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    if task.done():
                        await task  # re-raise its error
                    raise TangleError(f"background service {svc.name} did not become ready in {self.ready_timeout}s")
            consumer_task = tg.create_task(self.consumer.run(self._stop), name="consumer")
            producer_task = tg.create_task(self.producer.run(self._deliver, self._stop), name="producer")
            dispatcher = tg.create_task(self._dispatch(), name="dispatcher")
            self.ready.set()
            await self._stop.wait()
            # the producer's state is durable at every await point: give it a moment, then cancel it
            await asyncio.wait({producer_task}, timeout=self.producer_grace)
            if not producer_task.done():
                producer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer_task
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
            await self._drain()
            await consumer_task
            for task in service_tasks:
                task.cancel()

    async def _deliver(self, call: JobCall) -> None:
        """The producer's hand-over: waits for room in the bounded queue, gives up once stopping (the
        call stays ``new`` in the inbox and runs at the next start)."""
        if self._stop.is_set():
            return
        put = asyncio.ensure_future(self.queue.put(call))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({put, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (put, stopped):
                if not task.done():
                    task.cancel()

    async def _dispatch(self) -> None:
        while True:
            call = await self.queue.get()
            if self._stop.is_set():
                continue  # not started: stays ``new`` in the inbox for the next start
            key = self.router.ordering_key(call)
            prev = self._tails.get(key)
            task = asyncio.create_task(self._after(prev, call, key), name=f"job:{call.call_id}")
            self._tails[key] = task
            self._handlers.add(task)
            task.add_done_callback(functools.partial(self._done, key=key))

    def _done(self, task: asyncio.Task[None], key: str) -> None:
        self._handlers.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _drain(self) -> None:
        if not self._handlers:
            return
        pending = set(self._handlers)
        log.info("waiting up to %.0fs for %d in-flight job(s)", self.drain_timeout, len(pending))
        _, still = await asyncio.wait(pending, timeout=self.drain_timeout)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)
            log.warning("abandoned %d in-flight job(s); they run again at the next start", len(still))

    async def _after(self, prev: asyncio.Task[None] | None, call: JobCall, key: str) -> None:
        if prev is not None:
            await asyncio.wait([prev])
        async with self._sem:
            if self._stop.is_set():
                return  # its turn came after stop(): not started, stays ``new`` for the next start
            await self._handle(call, key)

    def _observe(self, what: str, *args: object) -> None:
        """Call the observer; its failure is logged, never the job's or the service's."""
        try:
            getattr(self.observer, what)(*args)
        except Exception:
            log.exception("job observer %s failed", what)

    async def _handle(self, call: JobCall, key: str) -> None:
        try:
            await self._handle_inner(call, key)
        except asyncio.CancelledError:
            raise
        except Exception:  # the inbox or outbox failed us: the call stays ``new`` and runs again next start
            log.exception("could not record the outcome of call %d", call.call_id, extra={"call_id": call.call_id})
        self.handled += 1

    async def _handle_inner(self, call: JobCall, key: str) -> None:
        route = self.router.lookup(call.job_index)
        job = self.router.name_of(call.job_index)
        started = time.perf_counter()
        extra = {"call_id": call.call_id, "job": job, "key": key.removeprefix("key:"), "caller": call.caller}
        self._observe("on_received", call, job)
        if self.state.call_status(call.service_id, call.call_id) in ("done", "superseded"):
            return  # handled before a restart (nothing to do twice), or gone with a reorg
        error: str | None = None
        output: bytes | None = None
        if route is None:
            error = f"unknown job index {call.job_index}"
            log.warning("ignoring call %d: %s", call.call_id, error, extra=extra)
        else:
            try:
                output = await route.handler(call)
            except JobError as exc:
                error = str(exc) or type(exc).__name__
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s (call %d) crashed", job, call.call_id, extra=extra)
                error = "internal error while running the job"
            else:
                if not isinstance(output, bytes | bytearray):
                    log.error("job %s (call %d) returned %s, not bytes", job, call.call_id,
                              type(output).__name__, extra=extra)
                    error, output = "internal error while running the job", None
        crash_point("runner.after_handler")
        ms = (time.perf_counter() - started) * 1000
        # the observer hears first: a crash before ``finish`` reruns the call (and tells it again)
        if error is None and output is not None:
            self._observe("on_done", call, bytes(output))
            self.state.finish(call.service_id, call.call_id, bytes(output))
            crash_point("runner.after_finish")
            self.consumer.wake()
            log.info("job %s call %d done in %.1f ms", job, call.call_id, ms, extra=extra)
        else:
            self._observe("on_failed", call, error or "handler returned no result")
            self.state.finish(call.service_id, call.call_id, None)
            if route is not None:
                log.info("job %s call %d failed in %.1f ms: %s", job, call.call_id, ms, error, extra=extra)
