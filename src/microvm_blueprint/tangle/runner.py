"""BlueprintRunner: producer -> bounded queue -> router/handlers -> outbox -> consumer (DESIGN.md §2).

One root task group. Background services start first and must signal ready (within a deadline)
before the producer starts. Calls flow through a bounded queue; the router decodes each call once and
gives it an ordering key. Calls with the same key run one at a time in call order, in one task (a
chain) that holds one of ``max_concurrency`` slots, taken *before* the task is created; a call whose
key already has a chain joins it without a slot (at most ``queue_size`` calls wait that way), so
neither the live handler tasks nor the calls held in memory grow with a backlog, and a call waiting
for its key never holds a slot. The chains live in a task group nested in the root one.

One bad job never takes the service down: a handler's :class:`JobError` (and inputs that do not
decode) is the job's failure text, anything else is logged with its traceback and recorded as an
internal error. A failed job is never sent on-chain. A :class:`TransientError` (a locked database)
says nothing about the call: it is retried with backoff a few times within a deadline and, if it
persists, the call is left ``new`` (it runs again at the next start) and so are the later calls of
its key, which must not overtake it.

``stop()`` (wired to SIGINT/SIGTERM by the entry point) stops taking calls, lets in-flight handlers
finish within ``drain_timeout``, flushes the outbox best-effort, then cancels the rest. Calls that
were queued but not started stay ``new`` in the inbox and run at the next start.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from ..crashpoints import crash_point
from ..errors import MicrovmBlueprintError, TransientError
from .aio import wait_first
from .calls import GuardedObserver, JobCall, JobObserver
from .consumer import TangleConsumer
from .errors import JobError, TangleError
from .producer import Backoff, TangleProducer
from .router import Routed, Router
from .state import TangleState

log = logging.getLogger(__name__)


class BackgroundService(Protocol):
    """Runs beside the job pipeline (e.g. the query API)."""

    name: str

    async def run(self, ready: asyncio.Event) -> None:
        """Serve until cancelled; set ``ready`` once serving. Raise to stop the whole runner."""


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
        retry_attempts: int = 4,
        retry_deadline: float = 30.0,
        retry_backoff: float = 0.25,
    ) -> None:
        self.router = router
        self.producer = producer
        self.consumer = consumer
        self.state = state
        self.services = list(background_services)
        self.observer = GuardedObserver(observer)
        self.queue: asyncio.Queue[JobCall | None] = asyncio.Queue(maxsize=max(1, queue_size))
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.producer_grace = producer_grace
        self.retry_attempts = max(1, retry_attempts)
        self.retry_deadline = retry_deadline
        self.retry_backoff = retry_backoff
        self._slots = asyncio.Semaphore(max(1, max_concurrency))  # one per live chain (handler task)
        self._waiting = asyncio.Semaphore(max(1, queue_size))  # one per call waiting in a chain
        self._chains: dict[str, collections.deque[Routed]] = {}  # key -> the calls waiting behind its running one
        self._held_back: set[str] = set()  # keys whose call was left unfinished: the rest waits for the next start
        self._stop = asyncio.Event()
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

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            service_tasks = []
            for svc in self.services:
                ready = asyncio.Event()
                task = tg.create_task(svc.run(ready), name=f"service:{svc.name}")
                service_tasks.append(task)
                if await wait_first(ready.wait(), task, timeout=self.ready_timeout) != 0:
                    if task.done():
                        await task  # re-raise its error
                    raise TangleError(f"background service {svc.name} did not become ready in {self.ready_timeout}s")
            consumer_task = tg.create_task(self.consumer.run(self._stop), name="consumer")
            producer_task = tg.create_task(self.producer.run(self._deliver, self._stop), name="producer")
            jobs = tg.create_task(self._jobs(), name="jobs")
            self.ready.set()
            await self._stop.wait()
            # the producer's state is durable at every await point: give it a moment, then cancel it
            if await wait_first(producer_task, timeout=self.producer_grace) is None:
                producer_task.cancel()
                await asyncio.wait({producer_task})
            self._close_queue()
            await self._drain(jobs)
            await consumer_task
            for task in service_tasks:
                task.cancel()

    async def _deliver(self, call: JobCall) -> None:
        """The producer's hand-over: waits for room in the bounded queue, gives up once stopping (the
        call stays ``new`` in the inbox and runs at the next start)."""
        if not self._stop.is_set():
            await wait_first(self.queue.put(call), self._stop.wait())

    def _close_queue(self) -> None:
        """After stop() and the producer: the queued calls are not started (they stay ``new``); the
        dispatcher is woken to end."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def _jobs(self) -> None:
        """The dispatcher, and every chain it starts in a nested task group: ends once stop() has been
        called and the chains in flight are done (or cancelled, with this task, by :meth:`_drain`)."""
        async with asyncio.TaskGroup() as chains:
            await self._dispatch(chains)

    async def _dispatch(self, chains: asyncio.TaskGroup) -> None:
        while True:
            call = await self.queue.get()
            if call is None or self._stop.is_set():
                return  # not started: stays ``new`` in the inbox for the next start
            routed = self.router.prepare(call)
            if routed.key in self._held_back:
                log.warning("call %d not run: an earlier call of its key waits for the next start", call.call_id,
                            extra={"call_id": call.call_id})
                continue
            if routed.key in self._chains:
                await self._waiting.acquire()
                waiting = self._chains.get(routed.key)  # that chain may have ended meanwhile
                if waiting is not None:
                    waiting.append(routed)
                    continue
                self._waiting.release()
            await self._slots.acquire()  # backpressure: a slot before the task
            if self._stop.is_set():
                self._slots.release()
                return
            self._chains[routed.key] = collections.deque()
            chains.create_task(self._chain(routed), name=f"job:{call.call_id}")

    async def _chain(self, routed: Routed) -> None:
        """Run ``routed``, then each call that joined its key meanwhile, in order; holds one slot."""
        key = routed.key
        waiting = self._chains[key]
        try:
            while not self._stop.is_set():  # a turn that comes after stop(): stays ``new`` for the next start
                task = asyncio.current_task()
                if task is not None:
                    task.set_name(f"job:{routed.call.call_id}")
                if not await self._handle(routed):
                    self._held_back.add(key)
                    if waiting:
                        log.warning("%d later call(s) of the same key wait for the next start", len(waiting))
                    return
                if not waiting:
                    return
                routed = waiting.popleft()
                self._waiting.release()
        finally:
            del self._chains[key]
            for _ in waiting:
                self._waiting.release()
            self._slots.release()

    async def _drain(self, jobs: asyncio.Task[None]) -> None:
        if self._chains:
            log.info("waiting up to %.0fs for %d in-flight job(s)", self.drain_timeout, len(self._chains))
        if await wait_first(jobs, timeout=self.drain_timeout) is None:
            left = len(self._chains)
            jobs.cancel()
            await asyncio.wait({jobs})
            log.warning("abandoned %d in-flight job(s); they run again at the next start", left)

    async def _handle(self, routed: Routed) -> bool:
        """Run one call and record its outcome. False: left ``new`` after transient failures."""
        call = routed.call
        finished = True
        try:
            finished = await self._handle_inner(routed)
        except asyncio.CancelledError:
            raise
        except Exception:  # the inbox or outbox failed us: the call stays ``new`` and runs again next start
            log.exception("could not record the outcome of call %d", call.call_id, extra={"call_id": call.call_id})
        self.handled += 1
        return finished

    async def _handle_inner(self, routed: Routed) -> bool:
        call, job = routed.call, routed.name
        started = time.perf_counter()
        extra = {"call_id": call.call_id, "job": job, "key": routed.key.removeprefix("key:"), "caller": call.caller}
        self.observer.on_received(call, job)
        if self.state.call_status(call.service_id, call.call_id) in ("done", "superseded"):
            return True  # handled before a restart (nothing to do twice), or gone with a reorg
        error = routed.refused
        output: bytes | None = None
        if routed.route is None:
            log.warning("ignoring call %d: %s", call.call_id, error, extra=extra)
        elif error is None:
            outcome = await self._attempt(routed, extra)
            if outcome is None:
                return False
            output, error = outcome
        crash_point("runner.after_handler")
        ms = (time.perf_counter() - started) * 1000
        # the observer hears first: a crash before ``finish`` reruns the call (and tells it again)
        if error is None and output is not None:
            self.observer.on_done(call, output)
            self.state.finish(call.service_id, call.call_id, output)
            crash_point("runner.after_finish")
            self.consumer.wake()
            log.info("job %s call %d done in %.1f ms", job, call.call_id, ms, extra=extra)
        else:
            self.observer.on_failed(call, error or "handler returned no result")
            self.state.finish(call.service_id, call.call_id, None)
            if routed.route is not None:
                log.info("job %s call %d failed in %.1f ms: %s", job, call.call_id, ms, error, extra=extra)
        return True

    async def _attempt(self, routed: Routed, extra: dict[str, object]) -> tuple[bytes | None, str | None] | None:
        """``(output, None)`` or ``(None, failure text)``; ``None`` when the handler kept failing with a
        :class:`TransientError` (retried with backoff up to ``retry_attempts`` within ``retry_deadline``,
        and not after stop())."""
        assert routed.route is not None
        call, job = routed.call, routed.name
        backoff = Backoff(base=self.retry_backoff / 2, cap=max(self.retry_backoff, 5.0))
        deadline = time.monotonic() + self.retry_deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                output = await routed.route.handler(call, routed.args)
            except TransientError as exc:
                delay = backoff.next()
                if attempt >= self.retry_attempts or time.monotonic() + delay > deadline or self._stop.is_set():
                    log.warning("job %s call %d: %s (%d attempt(s)); left unfinished, it runs again at the next "
                                "start", job, call.call_id, exc, attempt, extra=extra)
                    return None
                log.warning("job %s call %d: %s; retrying in %.2fs", job, call.call_id, exc, delay, extra=extra)
                if await wait_first(self._stop.wait(), timeout=delay) is not None:
                    log.warning("job %s call %d: stopping before its retry; it runs again at the next start",
                                job, call.call_id, extra=extra)
                    return None
                continue
            except JobError as exc:
                return None, str(exc) or type(exc).__name__
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s (call %d) crashed", job, call.call_id, extra=extra)
                return None, "internal error while running the job"
            if not isinstance(output, bytes | bytearray):
                log.error("job %s (call %d) returned %s, not bytes", job, call.call_id,
                          type(output).__name__, extra=extra)
                return None, "internal error while running the job"
            return bytes(output), None
