"""The query API as a background service: uvicorn on a loopback port by default."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from ..errors import MicrovmBlueprintError
from .query import QueryApp

log = logging.getLogger(__name__)

#: how long uvicorn may take to stop (its own graceful shutdown gives requests 2 s) before it is cancelled
STOP_TIMEOUT = 5.0


class QueryServer:
    """Serves :class:`QueryApp`; sets ``ready`` once listening; stops when cancelled."""

    name = "query-api"

    def __init__(self, app: QueryApp, host: str = "127.0.0.1", port: int = 3000) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.bound_port: int | None = None
        self._server: uvicorn.Server | None = None  # while serving (tests look at its connections)

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
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        server = self._server = uvicorn.Server(config)
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
