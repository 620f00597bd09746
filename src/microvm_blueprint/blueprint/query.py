"""The read-only query API (DESIGN.md §5), an ASGI app over a ``VmQuery`` and the job journal.

Holding only a ``VmQuery`` (never a ``VmProvider``), it cannot change a VM. Every method but GET
answers 405. Path segments are split on the *raw* path and then percent-decoded, so an id that
contains ``/`` (sent as ``%2F``) is still one segment and can never escape its route.

The app shares its event loop with the operator's jobs, so no request may hold that loop for long.
The one request that could, the full ``GET /vms`` (10,000 VMs: 1.7 MB, ~130 ms of reading and
encoding in one go), is streamed: ``LIST_CHUNK`` views at a time are read from the store, encoded and
sent as one chunk, and the loop runs everything else between chunks (a reader that does not keep up
holds only its own request). The body is still the one plain JSON array sorted by ``vm_id``, byte for
byte what it was. A list shorter than one chunk is sent whole, with a ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import MicrovmBlueprintError
from ..runtime.errors import InvalidInput, SnapshotNotFound, VmNotFound
from ..runtime.model import VmStatus, VmView
from ..runtime.provider import VmQuery
from ..runtime.store import Store
from .events import Closed, EventHub, Subscriber, TooBusy, Unavailable, sse_bytes
from .journal import JobEntry, JobJournal, JobStatus
from .tangle_sig import SCHEME, SignedReads, TooManySigned, Unauthorized

log = logging.getLogger(__name__)

MAX_PAGE = 1000
DEFAULT_TAIL = 16 * 1024
MAX_TAIL = 1024 * 1024
MAX_PATH = 4096
#: VMs read, encoded and sent as one chunk of a full ``GET /vms`` (0.3-0.7 ms of the event loop each)
LIST_CHUNK = 32
#: loop turns a streamed list waits between chunks (see ``_let_others_run``)
YIELD_TURNS = 3
_DIGITS = re.compile(r"[0-9]+")
#: the Prometheus text exposition format
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BadRequest(MicrovmBlueprintError):
    pass



def _json(data: Any, status: int = 200) -> Response:
    return JSONResponse(data, status_code=status)


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _encode(views: Sequence[VmView]) -> bytes:
    """``views`` as the JSON array ``JSONResponse`` renders (compact, UTF-8), without history."""
    return json.dumps(
        [v.to_json(with_history=False) for v in views], ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode()


async def _let_others_run() -> None:
    """Step aside for everything the loop has to do before the next chunk. One ``sleep(0)`` is one loop
    turn, and a request that arrived during a chunk needs two to run: one to be read (its task is
    created), one for the task's first step. After a single turn it would wait for the next chunk
    too; after three it is answered first. A turn with nothing else to do costs microseconds. Measured
    (bench/README.md, closed-loop prober): /health p50 beside a looping full list, 64-VM chunks: 2.5 ms
    with one turn, 1.0 with three; 32-VM chunks: 1.8 and 0.6 ms (idle: 0.3-0.5 ms)."""
    for _ in range(YIELD_TURNS):
        await asyncio.sleep(0)


def _int_param(query: dict[str, list[str]], name: str, *, default: int | None, lo: int, hi: int) -> int | None:
    values = query.get(name)
    if not values:
        return default
    raw = values[-1]
    if not _DIGITS.fullmatch(raw) or len(raw) > 9:
        raise BadRequest(f"{name} must be an integer between {lo} and {hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer between {lo} and {hi}")
    return value


async def _refuse_websocket(scope: Scope, send: Send) -> None:
    """This API is plain HTTP GET: a WebSocket upgrade is refused with 403 and a JSON error (before, the
    handshake went unanswered and the server said 500), or a policy-violation close where the server
    cannot send an HTTP response (uvicorn turns a close before accept into a 403 as well)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = b'{"error":"WebSocket is not served here: the query API answers plain HTTP GET"}'
        await send({"type": "websocket.http.response.start", "status": 403, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


class QueryApp:
    """ASGI callable. ``vms`` answers VM questions; ``journal`` answers ``/jobs``; ``metrics`` (the
    Prometheus text, ``metrics.OperatorMetrics.render``) answers ``/metrics``; ``events`` serves the waits
    and ``/events`` (by default a hub over ``vms.store`` when ``vms`` has a store). ``console`` says who may
    read ``/vms/{id}/console`` (by default: a request signed by the VM's owner, :mod:`.tangle_sig`)."""

    def __init__(self, vms: VmQuery, journal: JobJournal | None, *, metrics: Callable[[], str] | None = None,
                 events: EventHub | None = None, console: SignedReads | None = None) -> None:
        self.vms = vms
        self.journal = journal
        self.metrics = metrics
        self.console = console or SignedReads()
        store = getattr(vms, "store", None)
        if events is None and isinstance(store, Store):
            events = EventHub(store, journal)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await _refuse_websocket(scope, send)
            return
        if scope["type"] != "http":
            return
        response = await self._respond(scope)
        await response(scope, receive, send)

    async def _respond(self, scope: Scope) -> Response:
        if scope["method"] != "GET":
            return Response(
                json.dumps({"error": "method not allowed: the query API is read-only"}),
                status_code=405,
                media_type="application/json",
                headers={"Allow": "GET"},
            )
        raw = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw.split(b"?", 1)[0]
        if len(raw_path) > MAX_PATH:
            return _error(414, "path too long")
        try:
            parts = [unquote(p.decode("ascii"), errors="strict") for p in raw_path.split(b"/")[1:]]
        except (UnicodeDecodeError, UnicodeEncodeError):
            return _error(400, "path is not valid percent-encoded UTF-8")
        try:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"), errors="strict")
        except (UnicodeDecodeError, ValueError):
            return _error(400, "query string is not valid")
        try:
            if len(parts) == 3 and parts[0] == "vms" and parts[2] == "console":
                return await self._console(parts[1], query, scope, raw_path)
            return await self._route(parts, query)
        except Unauthorized as exc:
            return Response(json.dumps({"error": str(exc)}), status_code=401, media_type="application/json",
                            headers={"WWW-Authenticate": SCHEME})
        except TooManySigned as exc:
            return _error(503, str(exc))
        except BadRequest as exc:
            return _error(400, str(exc))
        except InvalidInput as exc:
            return _error(400, str(exc))
        except (VmNotFound, SnapshotNotFound) as exc:
            return _error(404, str(exc))
        except Unavailable as exc:
            return _error(503, str(exc))
        except MicrovmBlueprintError as exc:
            log.warning("query failed: %s", exc)
            return _error(500, str(exc))

    async def _route(self, parts: list[str], query: dict[str, list[str]]) -> Response:
        match parts:
            case ["health"]:
                return PlainTextResponse("ok")
            case ["openapi.json"]:
                return _json(OPENAPI)
            case ["metrics"] if self.metrics is not None:
                return Response(self.metrics(), media_type=METRICS_TYPE)
            case ["vms"] | ["vms", ""]:
                limit = _int_param(query, "limit", default=None, lo=1, hi=MAX_PAGE)
                after = query.get("after", [None])[-1]
                if limit is None:
                    return await self._list_all(after)
                views = await self.vms.list_vms(limit=limit, after=after)
                return Response(_encode(views), media_type="application/json")
            case ["vms", vm_id]:
                # the same bytes JSONResponse would render, kept with the (immutable) view
                return Response((await self.vms.get_vm(vm_id)).json_bytes, media_type="application/json")
            case ["vms", vm_id, "snapshots"]:
                return _json([s.snapshot_id for s in await self.vms.list_snapshots(vm_id)])
            case ["vms", vm_id, "snapshots", snapshot_id]:
                return _json((await self.vms.get_snapshot(vm_id, snapshot_id)).to_json())
            case ["jobs", call_id]:
                if not _DIGITS.fullmatch(call_id) or len(call_id) > 20 or int(call_id) >= 2**64:
                    raise BadRequest("call_id must be an unsigned 64-bit integer")
                entry = self.journal.get(int(call_id)) if self.journal is not None else None
                if entry is None:
                    return _error(404, f"job call {int(call_id)} not found")
                return _json(entry.to_json())
        return await self._route_live(parts, query)

    async def _console(self, vm_id: str, query: dict[str, list[str]], scope: Scope, raw_path: bytes) -> Response:
        """The console tail, for the VM's owner or the service owner only (DESIGN.md §9), or for anyone
        with ``MICROVM_PUBLIC_CONSOLE``. The signature covers the request target as sent."""
        tail = _int_param(query, "tail", default=DEFAULT_TAIL, lo=0, hi=MAX_TAIL)
        view = await self.vms.get_vm(vm_id)  # 400 / 404 first: GET /vms/{id} says as much to anyone
        auth = [v for k, v in scope.get("headers", []) if k == b"authorization"]
        if len(auth) > 1:
            raise Unauthorized("more than one Authorization header")
        target = raw_path.decode("latin-1")
        if qs := scope.get("query_string", b""):
            target += "?" + qs.decode("latin-1")
        self.console.check(auth[0].decode("latin-1") if auth else None, target, vm_id, view.owner, time.time())
        return PlainTextResponse(await self.vms.console(vm_id, tail or 0))

    # ---- live: waits, the event stream, the dashboard (issue #16) --------------------------------

    async def _route_live(self, parts: list[str], query: dict[str, list[str]]) -> Response:
        match parts:
            case [""]:
                return HTMLResponse(_dashboard(), headers=_PAGE_HEADERS)
            case ["vms", vm_id, "wait"]:
                return await self._wait_vm(vm_id, query)
            case ["jobs", call_id, "wait"]:
                return self._wait_job(_call_id(call_id), query)
            case ["events"]:
                hub = self._hub()
                only = query.get("vm_id", [None])[-1]
                last = _int_param(query, "last", default=None, lo=0, hi=MAX_BACKLOG_LAST)
                after = _int_param(query, "after", default=None, lo=0, hi=2**62)
                return _EventStream(hub, only, after, last)
        return _error(404, "not found")

    def _hub(self) -> EventHub:
        if self.events is None:
            raise Unavailable("waits and events need a store-backed provider")
        return self.events

    async def _wait_vm(self, vm_id: str, query: dict[str, list[str]]) -> Response:
        raw = query.get("status", [""])[-1]
        try:
            status = VmStatus(raw)
        except ValueError:
            raise BadRequest(f"status must be one of {', '.join(s.value for s in VmStatus)}") from None
        timeout = _int_param(query, "timeout", default=DEFAULT_WAIT, lo=1, hi=MAX_WAIT) or DEFAULT_WAIT
        view = await self.vms.get_vm(vm_id)  # 400 / 404 at once
        if view.status is status:
            return Response(view.json_bytes, media_type="application/json")
        hub = self._hub()

        async def wait() -> Response:
            deadline = time.monotonic() + timeout
            with hub.vm_waiter(vm_id) as changed:
                while True:
                    changed.clear()
                    view = await self.vms.get_vm(vm_id)
                    if view.status is status:
                        return Response(view.json_bytes, media_type="application/json")
                    if not await _woken(changed, deadline, hub):
                        return _error(408, f"vm '{vm_id}' is still {view.status.value}, not {status.value}, "
                                           f"after {timeout} s")

        return _Waiting(wait)

    def _wait_job(self, call_id: int, query: dict[str, list[str]]) -> Response:
        until = query.get("until", ["finished"])[-1]
        if until not in ("finished", "result"):
            raise BadRequest("until must be finished or result")
        timeout = _int_param(query, "timeout", default=DEFAULT_WAIT, lo=1, hi=MAX_WAIT) or DEFAULT_WAIT
        journal = self.journal
        if journal is None:
            return _error(404, f"job call {call_id} not found")
        entry = journal.get(call_id)
        if _settled(entry, until):
            return _json(entry.to_json())  # type: ignore[union-attr]
        hub = self._hub()

        async def wait() -> Response:
            deadline = time.monotonic() + timeout
            with hub.job_waiter(call_id) as changed:
                while True:
                    changed.clear()
                    entry = journal.get(call_id)
                    if entry is not None and _settled(entry, until):
                        return _json(entry.to_json())
                    if not await _woken(changed, deadline, hub):
                        state = entry.status.value if entry is not None else "not seen by the operator yet"
                        return _error(408, f"job call {call_id} is {state} after {timeout} s")

        return _Waiting(wait)

    async def _list_all(self, after: str | None) -> Response:
        """Every VM after ``after``: whole if it fits in one chunk, else streamed chunk by chunk. The
        first chunk is read before the answer starts, so a store that fails at once still gets a 500."""
        first = await self.vms.list_vms(limit=LIST_CHUNK, after=after)
        if len(first) < LIST_CHUNK:
            return Response(_encode(first), media_type="application/json")
        return StreamingResponse(self._chunks(first), media_type="application/json")

    async def _chunks(self, views: list[VmView]) -> AsyncIterator[bytes]:
        """The JSON array ``[v1,v2,...]`` in chunks of ``LIST_CHUNK`` views, each read when the one
        before it is sent. Not one snapshot of the store: each VM is listed once, in order, as it was
        when its chunk was read (as with ``?limit&after`` paging). A store error after the answer has
        started can no longer become a 500: it is logged and the connection is dropped, so the client
        sees a truncated body, never a short list that looks whole."""
        opening = b"["
        while views:
            yield opening + _encode(views)[1:-1]
            opening = b","
            await _let_others_run()
            try:
                views = await self.vms.list_vms(limit=LIST_CHUNK, after=views[-1].vm_id)
            except MicrovmBlueprintError as exc:
                log.warning("GET /vms failed after %s: %s", views[-1].vm_id, exc)
                raise
        yield b"]"


# ---- live endpoints: waits and the event stream (issue #16) ---------------------------------------

#: ``timeout`` of the waits, seconds: default and most
DEFAULT_WAIT = 60
MAX_WAIT = 300
#: ``/events?last=N``: at most this many past events first
MAX_BACKLOG_LAST = 1000
#: seconds between heartbeat comments on an idle ``/events`` stream (keeps proxies from closing it)
HEARTBEAT = 15.0
#: seconds a stream collects events after a wake-up before it sends them as one chunk: with 100
#: streams and 50 changes a second, each sends at most 1/BATCH_DELAY chunks a second, not 50
BATCH_DELAY = 0.05
#: seconds one chunk may take to be taken by the reader before the stream is dropped
SEND_TIMEOUT = 10.0
#: history rows read and sent as one chunk when a stream resumes
BACKLOG_CHUNK = 256
_PAGE_HEADERS = {
    # the page is self-contained: its own inline script and style, requests to this API only
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _dashboard() -> str:
    """The dashboard page (package data, read once)."""
    return resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")


def _call_id(text: str) -> int:
    if not _DIGITS.fullmatch(text) or len(text) > 20 or int(text) >= 2**64:
        raise BadRequest("call_id must be an unsigned 64-bit integer")
    return int(text)


def _settled(entry: JobEntry | None, until: str) -> bool:
    """``finished``: the job ran (done or failed). ``result``: failed, or done and its result is on-chain
    (``result_tx``) or will never be (dropped: ``error`` on a done call)."""
    if entry is None or entry.status is JobStatus.PENDING:
        return False
    if entry.status is JobStatus.FAILED or until == "finished":
        return True
    return entry.result_tx is not None or entry.error is not None


async def _woken(changed: asyncio.Event, deadline: float, hub: EventHub) -> bool:
    """Wait for ``changed`` until ``deadline`` (monotonic): False on timeout; :class:`Closed` when the
    hub closes meanwhile."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        try:
            async with asyncio.timeout(remaining):
                await changed.wait()
        except TimeoutError:
            pass
    if hub.closed:
        raise Closed("the query API is shutting down")
    return changed.is_set()


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone (the request of a GET has no body worth reading)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _failure(exc: MicrovmBlueprintError) -> Response:
    if isinstance(exc, BadRequest | InvalidInput):
        return _error(400, str(exc))
    if isinstance(exc, VmNotFound | SnapshotNotFound):
        return _error(404, str(exc))
    if isinstance(exc, Unavailable):
        return _error(503, str(exc))
    log.warning("query failed: %s", exc)
    return _error(500, str(exc))


class _Waiting(Response):
    """A response decided later: ``work()`` runs while the client is connected; if the client goes
    first, ``work`` is cancelled (its waiter is gone with it) and nothing is sent."""

    def __init__(self, work: Callable[[], Awaitable[Response]]) -> None:  # no super(): nothing to render
        self.work = work

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.ensure_future(self.work())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait([task])  # its `finally` (dropping the waiter) has run
        if task.cancelled():
            return  # the client went away: nobody to answer
        try:
            response = task.result()
        except MicrovmBlueprintError as exc:
            response = _failure(exc)
        await response(scope, receive, send)


class _EventStream(Response):
    """``GET /events``: Server-Sent Events, first the history after ``Last-Event-ID`` (or ``after``, or
    the ``last`` N events), then live until the client goes, the server stops or the reader falls too
    far behind (then a last comment says so and the stream ends: reconnect to resume)."""

    def __init__(self, hub: EventHub, vm_id: str | None, after: int | None, last: int | None) -> None:
        self.hub, self.vm_id, self.after, self.last = hub, vm_id, after, last

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        after = self.after
        for name, value in scope.get("headers", ()):
            if name == b"last-event-id":
                text = value.decode("latin-1").strip()
                if not _DIGITS.fullmatch(text) or len(text) > 18:
                    await _error(400, "Last-Event-ID must be an event id (a history seq)")(scope, receive, send)
                    return
                after = int(text)
        try:
            sub, upto = self.hub.subscribe(self.vm_id)
        except (TooBusy, Closed) as exc:
            await _error(503, str(exc))(scope, receive, send)
            return
        gone = asyncio.ensure_future(_disconnected(receive))
        gone.add_done_callback(lambda _: sub.end())
        try:
            await self._stream(sub, upto, after, send)
        except TimeoutError:
            log.info("event stream dropped: the reader took no data for %.0f s", SEND_TIMEOUT)
        finally:
            self.hub.unsubscribe(sub)
            gone.cancel()

    async def _stream(self, sub: Subscriber, upto: int, after: int | None, send: Send) -> None:
        async def put(data: bytes, more: bool = True) -> None:
            async with asyncio.timeout(SEND_TIMEOUT):
                await send({"type": "http.response.body", "body": data, "more_body": more})

        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),  # nginx: pass events on at once
            ],
        })
        await put(b"retry: 2000\n: connected\n\n")
        await self._backlog(sub, upto, after, put)
        while not (sub.closed or sub.dropped):
            if not sub.queue:
                try:
                    async with asyncio.timeout(HEARTBEAT):
                        await sub.wake.wait()
                except TimeoutError:
                    await put(b": heartbeat\n\n")
                    continue
                if sub.closed or sub.dropped:
                    break
                try:  # let a burst gather: one chunk, not one per event
                    async with asyncio.timeout(BATCH_DELAY):
                        await sub.stop.wait()
                except TimeoutError:
                    pass
            chunk = b"".join(sub.take())
            if chunk:
                await put(chunk)
        if sub.dropped:
            await put(b": dropped: this reader fell too far behind; reconnect with Last-Event-ID\n\n")
        if not sub.closed or self.hub.closed:
            await put(b"", more=False)

    async def _backlog(
        self, sub: Subscriber, upto: int, after: int | None, put: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """The history the live queue will not bring: (``after``, ``upto``], or the last ``last`` events."""
        store = self.hub.store
        if after is None and self.last:
            rows = store.events_after(0, limit=self.last, vm_id=self.vm_id, newest=True)
            rows = [r for r in rows if r.seq <= upto]
            if rows:
                await put(b"".join(sse_bytes(r) for r in rows))
            return
        while after is not None and after < upto and not (sub.closed or sub.dropped):
            rows = [r for r in store.events_after(after, limit=BACKLOG_CHUNK, vm_id=self.vm_id) if r.seq <= upto]
            if not rows:
                return
            await put(b"".join(sse_bytes(r) for r in rows))
            after = rows[-1].seq
            await _let_others_run()


_ERR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_SPEC = {
    "type": "object",
    "description": "What the VM was created with. `disk_mib`, `ssh_keys` and `ports` appear only when set (job 8).",
    "required": ["vcpus", "mem_mib", "image"],
    "properties": {
        "vcpus": {"type": "integer", "minimum": 1},
        "mem_mib": {"type": "integer", "minimum": 1},
        "image": {"type": "string"},
        "disk_mib": {"type": "integer", "minimum": 1, "description": "root disk size (absent: the image's size)"},
        "ssh_keys": {
            "type": "integer", "minimum": 1, "maximum": 16,
            "description": "how many SSH keys root has (counted; the keys themselves are not served)",
        },
        "ports": {"type": "array", "items": _PORT, "maxItems": 16, "description": "guest ports asked for, sorted"},
    },
}
_NETWORK = {
    "type": "object",
    "description": (
        "How the guest is wired (DESIGN.md §8). Each published guest port is reachable at `host:host_port` "
        "while the VM runs; the host ports are the VM's from create on, until it is destroyed "
        "(a destroyed VM lists none). A restored VM has host ports of its own."
    ),
    "required": ["mode", "guest_ip", "ports", "egress"],
    "properties": {
        "mode": {"type": "string", "enum": ["none", "user", "bridge"], "description": "MICROVM_NETWORK"},
        "egress": {
            "type": "string",
            "enum": ["allow", "deny"],
            "description": "MICROVM_EGRESS as it was when the VM was created or restored: the VM keeps it "
                           "for life, across operator restarts under another setting",
        },
        "guest_ip": {"type": "string", "nullable": True, "description": "the guest's address; null with mode none"},
        "ports": {
            "type": "array",
            "maxItems": 17,
            "description": "published guest ports (guest port 22 is added when SSH keys are given), by guest port",
            "items": {
                "type": "object",
                "required": ["guest_port", "host", "host_port"],
                "properties": {
                    "guest_port": _PORT,
                    "host": {"type": "string", "description": "MICROVM_PUBLISH_ADDR"},
                    "host_port": {**_PORT, "description": "taken from MICROVM_PORT_RANGE"},
                },
            },
        },
    },
}
_VM = {
    "type": "object",
    "required": ["vm_id", "status", "snapshots", "spec", "network", "created_at", "updated_at"],
    "properties": {
        "vm_id": {"type": "string"},
        "status": {"type": "string", "enum": ["created", "running", "stopped", "destroyed", "failed"]},
        "snapshots": {"type": "array", "items": {"type": "string"}},
        "spec": _SPEC,
        "network": _NETWORK,
        "created_at": {"type": "number"},
        "updated_at": {"type": "number"},
        "error": {"type": "string"},
        "owner": {"type": "string", "nullable": True,
                  "description": "the caller that created or restored the VM: only it (and the service owner) "
                                 "may change it; null when the service itself created it"},
        "history": {"type": "array", "items": {"type": "object"}, "description": "GET /vms/{vm_id} only"},
    },
}
_ID = {"type": "string", "minLength": 1, "maxLength": 256}


def _p(name: str, where: str = "path", schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema or _ID}


def _ok(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {"description": "OK", "content": {media: {"schema": schema}}}


_E404 = {"description": "not found", "content": {"application/json": {"schema": _ERR}}}
_E400 = {"description": "bad request", "content": {"application/json": {"schema": _ERR}}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "microvm-blueprint query API", "version": "1", "description": "Read-only; non-GET is 405."},
    "paths": {
        "/health": {"get": {"responses": {"200": _ok({"type": "string"}, "text/plain")}}},
        "/metrics": {
            "get": {
                "summary": "Operator metrics in the Prometheus text format (0.0.4)",
                "description": (
                    "blueprint-sdk's blueprint_job_executions, blueprint_job_execution_time, blueprint_job_errors, "
                    "blueprint_uptime, blueprint_last_heartbeat, and the host's microvm_* metrics (README, "
                    "Metrics). 404 when the server runs without metrics."
                ),
                "responses": {"200": _ok({"type": "string"}, "text/plain"), "404": _E404},
            }
        },
        "/vms": {
            "get": {
                "summary": "VMs sorted by vm_id, as one JSON array",
                "description": (
                    "Without `limit`: every VM (after `after`, if given). A list of fewer than "
                    f"{LIST_CHUNK} VMs is sent whole, with a Content-Length; a longer one is streamed "
                    f"(chunked transfer encoding), read from the store {LIST_CHUNK} VMs at a time so that "
                    "it never holds the server, with the same bytes. A streamed list is not one snapshot: "
                    "each VM is listed once, in order, as it was when its chunk was read. If the store "
                    "fails once the list has begun, the connection is dropped (the body is incomplete). "
                    f"With `limit` (at most {MAX_PAGE}): one page, the VMs after `after`."
                ),
                "parameters": [
                    {
                        **_p("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
                        "description": "page size; without it, every VM",
                    },
                    {**_p("after", "query", _ID), "description": "exclusive start: list the VMs whose id sorts after it"},
                ],
                "responses": {"200": _ok({"type": "array", "items": _VM}), "400": _E400},
            }
        },
        "/vms/{vm_id}": {
            "get": {"parameters": [_p("vm_id")], "responses": {"200": _ok(_VM), "400": _E400, "404": _E404}}
        },
        "/vms/{vm_id}/snapshots": {
            "get": {
                "parameters": [_p("vm_id")],
                "responses": {"200": _ok({"type": "array", "items": {"type": "string"}}), "400": _E400, "404": _E404},
            }
        },
        "/vms/{vm_id}/snapshots/{snapshot_id}": {
            "get": {
                "parameters": [_p("vm_id"), _p("snapshot_id")],
                "responses": {
                    "200": _ok(
                        {
                            "type": "object",
                            "required": ["snapshot_id", "created_at", "size_bytes", "vm_status"],
                            "properties": {
                                "snapshot_id": {"type": "string"},
                                "created_at": {"type": "number"},
                                "size_bytes": {"type": "integer"},
                                "vm_status": {"type": "string"},
                            },
                        }
                    ),
                    "400": _E400,
                    "404": _E404,
                },
            }
        },
        "/vms/{vm_id}/console": {
            "get": {
                "summary": "the tail of the VM's serial console: for its owner and the service owner only",
                "description": (
                    "Send `Authorization: Tangle-Sig <address>:<unix seconds>:<0x signature>`, an EIP-191 "
                    "personal_sign of `microvm-blueprint GET <path and query as sent> <unix seconds>` by the VM's "
                    "owner or the service owner, at most 300 s old and 60 s ahead; each signed request is "
                    "answered once (a replay is 401). Open to all when the operator runs with "
                    "MICROVM_PUBLIC_CONSOLE=true (dev)."
                ),
                "parameters": [_p("vm_id"), _p("tail", "query", {"type": "integer", "minimum": 0, "maximum": MAX_TAIL}),
                               _p("Authorization", "header", {"type": "string"})],
                "responses": {"200": _ok({"type": "string"}, "text/plain"), "400": _E400, "404": _E404,
                              "401": {"description": "unsigned, badly signed, stale, replayed, or not the owner's",
                                      "content": {"application/json": {"schema": _ERR}}},
                              "503": {"description": "too many signed reads at once",
                                      "content": {"application/json": {"schema": _ERR}}}},
            }
        },
        "/jobs/{call_id}": {
            "get": {
                "parameters": [_p("call_id", schema={"type": "integer", "minimum": 0, "maximum": 2**64 - 1})],
                "responses": {
                    "200": _ok(
                        {
                            "type": "object",
                            "required": ["call_id", "job", "status"],
                            "properties": {
                                "call_id": {"type": "integer"},
                                "job": {"type": "string"},
                                "status": {"type": "string", "enum": ["done", "failed", "pending"]},
                                "error": {"type": "string"},
                                "result_tx": {"type": "string"},
                            },
                        }
                    ),
                    "400": _E400,
                    "404": _E404,
                },
            }
        },
    },
}

# ---- live endpoints (issue #16) --------------------------------------------------------------------

_TIMEOUT = {
    **_p("timeout", "query", {"type": "integer", "minimum": 1, "maximum": MAX_WAIT, "default": DEFAULT_WAIT}),
    "description": "seconds to wait",
}
_E408 = {"description": "still not there when the timeout ran out", "content": {"application/json": {"schema": _ERR}}}
_E503 = {
    "description": "too many waiting requests or event streams, or the server is stopping",
    "content": {"application/json": {"schema": _ERR}},
}
_EVENT = {
    "type": "object",
    "required": ["seq", "vm_id", "status", "action", "call_id", "caller", "at"],
    "properties": {
        "seq": {"type": "integer", "description": "the event id (also the SSE `id:`): its place in the history"},
        "vm_id": {"type": "string"},
        "status": _VM["properties"]["status"],  # type: ignore[index]
        "action": {"type": "string", "description": "create, start, stop, snapshot, destroy, restore, "
                                                     "delete_snapshot, vmm_exit, ..."},
        "call_id": {"type": "integer", "nullable": True},
        "caller": {"type": "string", "nullable": True},
        "at": {"type": "number", "description": "Unix time"},
    },
}
OPENAPI["paths"].update({
    "/": {"get": {"summary": "the dashboard: a read-only HTML page, live through /events",
                  "responses": {"200": _ok({"type": "string"}, "text/html")}}},
    "/vms/{vm_id}/wait": {
        "get": {
            "summary": "the VM as soon as it is in `status`",
            "description": "Answers at once if the VM already is in that status, else when a change brings it "
                           "there (woken by the change, no polling), or 408 after `timeout` seconds.",
            "parameters": [
                _p("vm_id"),
                {**_p("status", "query", _VM["properties"]["status"]), "required": True},  # type: ignore[index]
                _TIMEOUT,
            ],
            "responses": {"200": _ok(_VM), "400": _E400, "404": _E404, "408": _E408, "503": _E503},
        }
    },
    "/jobs/{call_id}/wait": {
        "get": {
            "summary": "a job call's entry (as GET /jobs/{call_id}) once it has an outcome",
            "description": "`until=finished` (default): the job ran, done or failed. `until=result`: failed, or "
                           "done and its result is on-chain (`result_tx`) or will never be (an `error` on a "
                           "done call). A call the operator has not seen yet is waited for too (it may still be "
                           "on its way from the chain).",
            "parameters": [
                _p("call_id", schema={"type": "integer", "minimum": 0, "maximum": 2**64 - 1}),
                _p("until", "query", {"type": "string", "enum": ["finished", "result"], "default": "finished"}),
                _TIMEOUT,
            ],
            "responses": {"200": _ok({"type": "object"}), "400": _E400, "404": _E404, "408": _E408, "503": _E503},
        }
    },
    "/events": {
        "get": {
            "summary": "lifecycle events as Server-Sent Events",
            "description": "One event per change of a VM (`id:` = its history seq, `data:` = the JSON object). "
                           "Starts live; `Last-Event-ID` (or `after`) first sends the history after that id, "
                           "`last=N` the last N events. A comment every "
                           f"{HEARTBEAT:.0f} s keeps idle connections open. A reader that falls "
                           "too far behind is sent a `: dropped` comment and the stream ends (reconnect with "
                           "Last-Event-ID to resume).",
            "parameters": [
                {**_p("vm_id", "query"), "description": "only this VM's events"},
                {**_p("Last-Event-ID", "header", {"type": "integer", "minimum": 0})},
                {**_p("after", "query", {"type": "integer", "minimum": 0}), "description": "as Last-Event-ID"},
                {**_p("last", "query", {"type": "integer", "minimum": 0, "maximum": MAX_BACKLOG_LAST}),
                 "description": "first send the last N past events"},
            ],
            "responses": {"200": _ok(_EVENT, "text/event-stream"), "400": _E400, "503": _E503},
        }
    },
})
