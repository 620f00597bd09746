"""The query API as a background service: uvicorn on a loopback port by default.

Limits (DESIGN.md §9), because the API shares its process, and so its file handles, with the chain
connection and the VMMs:

* **header timeout**: a connection must bring a complete request head within ``header_timeout`` of
  opening (or of its previous answer); otherwise it is sent a 408 and closed, however slowly it
  trickles bytes (uvicorn has no such timer: its keep-alive timer is reset by every byte). The close
  lingers: the write side is shut after the 408 and what the client still sends is read and dropped
  for up to ``LINGER`` seconds, because closing a socket with unread bytes makes the kernel send a
  reset, and a reset can reach the client before it has read the 408;
* **connection cap**: at most ``max_connections`` at once, and never more than half the process's
  open-file limit (:func:`connection_cap`). A new connection beyond the cap makes room by closing the
  oldest connection that is waiting for a request (idle, or a request head still unfinished); when
  every connection is busy with a request, the new one is refused (``503`` and closed);
* **accepting**: done here, not by asyncio's ``create_server``. Out of file handles (EMFILE), asyncio
  logged "socket.accept() out of system resource" and retried up to 2,048 times per wake-up
  (half a million lines in 80 s); here accepting pauses for ``ACCEPT_PAUSE`` seconds with one
  warning, and the handles that are left go to the chain connection and the VMMs;
* **file limit**: at start the open-file soft limit is raised to the hard limit (:func:`raise_file_limit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import MicrovmBlueprintError
from .query import QueryApp

log = logging.getLogger(__name__)

#: how long uvicorn may take to stop (its own graceful shutdown gives requests 2 s) before it is cancelled
STOP_TIMEOUT = 5.0
#: file handles never given to API connections, whatever the limit (SQLite, the chain, VMM sockets, pipes)
FD_RESERVE_MIN = 64
#: seconds accepting pauses when the process is out of file handles
ACCEPT_PAUSE = 1.0
#: seconds a connection closed with an answer keeps reading (and dropping) what its client still sends
LINGER = 2.0
#: connections taken from the listening socket per wake-up (the rest wait for the next loop turn)
ACCEPT_BATCH = 64
#: at most one "out of file handles" warning per this many seconds
WARN_EVERY = 60.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESPONSE_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_BODY_503 = b'{"error":"too many connections: every connection of the query API is busy; try again"}'
_RESPONSE_503 = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: " + str(len(_BODY_503)).encode() + b"\r\n\r\n" + _BODY_503)


def raise_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses an infinite NOFILE: aim at its usual ceiling
        target = soft if soft == resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_cap(configured: int, nofile: int) -> int:
    """How many API connections to allow under an open-file limit of ``nofile``: ``configured``, but
    never more than half the limit, and never the last :data:`FD_RESERVE_MIN` handles (at least 1)."""
    return max(1, min(configured, nofile - max(FD_RESERVE_MIN, (nofile + 1) // 2)))


class ConnectionGuard:
    """The shared state of the limits: the connections counted, those waiting for a request (oldest
    first: the ones to close to make room), and counters the tests and logs read."""

    def __init__(self, cap: int, header_timeout: float) -> None:
        self.cap = cap
        self.header_timeout = header_timeout
        self.live: set[GuardedH11] = set()
        self.waiting: dict[GuardedH11, None] = {}  # insertion order: oldest first
        self.lingering: dict[GuardedH11, None] = {}  # answered and half-closed, oldest first
        self.pending = 0  # accepted, protocol not made yet
        self.refused = 0
        self.timed_out = 0
        self.evicted = 0

    @property
    def open(self) -> int:
        """Connections held now (counted from accept until closed or handed to a WebSocket protocol)."""
        return len(self.live) + self.pending

    def make_room(self) -> bool:
        """Whether one more connection may be taken; at the cap, close the oldest waiting one for it."""
        if self.open < self.cap:
            return True
        if self.lingering:  # already answered: only its last unread bytes are lost
            next(iter(self.lingering)).drop(None)
            return True
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        self.evicted += 1
        oldest.drop(None)
        return True

    def release(self, proto: GuardedH11) -> None:
        self.live.discard(proto)
        self.waiting.pop(proto, None)
        self.lingering.pop(proto, None)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with the header timeout and the bookkeeping of :class:`ConnectionGuard`."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any], guard: ConnectionGuard,
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.made = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.made = True
        self.guard.pending -= 1  # counted from accept as pending, now as live
        self.guard.live.add(self)
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self in self.guard.lingering:
            return  # answered and half-closed: read only so that the kernel does not reset the connection
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a complete request head arrived
            self._stop_timer()
            self.guard.waiting.pop(self, None)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request (handle_events above)
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_request()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._stop_timer()
        self.guard.release(self)  # the WebSocket protocol takes the connection over (the app refuses it)
        super().handle_websocket_upgrade(event)

    def drop(self, response: bytes | None) -> None:
        """Close the connection: at once without ``response``; with one, after writing it, shutting the
        write side and reading what the client still sends for up to ``LINGER`` seconds (still counted
        against the cap, and the first to go when room is needed)."""
        self._stop_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self.transport.is_closing():
            self.guard.release(self)
            return
        if self in self.guard.lingering:
            response = None  # already answered
        if response is None or not self.transport.can_write_eof():
            self.guard.release(self)
            if response is not None:
                self.transport.write(response)
            self.transport.close()
            return
        self.guard.waiting.pop(self, None)
        self.guard.lingering[self] = None
        self.transport.write(response)
        self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._linger_timer = None
        self.guard.release(self)
        self.transport.close()

    def _await_request(self) -> None:
        self._stop_timer()
        self.guard.waiting[self] = None
        self._header_timer = self.loop.call_later(self.guard.header_timeout, self._header_timeout)

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.guard.timed_out += 1
            self.drop(_RESPONSE_408)


class Listener:
    """Accepts on ``sock`` for :class:`GuardedH11` connections (see the module's docstring); quacks like
    the ``asyncio.Server`` uvicorn keeps (``close``, ``wait_closed``)."""

    def __init__(self, sock: socket.socket, factory: Callable[[], GuardedH11], guard: ConnectionGuard,
                 backlog: int = 2048) -> None:
        self.sock = sock
        self.factory = factory
        self.guard = guard
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.out_of_handles = 0  # times accepting paused
        self._warned = -WARN_EVERY
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)
        sock.listen(backlog)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                else:
                    log.warning("query API: accept failed: %s", exc)
                return
            conn.setblocking(False)
            if not self.guard.make_room():
                self.guard.refused += 1
                with contextlib.suppress(OSError):
                    conn.send(_RESPONSE_503)
                conn.close()
                continue
            self.guard.pending += 1
            task = self.loop.create_task(self._connect(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        proto = self.factory()
        try:
            await self.loop.connect_accepted_socket(lambda: proto, conn)
        except OSError as exc:  # the peer left meanwhile
            log.debug("query API: connection lost at once: %s", exc)
            conn.close()
        finally:
            if not proto.made:
                self.guard.pending -= 1

    def _pause(self, exc: OSError) -> None:
        """Out of file handles: stop accepting for ``ACCEPT_PAUSE`` (one warning a minute at most)."""
        self.out_of_handles += 1
        self.loop.remove_reader(self.sock.fileno())
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("query API: no file handle for a new connection (%s, %d API connections open); accepting "
                        "pauses for %.0f s at a time, the handles left are the chain's and the VMMs'",
                        exc.strerror or exc, self.guard.open, ACCEPT_PAUSE)
        self._resume = self.loop.call_later(ACCEPT_PAUSE, self._restart)

    def _restart(self) -> None:
        self._resume = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class _Server(uvicorn.Server):
    """uvicorn's server with :class:`Listener` in place of ``loop.create_server``."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit or not sockets:
            raise MicrovmBlueprintError("query API could not start")
        config = self.config
        loop = asyncio.get_running_loop()

        def make() -> GuardedH11:
            return GuardedH11(config, self.server_state, self.lifespan.state, self.guard, _loop=loop)

        self.servers = [Listener(sock, make, self.guard, config.backlog) for sock in sockets]  # type: ignore[misc]
        self.started = True


class QueryServer:
    """Serves :class:`QueryApp`; sets ``ready`` once listening; stops when cancelled."""

    name = "query-api"

    def __init__(self, app: QueryApp, host: str = "127.0.0.1", port: int = 3000, *, max_connections: int = 256,
                 header_timeout: float = 10.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.bound_port: int | None = None
        self._server: uvicorn.Server | None = None  # while serving (tests look at its connections)
        self.guard: ConnectionGuard | None = None  # while serving

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.bound_port or self.port}"

    async def run(self, ready: asyncio.Event) -> None:
        try:
            # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto says
            # TCP, and without it each response (headers, then body) waited out the client's delayed
            # ACK: 44 ms a request instead of 0.4 ms
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            raise MicrovmBlueprintError(f"query API cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.bound_port = sock.getsockname()[1]
        nofile = raise_file_limit()
        cap = connection_cap(self.max_connections, nofile)
        if cap < self.max_connections:
            log.warning("query API: at most %d connections (not %d): the open-file limit is %d, half of which is kept "
                        "for the chain connection and the VMMs", cap, self.max_connections, nofile)
        self.guard = guard = ConnectionGuard(cap, self.header_timeout)
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2, http="h11"
        )
        server = self._server = _Server(config, guard)
        # Signals belong to the entry point (it turns them into a graceful runner stop);
        # uvicorn would otherwise replace the process's SIGINT/SIGTERM handlers while serving.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        deadline = asyncio.get_running_loop().time() + 15
        try:
            while not server.started:
                if asyncio.get_running_loop().time() > deadline:
                    raise MicrovmBlueprintError("query API did not start within 15 s")
                if task.done():
                    await task
                    raise MicrovmBlueprintError("query API stopped before it started")
                await asyncio.sleep(0.01)
            log.info("query API listening on %s", self.url)
            ready.set()
            # shield: cancelling this service must not cancel uvicorn mid-step; it is told to
            # exit below and then awaited, so its sockets and connections close properly.
            await asyncio.shield(task)
        finally:
            log.info("query API stopping")
            if self.app.events is not None:  # open waits answer 503 and event streams end, at once
                self.app.events.close()
            server.should_exit = True
            try:
                await _stopped(task, STOP_TIMEOUT)
            finally:
                sock.close()


async def _stopped(task: asyncio.Task[None], timeout: float) -> None:
    """Wait for uvicorn's ``task`` to end (cancelled after ``timeout``), even if this wait is cancelled
    meanwhile: the cleanup is shielded, and a cancellation that came during it is raised once it is done.
    An error of uvicorn's own is logged, not raised over whatever is already on its way out."""
    stopping = asyncio.ensure_future(asyncio.wait_for(task, timeout))
    cancelled: asyncio.CancelledError | None = None
    while not stopping.done():
        try:
            await asyncio.wait([stopping])  # a cancelled asyncio.wait leaves `stopping` running
        except asyncio.CancelledError as exc:
            cancelled = exc
    if not stopping.cancelled() and (error := stopping.exception()) is not None:
        log.warning("query API did not stop cleanly: %r", error)
    if cancelled is not None:
        raise cancelled
