#!/usr/bin/env python3
"""A stand-in for the Firecracker binary: serves the API on a Unix socket, checked against the spec.

No Firecracker binary can run on these machines, so the driver is tested against this program. It
loads ``firecracker.yaml`` (swagger 2.0) at start and refuses, as Firecracker does, with 400 and a
``{"fault_message": ...}`` body: unknown paths or methods, bodies that fail the operation's schema
(unknown fields included: every object is treated as ``additionalProperties: false``), and requests
that break the state rules of DESIGN.md §4:

* machine-config, boot-source, drives, network-interfaces only before InstanceStart;
* InstanceStart once, with a boot source;
* PATCH /vm Paused|Resumed only after boot; PUT /snapshot/create only while Paused;
* PUT /snapshot/load only on a fresh process (logger/metrics excepted); a failed load exits the process;
* PATCH /drives/{id} only after boot or load.

The "guest" prints the ready line and a tick counter to stdout (the serial console) while running;
snapshots record the configuration and the tick count, so a restore carries on counting.

    firecracker_api.py --api-sock PATH [--id ID] [--spec firecracker.yaml]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jsonschema
import yaml

READY_LINE = "MICROVM-READY"
PRE_BOOT = ("/machine-config", "/boot-source", "/drives/", "/network-interfaces/")


def default_spec() -> Path:
    base = Path(os.environ.get("MICROVM_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
    return base / "firecracker" / "firecracker.yaml"


def close_objects(schema: Any) -> Any:
    """Every object schema with properties refuses unknown fields (Firecracker's serde deny_unknown_fields)."""
    if isinstance(schema, dict):
        out = {k: close_objects(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [close_objects(x) for x in schema]
    return schema


class Spec:
    def __init__(self, path: Path) -> None:
        raw = yaml.safe_load(path.read_text())
        self.definitions = close_objects(raw["definitions"])
        self.routes: list[tuple[re.Pattern[str], str, dict[str, Any]]] = []
        for template, ops in raw["paths"].items():
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
            for method, op in ops.items():
                if method != "parameters":
                    self.routes.append((pattern, method.upper(), op))

    def find(self, method: str, path: str) -> dict[str, Any] | None:
        for pattern, m, op in self.routes:
            if m == method and pattern.match(path):
                return op
        return None

    def validate(self, op: dict[str, Any], body: Any) -> None:
        for param in op.get("parameters", []):
            if param.get("in") != "body":
                continue
            schema = {**copy.deepcopy(param["schema"]), "definitions": self.definitions}
            jsonschema.Draft4Validator(schema).validate(body)
            return
        if body not in (None, {}):
            raise jsonschema.ValidationError("this operation takes no body")


class Refused(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Vmm:
    def __init__(self, instance_id: str) -> None:
        self.id = instance_id
        self.state = "Not started"
        self.config: dict[str, Any] = {"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}, "drives": {}}
        self.configured = False  # any pre-boot configuration call made
        self.loaded = False
        self.ticks = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._clock, daemon=True).start()

    def _clock(self) -> None:
        while True:
            time.sleep(0.2)
            with self.lock:
                if self.state == "Running":
                    self.ticks += 1
                    print(f"tick {self.ticks}", flush=True)

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            return self._handle(method, path, body)

    def _handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        started = self.state != "Not started"
        if method == "GET" and path == "/":
            return 200, {"app_name": "Firecracker", "id": self.id, "state": self.state, "vmm_version": "1.12.1"}
        if method == "GET" and path == "/machine-config":
            return 200, self.config["machine-config"]
        if method == "GET" and path == "/vm/config":
            return 200, self.config
        if method == "PUT" and path.startswith(PRE_BOOT):
            if started or self.loaded:
                raise Refused("The requested operation is not supported after starting the microVM.")
            self.configured = True
            if path == "/boot-source":
                if not Path(body["kernel_image_path"]).is_file():
                    raise Refused(f"Cannot open kernel image: {body['kernel_image_path']}")
                self.config["boot-source"] = body
            elif path == "/machine-config":
                self.config["machine-config"] = body
            elif path.startswith("/drives/"):
                if path.rsplit("/", 1)[1] != body["drive_id"]:
                    raise Refused("The id from the path does not match the id from the body!")
                if not Path(body.get("path_on_host", "")).is_file():
                    raise Refused(f"Unable to open drive: {body.get('path_on_host')}")
                self.config["drives"][body["drive_id"]] = body
            return 204, None
        if method == "PUT" and path in ("/logger", "/metrics"):
            return 204, None
        if method == "PUT" and path == "/actions":
            action = body["action_type"]
            if action == "InstanceStart":
                if started or self.loaded:
                    raise Refused("The requested operation is not supported after starting the microVM.")
                if "boot-source" not in self.config:
                    raise Refused("Cannot start microvm without kernel configuration.")
                self.state = "Running"
                print(READY_LINE, flush=True)
                return 204, None
            if action == "SendCtrlAltDel":
                if self.state != "Running":
                    raise Refused("The microVM is not running.")
                return 204, None
            return 204, None
        if method == "PATCH" and path == "/vm":
            if not started:
                raise Refused("The requested operation is not supported before starting the microVM.")
            self.state = "Paused" if body["state"] == "Paused" else "Running"
            return 204, None
        if method == "PATCH" and path.startswith("/drives/"):
            if not started:
                raise Refused("The requested operation is not supported before starting the microVM.")
            drive = self.config["drives"].get(body["drive_id"])
            if drive is None:
                raise Refused(f"Invalid block device ID: {body['drive_id']}")
            if "path_on_host" in body:
                if not Path(body["path_on_host"]).is_file():
                    raise Refused(f"Unable to open drive: {body['path_on_host']}")
                drive["path_on_host"] = body["path_on_host"]
            return 204, None
        if method == "PUT" and path == "/snapshot/create":
            if self.state != "Paused":
                raise Refused("Cannot save snapshot: the microVM is not paused.")
            state = {"config": self.config, "ticks": self.ticks}
            Path(body["snapshot_path"]).write_text(json.dumps(state))
            Path(body["mem_file_path"]).write_bytes(b"\0" * (self.config["machine-config"]["mem_size_mib"] * 1024))
            return 204, None
        if method == "PUT" and path == "/snapshot/load":
            if started or self.configured or self.loaded:
                raise Refused("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
            mem = body.get("mem_file_path") or (body.get("mem_backend") or {}).get("backend_path")
            try:
                state = json.loads(Path(body["snapshot_path"]).read_text())
                if not mem or not Path(mem).is_file():
                    raise OSError(f"memory file {mem} missing")
            except (OSError, ValueError) as exc:
                _die_after(f"Load snapshot error: {exc}")
                raise Refused(f"Load snapshot error: {exc}") from exc
            self.config = state["config"]
            self.ticks = state["ticks"]
            self.loaded = True
            self.state = "Running" if body.get("resume_vm") else "Paused"
            return 204, None
        if method == "GET":
            return 200, {}
        return 204, None


def _die_after(message: str) -> None:
    """A failed snapshot load leaves Firecracker unusable: it exits right after answering."""
    def later() -> None:
        time.sleep(0.2)
        print(message, file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=later, daemon=True).start()


def serve(sock_path: str, spec: Spec, vmm: Vmm) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def address_string(self) -> str:
            return "uds"

        def log_message(self, fmt: str, *args: Any) -> None:
            print("api: " + fmt % args, file=sys.stderr, flush=True)

        def _reply(self, status: int, body: Any) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            op = spec.find(self.command, path)
            if op is None:
                self._reply(400, {"fault_message": f"Invalid request method and/or path: {self.command} {path}."})
                return
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                self._reply(400, {"fault_message": f"An error occurred when deserializing the json body: {exc}"})
                return
            try:
                spec.validate(op, body)
                status, out = vmm.handle(self.command, path, body)
            except jsonschema.ValidationError as exc:
                self._reply(400, {"fault_message": f"invalid body: {exc.message}"})
                return
            except Refused as exc:
                self._reply(exc.status, {"fault_message": str(exc)})
                return
            self._reply(status, out)

        do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _any

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    if os.path.exists(sock_path):
        os.unlink(sock_path)
    with Server(sock_path, Handler) as server:
        server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-sock", required=True)
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--spec", default=None)
    parser.add_argument("--no-api", action="store_true")
    parser.add_argument("--never-listen", action="store_true", help="test hook: never create the socket")
    args = parser.parse_args()
    if args.never_listen:
        while True:
            time.sleep(1)
    spec = Spec(Path(args.spec) if args.spec else default_spec())
    serve(args.api_sock, spec, Vmm(args.id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
