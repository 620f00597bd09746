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
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import MicrovmBlueprintError
from ..runtime.errors import InvalidInput, SnapshotNotFound, VmNotFound
from ..runtime.model import VmView
from ..runtime.provider import VmQuery
from .journal import JobJournal

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
    """ASGI callable. ``vms`` answers VM questions; ``journal`` answers ``/jobs``."""

    def __init__(self, vms: VmQuery, journal: JobJournal | None) -> None:
        self.vms = vms
        self.journal = journal

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
            return await self._route(parts, query)
        except BadRequest as exc:
            return _error(400, str(exc))
        except InvalidInput as exc:
            return _error(400, str(exc))
        except (VmNotFound, SnapshotNotFound) as exc:
            return _error(404, str(exc))
        except MicrovmBlueprintError as exc:
            log.warning("query failed: %s", exc)
            return _error(500, str(exc))

    async def _route(self, parts: list[str], query: dict[str, list[str]]) -> Response:
        match parts:
            case ["health"]:
                return PlainTextResponse("ok")
            case ["openapi.json"]:
                return _json(OPENAPI)
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
            case ["vms", vm_id, "console"]:
                tail = _int_param(query, "tail", default=DEFAULT_TAIL, lo=0, hi=MAX_TAIL)
                return PlainTextResponse(await self.vms.console(vm_id, tail or 0))
            case ["jobs", call_id]:
                if not _DIGITS.fullmatch(call_id) or len(call_id) > 20 or int(call_id) >= 2**64:
                    raise BadRequest("call_id must be an unsigned 64-bit integer")
                entry = self.journal.get(int(call_id)) if self.journal is not None else None
                if entry is None:
                    return _error(404, f"job call {int(call_id)} not found")
                return _json(entry.to_json())
        return _error(404, "not found")

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


_ERR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_VM = {
    "type": "object",
    "required": ["vm_id", "status", "snapshots"],
    "properties": {
        "vm_id": {"type": "string"},
        "status": {"type": "string", "enum": ["created", "running", "stopped", "destroyed", "failed"]},
        "snapshots": {"type": "array", "items": {"type": "string"}},
        "spec": {"type": "object"},
        "created_at": {"type": "number"},
        "updated_at": {"type": "number"},
        "error": {"type": "string"},
        "history": {"type": "array", "items": {"type": "object"}},
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
                "parameters": [_p("vm_id"), _p("tail", "query", {"type": "integer", "minimum": 0, "maximum": MAX_TAIL})],
                "responses": {"200": _ok({"type": "string"}, "text/plain"), "400": _E400, "404": _E404},
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
