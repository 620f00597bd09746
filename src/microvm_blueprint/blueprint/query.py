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
from collections.abc import AsyncIterator, Callable, Sequence
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


class QueryApp:
    """ASGI callable. ``vms`` answers VM questions; ``journal`` answers ``/jobs``; ``metrics`` (the
    Prometheus text, ``metrics.OperatorMetrics.render``) answers ``/metrics``."""

    def __init__(self, vms: VmQuery, journal: JobJournal | None, metrics: Callable[[], str] | None = None) -> None:
        self.vms = vms
        self.journal = journal
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
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
    "required": ["mode", "guest_ip", "ports"],
    "properties": {
        "mode": {"type": "string", "enum": ["none", "user", "bridge"], "description": "MICROVM_NETWORK"},
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
