#!/usr/bin/env python3
"""A stand-in for the Firecracker binary: serves the API on a Unix socket, checked against the spec.

No Firecracker binary can run on these machines, so the driver is tested against this program. It
loads ``firecracker.yaml`` (swagger 2.0) at start — from ``--fake-spec``, else
``$MICROVM_SHARED_DIR/firecracker/firecracker.yaml``, else ``<repo>/../shared/firecracker/`` — and
answers as Firecracker does, with ``400 {"fault_message": ...}``, to:

* a path + method the spec does not have;
* a body that fails the operation's body schema (``$ref`` resolved; every object schema with
  properties is closed, ``additionalProperties: false``, as Firecracker's serde
  ``deny_unknown_fields`` is; required fields, types, enums, bounds enforced), a missing body where
  one is required, a body where the operation takes none, or malformed JSON;
* a request that breaks the state rules (DESIGN.md §4), taken from the spec's own summaries where it
  states them ("Pre-boot only." / "Post-boot only."):

  - configuration (machine-config, boot-source, drives, network-interfaces, ...) only before
    ``InstanceStart`` and never after a snapshot load;
  - ``InstanceStart`` once, and only with a boot source (machine-config has defaults);
  - ``PATCH /vm`` Paused/Resumed and ``PATCH /drives/{id}`` only after boot or load;
  - ``PUT /snapshot/create`` only while Paused;
  - ``PUT /snapshot/load`` only on a fresh process (nothing but logger/metrics before it); a load that
    fails after its body was accepted makes the process exit (status 1) right after answering. The
    load opens every disk the snapshot names, so a missing one fails it, as in Firecracker.

Every response body is validated against the operation's response schema too (a stand-in bug would
answer 500). ``GET /`` is ``InstanceInfo`` with state ``Not started`` / ``Running`` / ``Paused``.

The "guest" writes to stdout, Firecracker's serial console, only if its boot args name
``console=ttyS0``. What it writes depends on the root drive, as a real guest's output depends on
its init: a rootfs holding this project's init (the text ``echo MICROVM-READY``, as the ext4 image
``images.build_image`` makes does) prints a kernel banner and ``MICROVM-READY`` at
``InstanceStart``, then ``tick N`` every 0.2 s while running; any other rootfs (a stock
distribution image) prints what such a guest prints: a kernel transcript (none with ``quiet``) and
a getty login prompt, and nothing after. A snapshot records the configuration, the kind of guest and
the tick count (its memory file has ``mem_size_mib`` KiB: a scaled-down fake), so a restore carries
on counting.

Network interfaces are opened as Firecracker opens them: ``PUT /network-interfaces/{id}`` (and a
snapshot load, for each interface its saved state names) attaches to the TAP ``host_dev_name`` of the
network namespace the process runs in (``TUNSETIFF`` on ``/dev/net/tun``) and holds it; a TAP that
does not exist there, or that another process holds, is refused (a failed load exits). It never
creates a TAP: one missing in its namespace is an error, not something to make.

With ``--fake-journal FILE`` it records its drives: after every accepted ``PUT``/``PATCH /drives/{id}``,
``PUT /network-interfaces/{id}``, ``InstanceStart`` and snapshot load, one JSON line
``{"pid", "id", "event", "drives", "nets", "netns"}`` with every drive and network interface it then
has, the network namespace it runs in (``readlink /proc/self/ns/net``) and,
for each drive that is not the root, what a guest would find on it: the FAT volume label (read from the
boot sector, as this project's guest init does) and, on a ``cidata`` drive, its ``meta-data`` (read with
``mtype``). Tests read it after the process (and the VM's folder) is gone.

Started by the stand-in jailer (``firecracker_api.py jailer ...``), it gets ``--fake-chroot DIR --fake-uid N
--fake-gid N`` and behaves as a jailed Firecracker (:class:`Jail`): every path it is given over the API is
resolved inside that chroot (it does not chroot), and one that does not exist there, or that the uid could not
open (a folder on the way not searchable, the file not readable, a writable drive not writable), is refused.

    firecracker_api.py --api-sock PATH [--id ID] [--fake-spec YAML] [--fake-never-listen] [--fake-journal FILE]
                       [--fake-chroot DIR --fake-uid N --fake-gid N]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import errno
import fcntl
import json
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

VERSION = "1.12.1"
READY_LINE = "MICROVM-READY"
PROJECT_INIT = b"echo " + READY_LINE.encode()  # in the /sbin/init of this project's images
PROJECT, STOCK = "project", "stock"
STATE_FORMAT = "fake-firecracker-vmstate/1"
MEM_HEADER = b"fake-firecracker-memory\n"
NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
ID_RULE = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # Firecracker's instance id rule
MAC_RULE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000  # the flags Firecracker opens its TAPs with
CLONE_NEWNET = 0x40000000


def netns_id() -> str:
    """The network namespace this process runs in, as the kernel names it (``net:[<inode>]``)."""
    return os.readlink("/proc/self/ns/net")


def open_tap(name: str) -> int:
    """Attach to the existing TAP ``name`` of this process's namespace, as Firecracker does; returns the fd.
    Raises ``ValueError`` with Firecracker-like wording if there is none here or it cannot be had."""
    try:
        socket.if_nametoindex(name)  # in this namespace? (TUNSETIFF would create a missing one)
    except OSError:
        raise ValueError(f"Open tap device failed: no device {name} in network namespace {netns_id()}") from None
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        why = "it is in use by another process" if exc.errno == errno.EBUSY else os.strerror(exc.errno or 0)
        raise ValueError(f"Open tap device failed: {name}: {why}") from None
    return fd


def default_spec() -> Path:
    base = os.environ.get("MICROVM_SHARED_DIR") or str(Path(__file__).resolve().parents[3] / "shared")
    return Path(base) / "firecracker" / "firecracker.yaml"


def close_objects(schema: Any) -> Any:
    """Every object schema with properties refuses unknown fields (Firecracker's deny_unknown_fields)."""
    if isinstance(schema, dict):
        out = {k: close_objects(v) for k, v in schema.items()}
        if "properties" in out and isinstance(out["properties"], dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [close_objects(x) for x in schema]
    return schema


class Refused(Exception):
    """A request Firecracker would refuse: ``status`` + ``fault_message``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Operation:
    def __init__(self, template: str, method: str, op: dict[str, Any], definitions: dict[str, Any]) -> None:
        self.template = template
        self.method = method
        summary = str(op.get("summary", ""))
        self.pre_boot = "Pre-boot only" in summary
        self.post_boot = "Post-boot only" in summary
        self.body: dict[str, Any] | None = None
        self.body_required = False
        for param in op.get("parameters", []):
            if param.get("in") == "body":
                self.body = {**close_objects(copy.deepcopy(param["schema"])), "definitions": definitions}
                self.body_required = bool(param.get("required"))
        self.responses: dict[int, dict[str, Any]] = {}
        for code, response in (op.get("responses") or {}).items():
            if str(code).isdigit() and "schema" in response:
                self.responses[int(code)] = {**copy.deepcopy(response["schema"]), "definitions": definitions}


class Spec:
    """The routes of firecracker.yaml and their schemas."""

    def __init__(self, path: Path) -> None:
        import yaml  # imported late, so the start-up banner is printed as promptly as Firecracker's

        raw = yaml.safe_load(path.read_text())
        self.definitions = close_objects(raw["definitions"])
        self.routes: list[tuple[re.Pattern[str], Operation]] = []
        for template, ops in raw["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "([^/]+)", re.escape(template)) + "$")
            for method, op in ops.items():
                if method != "parameters":
                    self.routes.append((pattern, Operation(template, method.upper(), op, self.definitions)))

    def find(self, method: str, path: str) -> Operation | None:
        for pattern, op in self.routes:
            if op.method == method and pattern.match(path):
                return op
        return None

    @staticmethod
    def check_body(op: Operation, body: Any, present: bool) -> None:
        if op.body is None:
            if present:
                raise Refused(f"{op.method} {op.template} takes no body")
            return
        if not present:
            if op.body_required:
                raise Refused("The request body is missing.")
            return
        import jsonschema

        try:
            jsonschema.Draft4Validator(op.body).validate(body)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "body"
            raise Refused(f"An error occurred when deserializing the json body of a request: {where}: {exc.message}") from None

    @staticmethod
    def check_response(op: Operation, status: int, body: Any) -> None:
        import jsonschema

        schema = op.responses.get(status)
        if schema is None:
            return
        try:
            jsonschema.Draft4Validator(schema).validate(body)
        except jsonschema.ValidationError as exc:  # the stand-in's own answer broke the spec
            raise Refused(f"stand-in bug: response breaks the spec: {exc.message}", 500) from None


class Jail:
    """Firecracker as the jailer leaves it (``--fake-chroot``, ``--fake-uid``, ``--fake-gid``, passed by the
    stand-in jailer): chrooted into ``root`` as ``uid``/``gid``. It is not chrooted and may run as root, so
    every path it is given is resolved inside ``root`` (an absolute host path names nothing there) and
    refused unless ``uid``/``gid`` could open it: each folder on the way searchable, the file readable
    (and writable for a writable drive), or, for a file it creates, its folder writable."""

    def __init__(self, root: Path, uid: int, gid: int) -> None:
        self.root, self.uid, self.gid = root, uid, gid

    def _may(self, path: Path, want: int) -> bool:
        if self.uid == 0:
            return True
        st = path.stat()
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid == self.gid else 0
        return (st.st_mode >> shift) & want == want

    def resolve(self, path: str, *, write: bool = False, create: bool = False) -> str:
        inside = os.path.normpath("/" + path)  # relative paths start at the chroot's root; ".." stops there
        target = self.root / inside.lstrip("/")
        folders = [self.root, *[self.root / Path(*Path(inside).parts[1:i]) for i in range(2, len(Path(inside).parts))]]
        for folder in folders:
            if not folder.is_dir():
                raise OSError(f"No such file or directory (os error 2): {path} in the jail")
            if not self._may(folder, 0o1):
                raise OSError(f"Permission denied (os error 13): {path}: folder {folder} is not searchable by uid {self.uid}")
        if create:
            if not self._may(folders[-1], 0o3):
                raise OSError(f"Permission denied (os error 13): cannot create {path}: its folder is not writable by uid {self.uid}")
            return str(target)
        if not target.exists() or target.is_symlink():
            raise OSError(f"No such file or directory (os error 2): {path} in the jail")
        if not self._may(target, 0o6 if write else 0o4):
            raise OSError(f"Permission denied (os error 13): {path} is not {'writable' if write else 'readable'} by uid {self.uid}")
        return str(target)

    def made(self, path: str) -> None:
        """A file Firecracker created belongs to the user it runs as."""
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


class Vmm:
    """The microVM's state machine (one per process, like Firecracker)."""

    def __init__(self, instance_id: str, journal: Path | None = None, jail: Jail | None = None) -> None:
        self.id = instance_id
        self.journal = journal
        self.jail = jail
        self.state = NOT_STARTED
        self.machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False}
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.nets: dict[str, dict[str, Any]] = {}
        self.taps: dict[str, int] = {}  # iface_id -> the TAP fd held (as Firecracker holds it)
        self.other: dict[str, Any] = {}
        self.metrics_set = False
        self.configured = False  # a configuration call other than logger/metrics was made
        self.loaded = False
        self.exit_after_reply: int | None = None
        self.ticks = 0
        self.guest = ""  # PROJECT or STOCK, from the root drive at InstanceStart
        self.lock = threading.Lock()
        threading.Thread(target=self._clock, daemon=True).start()

    # ---- the fake guest -------------------------------------------------------------------------

    def _console(self) -> bool:
        return "console=ttyS0" in str((self.boot_source or {}).get("boot_args", ""))

    def _clock(self) -> None:
        while True:
            time.sleep(0.2)
            with self.lock:
                if self.state == RUNNING and self._console() and self.guest == PROJECT:
                    self.ticks += 1
                    print(f"tick {self.ticks}", flush=True)

    def _root_guest(self) -> str:
        """PROJECT if the root drive holds this project's init, else STOCK (read in chunks, bounded)."""
        root = next((d for d in self.drives.values() if d.get("is_root_device")), None)
        if root is None:
            return STOCK
        keep = len(PROJECT_INIT) - 1
        tail = b""
        try:
            with open(self.host(root["path_on_host"]), "rb") as fh:
                for _ in range(256):  # at most 256 MiB
                    chunk = fh.read(1 << 20)
                    if not chunk:
                        break
                    if PROJECT_INIT in tail + chunk:
                        return PROJECT
                    tail = (tail + chunk)[-keep:]
        except OSError:
            pass
        return STOCK

    def _boot_transcript(self) -> None:
        """What the guest prints on ttyS0 at boot."""
        if self.guest == PROJECT:
            print("[    0.000000] Linux version 6.1.0-fake (stand-in guest)", flush=True)
            print(READY_LINE, flush=True)
            return
        args = str((self.boot_source or {}).get("boot_args", ""))
        if "quiet" not in args.split():
            for line in (
                "[    0.000000] Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org) "
                "(x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1",
                f"[    0.000000] Command line: {args}",
                "[    0.000000] BIOS-provided physical RAM map:",
                f"[    0.004120] Memory: {self.machine['mem_size_mib'] * 1024}K available",
                "[    0.183334] virtio_blk virtio0: [vda] 2097152 512-byte logical blocks (1.07 GB/1.00 GiB)",
                "[    0.221079] EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.",
                "[    0.224810] Run /sbin/init as init process",
                "[    0.498553] systemd[1]: Detected virtualization kvm.",
                "[  OK  ] Reached target multi-user.target - Multi-User System.",
            ):
                print(line, flush=True)
        print("", flush=True)
        print("Debian GNU/Linux 12 localhost ttyS0", flush=True)
        print("", flush=True)
        print("localhost login: ", end="", flush=True)

    def _record(self, event: str) -> None:
        """One line of the drive journal (``--fake-journal``): the drives as they are now."""
        if self.journal is None:
            return
        drives = [{**d, **({} if d.get("is_root_device") else {"found": drive_contents(self.host(d["path_on_host"]))})}
                  for d in self.drives.values()]
        line = json.dumps({"pid": os.getpid(), "id": self.id, "event": event, "drives": drives,
                           "nets": list(self.nets.values()), "netns": netns_id()}) + "\n"
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def host(self, path: str, *, write: bool = False, create: bool = False) -> str:
        """Where the file an API path names is on the host: the path itself, or, under the jailer, that
        path inside the chroot (see :class:`Jail`), refused as Firecracker would fail to open it."""
        return path if self.jail is None else self.jail.resolve(path, write=write, create=create)

    # ---- requests -------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.state != NOT_STARTED

    def handle(self, op: Operation, path: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            if op.pre_boot and op.template != "/snapshot/load" and (self.started or self.loaded):
                raise Refused("The requested operation is not supported after starting the microVM.")
            if op.post_boot and op.template != "/snapshot/create" and not (self.started or self.loaded):
                raise Refused("The requested operation is not supported before starting the microVM.")
            handler = getattr(self, "op_" + op.method.lower() + re.sub(r"\W+", "_", op.template).rstrip("_"), None)
            if handler is None:
                if op.pre_boot:  # other devices (vsock, balloon, entropy ...): recorded, not modelled
                    self.configured = True
                    self.other[path] = body
                    return 204, None
                raise Refused(f"{op.method} {op.template} is not modelled by the stand-in")
            result: tuple[int, Any] = handler(path, body)
            return result

    def op_get(self, path: str, body: Any) -> tuple[int, Any]:
        return 200, {"app_name": "Firecracker", "id": self.id, "state": self.state, "vmm_version": VERSION}

    def op_get_version(self, path: str, body: Any) -> tuple[int, Any]:
        return 200, {"firecracker_version": VERSION}

    def op_get_machine_config(self, path: str, body: Any) -> tuple[int, Any]:
        return 200, self.machine

    def op_get_vm_config(self, path: str, body: Any) -> tuple[int, Any]:
        out: dict[str, Any] = {"machine-config": self.machine, "drives": list(self.drives.values()),
                               "network-interfaces": list(self.nets.values())}
        if self.boot_source is not None and not self.loaded:
            out["boot-source"] = self.boot_source
        return 200, out

    def op_put_machine_config(self, path: str, body: Any) -> tuple[int, Any]:
        if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
            raise Refused("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
        self.configured = True
        self.machine = {"smt": False, "track_dirty_pages": False, **body}
        return 204, None

    def op_patch_machine_config(self, path: str, body: Any) -> tuple[int, Any]:
        self.configured = True
        self.machine = {**self.machine, **body}
        return 204, None

    def op_put_boot_source(self, path: str, body: Any) -> tuple[int, Any]:
        for key in ("kernel_image_path", "initrd_path"):
            try:
                if key in body and not Path(self.host(body[key])).is_file():
                    raise OSError("No such file or directory (os error 2)")
            except OSError as exc:
                raise Refused(f"The {key.split('_')[0]} file cannot be opened: {exc}") from None
        self.configured = True
        self.boot_source = body
        return 204, None

    def op_put_drives_drive_id(self, path: str, body: Any) -> tuple[int, Any]:
        drive_id = path.rsplit("/", 1)[1]
        if drive_id != body["drive_id"]:
            raise Refused("The id from the path does not match the id from the body!")
        if "socket" in body:
            raise Refused("vhost-user-block drives are not modelled by the stand-in")
        if "path_on_host" not in body or "is_read_only" not in body:
            raise Refused("path_on_host and is_read_only are required for a virtio-block drive")
        try:
            if not Path(self.host(body["path_on_host"], write=not body["is_read_only"])).is_file():
                raise OSError("No such file or directory (os error 2)")
        except OSError as exc:
            raise Refused(f"Unable to open drive file {body['path_on_host']}: {exc}") from None
        if body["is_root_device"] and any(d["is_root_device"] for k, d in self.drives.items() if k != drive_id):
            raise Refused("A root block device already exists!")
        self.configured = True
        self.drives[drive_id] = body
        self._record("put")
        return 204, None

    def op_patch_drives_drive_id(self, path: str, body: Any) -> tuple[int, Any]:
        drive_id = path.rsplit("/", 1)[1]
        if drive_id != body["drive_id"]:
            raise Refused("The id from the path does not match the id from the body!")
        drive = self.drives.get(drive_id)
        if drive is None:
            raise Refused(f"Invalid block device ID: {drive_id}")
        if "path_on_host" in body:
            try:
                if not Path(self.host(body["path_on_host"], write=not drive.get("is_read_only"))).is_file():
                    raise OSError("No such file or directory (os error 2)")
            except OSError as exc:
                raise Refused(f"Unable to patch the block device: cannot open {body['path_on_host']}: {exc}") from None
            drive["path_on_host"] = body["path_on_host"]
        self._record("patch")
        return 204, None

    def op_put_network_interfaces_iface_id(self, path: str, body: Any) -> tuple[int, Any]:
        iface = body["iface_id"]
        if path.rsplit("/", 1)[1] != iface:
            raise Refused("The id from the path does not match the id from the body!")
        if "guest_mac" in body and not MAC_RULE.match(body["guest_mac"]):
            raise Refused(f"Invalid MAC address: {body['guest_mac']}")
        if any(n["host_dev_name"] == body["host_dev_name"] for k, n in self.nets.items() if k != iface):
            raise Refused(f"The host device name {body['host_dev_name']} is already in use.")
        try:
            fd = open_tap(body["host_dev_name"])
        except ValueError as exc:
            raise Refused(f"Could not create the network device: {exc}") from exc
        if iface in self.taps:
            os.close(self.taps[iface])
        self.taps[iface] = fd
        self.configured = True
        self.nets[iface] = body
        self._record("net")
        return 204, None

    def op_put_logger(self, path: str, body: Any) -> tuple[int, Any]:
        if "log_path" in body and not Path(self.host(body["log_path"], write=True)).exists():
            raise Refused(f"Failed to open target file: {body['log_path']}")
        return 204, None

    def op_put_metrics(self, path: str, body: Any) -> tuple[int, Any]:
        if self.metrics_set:
            raise Refused("Reinitialization of metrics not allowed.")
        if not Path(self.host(body["metrics_path"], write=True)).exists():
            raise Refused(f"Failed to open target file: {body['metrics_path']}")
        self.metrics_set = True
        return 204, None

    def op_put_actions(self, path: str, body: Any) -> tuple[int, Any]:
        action = body["action_type"]
        if action == "InstanceStart":
            if self.started or self.loaded:
                raise Refused("The requested operation is not supported after starting the microVM.")
            if self.boot_source is None:
                raise Refused("Cannot start microvm without kernel configuration.")
            self.state = RUNNING
            self.guest = self._root_guest()
            self._record("start")
            if self._console():
                self._boot_transcript()
            return 204, None
        if action == "SendCtrlAltDel":
            if self.state != RUNNING:
                raise Refused("The requested operation is not supported before starting the microVM.")
            self.exit_after_reply = 0  # the guest reboots; with reboot=k Firecracker exits
            return 204, None
        if not self.metrics_set:  # FlushMetrics
            raise Refused("The metrics system is not initialized.")
        return 204, None

    def op_patch_vm(self, path: str, body: Any) -> tuple[int, Any]:
        if not (self.started or self.loaded):
            raise Refused("The requested operation is not supported before starting the microVM.")
        self.state = PAUSED if body["state"] == "Paused" else RUNNING
        return 204, None

    def op_put_snapshot_create(self, path: str, body: Any) -> tuple[int, Any]:
        if self.state != PAUSED:
            raise Refused("Cannot save the microVM state: the microVM is not paused.")
        if body.get("snapshot_type") == "Diff" and not self.machine.get("track_dirty_pages"):
            raise Refused("Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
        state = {
            "format": STATE_FORMAT, "id": self.id, "ticks": self.ticks, "guest": self.guest, "machine-config": self.machine,
            "boot-source": self.boot_source, "drives": self.drives, "network-interfaces": self.nets,
        }
        try:
            files = [(self.host(body["snapshot_path"], create=True), json.dumps(state).encode()),
                     (self.host(body["mem_file_path"], create=True), MEM_HEADER.ljust(self.machine["mem_size_mib"] * 1024, b"\0"))]
            for where, data in files:
                Path(where).write_bytes(data)
                if self.jail is not None:
                    self.jail.made(where)
        except OSError as exc:
            raise Refused(f"Cannot create snapshot file: {exc}") from exc
        return 204, None

    def op_put_snapshot_load(self, path: str, body: Any) -> tuple[int, Any]:
        if self.started or self.configured or self.loaded:
            raise Refused("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise Refused("Exactly one of mem_file_path or mem_backend must be given.")
        backend = body.get("mem_backend") or {"backend_type": "File", "backend_path": body["mem_file_path"]}
        try:
            if backend["backend_type"] != "File":
                raise ValueError("the stand-in only loads File memory backends")
            state = json.loads(Path(self.host(body["snapshot_path"])).read_text())
            if state.get("format") != STATE_FORMAT:
                raise ValueError("not a snapshot state file")
            mem = Path(self.host(backend["backend_path"])).read_bytes()
            if not mem.startswith(MEM_HEADER) or len(mem) != state["machine-config"]["mem_size_mib"] * 1024:
                raise ValueError("the memory file does not match the snapshot")
            for drive in state["drives"].values():  # restoring opens every block device it names
                try:
                    if not Path(self.host(drive["path_on_host"], write=not drive.get("is_read_only"))).is_file():
                        raise OSError("No such file or directory (os error 2)")
                except OSError as exc:
                    raise ValueError(f"Block device error: cannot open {drive['path_on_host']}: {exc}") from None
            taps = {}
            try:  # ... and every TAP (by name, in this process's namespace)
                for iface, nic in state.get("network-interfaces", {}).items():
                    taps[iface] = open_tap(nic["host_dev_name"])
            except ValueError as exc:
                for fd in taps.values():
                    os.close(fd)
                raise ValueError(f"Net device error: {exc}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.exit_after_reply = 1  # a failed load leaves Firecracker unusable: it exits
            raise Refused(f"Load snapshot error: Failed to restore from snapshot: {exc}") from exc
        self.machine, self.boot_source = state["machine-config"], state["boot-source"]
        self.drives, self.nets, self.ticks = state["drives"], state["network-interfaces"], state["ticks"]
        self.guest = state["guest"]
        self.taps = taps
        self.loaded = True
        self.state = RUNNING if body.get("resume_vm") else PAUSED
        self._record("load")
        return 204, None


def drive_contents(path: str) -> dict[str, Any]:
    """What a guest finds on a (non-root) drive: its FAT volume label, and a NoCloud drive's meta-data."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        return {"error": str(exc)}
    label = None
    if head[510:512] == b"\x55\xaa":  # FAT12/16 keep the label at 43, FAT32 at 71
        label = (head[71:82] if head[82:90].startswith(b"FAT32") else head[43:54]).decode("ascii", "replace").strip()
    found: dict[str, Any] = {"fat_label": label}
    if label is not None and label.lower() == "cidata":
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null",
               "HOME": "/nonexistent", "LC_ALL": "C"}
        try:
            proc = subprocess.run(["mtype", "-i", path, "::meta-data"], capture_output=True, timeout=10, env=env,
                                  check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            found["error"] = f"mtype: {exc}"
        else:
            found["meta-data"] = proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else None
            if proc.returncode != 0:
                found["error"] = proc.stderr.decode("utf-8", "replace")[-300:]
    return found


def serve(sock_path: str, spec: Spec, vmm: Vmm) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def address_string(self) -> str:
            return "api-sock"

        def log_message(self, fmt: str, *args: Any) -> None:
            print(f"[{vmm.id}:fc_api] " + fmt % args, file=sys.stderr, flush=True)

        def _reply(self, status: int, body: Any) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

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
                self._reply(400, {"fault_message": f"An error occurred when deserializing the json body of a request: {exc}"})
                return
            try:
                spec.check_body(op, body, bool(raw))
                status, out = vmm.handle(op, path, body)
                spec.check_response(op, status, out)
            except Refused as exc:
                self._reply(exc.status, {"fault_message": str(exc)})
            else:
                self._reply(status, out)
            if vmm.exit_after_reply is not None:
                print(f"[{vmm.id}:main] exiting (status {vmm.exit_after_reply})", file=sys.stderr, flush=True)
                os._exit(vmm.exit_after_reply)

        do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _any

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    with Server(sock_path, Handler) as server:
        server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="firecracker")
    parser.add_argument("--api-sock", required=True)
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--fake-spec", default=None, help="stand-in: the firecracker.yaml to check against")
    parser.add_argument("--fake-never-listen", action="store_true", help="stand-in: never create the socket")
    parser.add_argument("--fake-journal", default=None, help="stand-in: append the drives it has to this file")
    parser.add_argument("--fake-chroot", default=None, help="stand-in jailer: the chroot API paths are inside")
    parser.add_argument("--fake-uid", type=int, default=0, help="stand-in jailer: the uid it would run as")
    parser.add_argument("--fake-gid", type=int, default=0, help="stand-in jailer: the gid it would run as")
    args = parser.parse_args()
    if not ID_RULE.match(args.id):
        print(f"Invalid instance ID: {args.id}", file=sys.stderr, flush=True)
        return 1
    print(f"Running Firecracker v{VERSION} (stand-in, pid {os.getpid()})", flush=True)
    if args.fake_never_listen:
        print("stand-in: never listening on the API socket", flush=True)
        while True:
            signal.pause()
    spec = Spec(Path(args.fake_spec) if args.fake_spec else default_spec())
    if os.path.exists(args.api_sock):
        print(f"Failed to open the API socket: {args.api_sock} already exists", file=sys.stderr, flush=True)
        return 1
    jail = Jail(Path(args.fake_chroot), args.fake_uid, args.fake_gid) if args.fake_chroot else None
    serve(args.api_sock, spec, Vmm(args.id, Path(args.fake_journal) if args.fake_journal else None, jail))
    return 0


V1_CGROUP_FILES = ("memory.limit_in_bytes", "cpu.cfs_quota_us", "cpu.cfs_period_us", "pids.max")
V2_CGROUP_FILES = ("memory.max", "cpu.max", "pids.max")
JAILER_RECORD = "jailer.json"


def jailer_main(argv: list[str]) -> int:
    """A stand-in for Firecracker's ``jailer`` (docs/jailer.md): checks its argv as the jailer does, builds
    ``<chroot base>/<exec file name>/<id>/root``, records what it was asked (``jailer.json`` beside that
    root) and execs the exec file (the stand-in) with ``--id`` and the Firecracker arguments after ``--``,
    its ``--api-sock`` placed inside the chroot. It does not chroot, switch user or write cgroups: it
    checks that it was told to."""
    own, sep, fc_args = (argv[: argv.index("--")], "--", argv[argv.index("--") + 1:]) if "--" in argv else (argv, "", [])
    parser = argparse.ArgumentParser(prog="jailer")
    parser.add_argument("--id", required=True)
    parser.add_argument("--exec-file", required=True)
    parser.add_argument("--uid", required=True, type=int)
    parser.add_argument("--gid", required=True, type=int)
    parser.add_argument("--cgroup-version", type=int, choices=(1, 2), default=1)
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--parent-cgroup")
    parser.add_argument("--chroot-base-dir", default="/srv/jailer")
    parser.add_argument("--netns")
    parser.add_argument("--resource-limit", action="append", default=[])
    parser.add_argument("--daemonize", action="store_true")
    parser.add_argument("--new-pid-ns", action="store_true")
    args = parser.parse_args(own)

    def fail(msg: str) -> int:
        print(f"jailer: {msg}", file=sys.stderr, flush=True)
        return 1

    if not ID_RULE.match(args.id):
        return fail(f"invalid instance id {args.id!r}")
    exe = Path(args.exec_file)
    if not exe.is_absolute() or not exe.is_file() or not os.access(exe, os.X_OK):
        return fail(f"exec file {exe} is not an absolute path to an executable")
    if "firecracker" not in exe.name:
        return fail("exec file name must contain 'firecracker'")
    if args.uid < 0 or args.gid < 0:
        return fail("uid and gid must be non-negative")
    allowed = V2_CGROUP_FILES if args.cgroup_version == 2 else V1_CGROUP_FILES
    for c in args.cgroup:
        name, eq, value = c.partition("=")
        if not eq or name not in allowed or not value:
            return fail(f"--cgroup {c!r} is not a cgroup v{args.cgroup_version} file=value")
    netns = ""
    if args.netns:  # the jailer joins it (setns) before it execs Firecracker
        if not Path(args.netns).exists():
            return fail(f"network namespace {args.netns} does not exist")
        try:
            fd = os.open(args.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return fail(f"cannot open network namespace {args.netns}: {exc}")
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            return fail(f"cannot join network namespace {args.netns}: {os.strerror(ctypes.get_errno())}")
        os.close(fd)
        netns = netns_id()
    if not sep:
        return fail("no '--' before the firecracker arguments")
    base = Path(args.chroot_base_dir)
    if not base.is_absolute():
        return fail("--chroot-base-dir must be absolute")
    chroot = base / exe.name / args.id / "root"
    fc = list(fc_args)
    if "--api-sock" not in fc or fc.index("--api-sock") + 1 >= len(fc):
        return fail("firecracker arguments lack --api-sock")
    if "--id" in fc:
        return fail("--id is the jailer's to pass to firecracker")
    i = fc.index("--api-sock") + 1
    if not fc[i].startswith("/"):
        return fail("--api-sock must be a path inside the chroot")
    fc[i] = str(chroot / fc[i].lstrip("/"))
    chroot.mkdir(parents=True, exist_ok=True)  # nothing is done if it exists (the doc)
    if os.geteuid() == 0:
        os.chown(chroot, args.uid, args.gid)  # as the jailer does, so Firecracker can make its socket there
    Path(fc[i]).parent.mkdir(parents=True, exist_ok=True)
    (chroot.parent / JAILER_RECORD).write_text(json.dumps({"argv": argv, "uid": args.uid, "gid": args.gid,
                                                            "cgroup_version": args.cgroup_version,
                                                            "cgroups": args.cgroup, "netns": netns}))
    jailed = ["--fake-chroot", str(chroot), "--fake-uid", str(args.uid), "--fake-gid", str(args.gid)]
    os.chdir(chroot)  # the real jailer chroots and changes to "/": seen from outside, its cwd is the chroot
    os.execv(str(exe), [str(exe), *jailed, "--id", args.id, *fc])
    return 1  # pragma: no cover - execv does not return


if __name__ == "__main__":
    if sys.argv[1:2] == ["jailer"]:
        sys.exit(jailer_main(sys.argv[2:]))
    sys.exit(main())
