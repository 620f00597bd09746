"""Firecracker driver: one ``firecracker --api-sock`` process per VM, REST over its Unix socket.

The original project's behaviour and settings (``MICROVM_FIRECRACKER_*``), with its bugs fixed.
Firecracker's rules are modelled (DESIGN.md §4): configuration only before ``InstanceStart``,
``InstanceStart`` once, ``PATCH /vm`` only after boot, ``PUT /snapshot/create`` only while paused,
``PUT /snapshot/load`` first on a fresh process. Only API 1.12 features are used (``mem_backend``,
not the deprecated ``mem_file_path``; no ``/serial``, no ``clock_realtime``).

Per VM (``vm.workdir``, handed over by the lifecycle core): ``firecracker.log`` (the process's
stdout + stderr: Firecracker's own log *and* the guest's serial console, since Firecracker wires the
guest's ttyS0 to its stdout), ``firecracker.pid``, ``vm.json`` (the configuration sent) and, unless
the root filesystem is read-only, ``rootfs.ext4`` (the VM's own copy). The API socket lives in
``socket_dir`` under a name derived from the VM's folder name (never the raw id), kept short
because Unix socket paths are limited to 107 bytes.

Lifecycle:

* create = spawn + ``PUT /machine-config``, ``/boot-source``, ``/drives/rootfs`` (+ ``/logger`` if a
  log level is set); not started.
* boot = ``InstanceStart``; ready when ``GET /`` says ``Running`` and the guest's ready line
  (``settings.ready_line``) shows on its serial console in ``firecracker.log`` — this needs
  ``console=ttyS0`` in the boot args (the default has it) and a guest that prints the line (the
  project's images do). With ``ready_line=""`` a cold boot is ready as soon as ``GET /`` says
  ``Running``. A boot that misses ``boot_timeout_ms`` is a :class:`VmmTimeout` with the console tail.
* stop / start = ``PATCH /vm`` ``Paused`` / ``Resumed`` (resume ready = ``GET /`` says ``Running``).
* snapshot of a running or stopped VM: pause if running, copy the disk into the snapshot folder
  (disks are not part of a Firecracker snapshot), point the drive at that copy
  (``PATCH /drives/rootfs``) so the saved device state names a file the snapshot owns,
  ``PUT /snapshot/create`` (Full), point the drive back, resume if it was running. Without the
  re-pointing, the saved state would name the source VM's disk, and ``PUT /snapshot/load`` (which
  opens the disks it names) would fail once the source VM is destroyed, although snapshots outlive
  their VM. A snapshot of a ``created`` VM is ``manifest.json`` (its configuration) + the disk copy.
* restore (§7): a fresh process, ``PUT /snapshot/load`` first (only the logger may come before it)
  with ``resume_vm: false``, ``PATCH /drives/rootfs`` to the new VM's own disk copy, then
  ``PATCH /vm Resumed`` if the snapshot was taken running (a stopped one stays paused). A
  ``created`` snapshot configures a fresh process from its manifest.
* destroy = SIGTERM, then SIGKILL, each with a deadline (``SendCtrlAltDel`` is x86-only and a
  guest may ignore it); always reaped; the socket and the folder are removed.

A watcher task per VM notices a VMM that exits unasked and calls the exit listener. Every failure
is a :class:`~microvm_blueprint.runtime.errors.VmError` (see :func:`map_api_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ...procs import Child, kill_pid, pid_alive, tail
from ..driver import ExitListener
from ..errors import ImageError, InvalidInput, VmError, VmmApiError, VmmError, VmmTimeout
from ..model import DEFAULT_IMAGE, SnapshotRecord, VmHandle, VmRecord, VmSpec, VmStatus

log = logging.getLogger(__name__)

ENV_PREFIX = "MICROVM_FIRECRACKER_"
READY_LINE = "MICROVM-READY"
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet"
DEFAULT_SOCKET_DIR = "/tmp/microvm-firecracker"
LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")  # the spec's Logger.level enum
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
SOCKET_NAME_LEN = 24  # hex characters of the VM folder name (96 bits)
MAX_VCPUS = 32  # MachineConfiguration.vcpu_count maximum in the spec

LOG = "firecracker.log"
PID = "firecracker.pid"
CONFIG = "vm.json"
DISK = "rootfs.ext4"
DRIVE_ID = "rootfs"
SNAP_MANIFEST = "manifest.json"
SNAP_STATE = "vmstate.bin"
SNAP_MEM = "memory.bin"
SNAP_DISK = "rootfs.ext4"
SNAP_FORMAT = "microvm-blueprint/firecracker-snapshot/1"

LOG_TAIL = 2000


# ---- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirecrackerSettings:
    """Everything the driver needs, injected (the driver never reads the environment).

    ``bin`` is a path or a name on ``PATH``; it is run as ``bin --api-sock SOCKET --id ID``.
    ``vcpu_count``/``mem_mib`` are the defaults of ``MICROVM_FIRECRACKER_VCPU_COUNT``/``_MEM_MIB``:
    a VM's :class:`VmSpec` overrides them (see :meth:`default_spec`). ``state_dir`` is parsed for
    compatibility with the original; VM folders themselves are handed over by the lifecycle core.
    """

    bin: str = "firecracker"
    kernel: str = ""
    rootfs: str = ""
    initrd: str = ""
    boot_args: str = DEFAULT_BOOT_ARGS
    socket_dir: str = DEFAULT_SOCKET_DIR
    state_dir: str = ""
    vcpu_count: int = 2
    mem_mib: int = 1024
    rootfs_ro: bool = True
    api_timeout_ms: int = 5000
    socket_ready_timeout_ms: int = 5000
    boot_timeout_ms: int = 60000
    ready_line: str = READY_LINE
    log_level: str = ""  # "" = Firecracker's default logger (to stdout, i.e. firecracker.log)
    stop_timeout_ms: int = 3000  # SIGTERM grace before SIGKILL

    def __post_init__(self) -> None:
        def at_least(name: str, value: int, lo: int, hi: int | None = None) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise InvalidInput(f"{ENV_PREFIX}{name.upper()}={value!r} must be an integer {bound}")

        at_least("vcpu_count", self.vcpu_count, 1, MAX_VCPUS)
        at_least("mem_mib", self.mem_mib, 128)
        at_least("api_timeout_ms", self.api_timeout_ms, 1)
        at_least("socket_ready_timeout_ms", self.socket_ready_timeout_ms, 1)
        at_least("boot_timeout_ms", self.boot_timeout_ms, 1)
        at_least("stop_timeout_ms", self.stop_timeout_ms, 0)
        if not self.bin:
            raise InvalidInput(f"{ENV_PREFIX}BIN must not be empty")
        if self.log_level and self.log_level not in LOG_LEVELS:
            raise InvalidInput(f"{ENV_PREFIX}LOG_LEVEL={self.log_level!r} must be one of: {', '.join(LOG_LEVELS)}")
        longest = len(os.fsencode(self.socket_dir)) + 1 + SOCKET_NAME_LEN + len(".sock")
        if longest > MAX_SOCKET_PATH:
            raise InvalidInput(
                f"{ENV_PREFIX}SOCKET_DIR={self.socket_dir!r} is too long: socket paths in it would be {longest} bytes, "
                f"over the {MAX_SOCKET_PATH}-byte limit of Unix sockets"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, image_dir: Path | None = None) -> FirecrackerSettings:
        """Parse ``MICROVM_FIRECRACKER_*``; errors (:class:`InvalidInput`) name the bad variable.

        Kernel, rootfs and initrd default to the built default image (in ``image_dir``, else the
        image cache) when one exists; a missing file is reported, naming its variable, by
        :meth:`check_host` when a VM is created."""
        p = ENV_PREFIX

        def text(name: str, default: str) -> str:
            return env.get(p + name, "").strip() or default

        def num(name: str, default: int, lo: int, hi: int | None = None) -> int:
            raw = env.get(p + name, "").strip()
            if not raw:
                return default
            ok = raw.isascii() and raw.isdigit() and int(raw) >= lo and (hi is None or int(raw) <= hi)
            if not ok:
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise InvalidInput(f"{p}{name}={raw!r} must be an integer {bound}")
            return int(raw)

        def flag(name: str, default: bool) -> bool:
            raw = env.get(p + name, "").strip().lower()
            if not raw:
                return default
            if raw in {"1", "true", "yes", "on"}:
                return True
            if raw in {"0", "false", "no", "off"}:
                return False
            raise InvalidInput(f"{p}{name}={raw!r} must be true or false")

        kernel, rootfs, initrd = text("KERNEL", ""), text("ROOTFS", ""), text("INITRD", "")
        if not (kernel and rootfs):
            from .. import images  # the default guest image, if one is built

            try:
                manifest = images.resolve_image(DEFAULT_IMAGE, image_dir)
            except ImageError:
                pass  # check_host names the unset variable when a VM is created
            else:
                if not kernel and not initrd:
                    initrd = manifest.initramfs  # the image's kernel needs its initramfs
                kernel = kernel or manifest.vmlinux
                rootfs = rootfs or manifest.rootfs
        level = text("LOG_LEVEL", "")
        matched = [lv for lv in LOG_LEVELS if lv.lower() == level.lower()]
        if level and not matched:
            raise InvalidInput(f"{p}LOG_LEVEL={level!r} must be one of: {', '.join(LOG_LEVELS)}")
        return cls(
            bin=text("BIN", "firecracker"),
            kernel=kernel,
            rootfs=rootfs,
            initrd=initrd,
            boot_args=text("BOOT_ARGS", DEFAULT_BOOT_ARGS),
            socket_dir=text("SOCKET_DIR", DEFAULT_SOCKET_DIR),
            state_dir=text("STATE_DIR", ""),
            vcpu_count=num("VCPU_COUNT", 2, 1, MAX_VCPUS),
            mem_mib=num("MEM_MIB", 1024, 128),
            rootfs_ro=flag("ROOTFS_RO", True),
            api_timeout_ms=num("API_TIMEOUT_MS", 5000, 1),
            socket_ready_timeout_ms=num("SOCKET_READY_TIMEOUT_MS", 5000, 1),
            boot_timeout_ms=num("BOOT_TIMEOUT_MS", 60000, 1),
            ready_line=env.get(p + "READY_LINE", READY_LINE),
            log_level=matched[0] if matched else "",
        )

    def default_spec(self) -> VmSpec:
        """The spec of ``MICROVM_FIRECRACKER_VCPU_COUNT``/``_MEM_MIB`` (for the operator's default)."""
        return VmSpec(vcpus=self.vcpu_count, mem_mib=self.mem_mib, image=DEFAULT_IMAGE)

    def check_binary(self) -> None:
        """Raise :class:`ImageError` naming ``MICROVM_FIRECRACKER_BIN`` if the binary cannot be run."""
        if shutil.which(self.bin) is None:
            where = "not found" if not Path(self.bin).exists() else "not executable"
            raise ImageError(f"firecracker binary {where}: {self.bin} (set {ENV_PREFIX}BIN)")

    def check_host(self, *, kernel: str | None = None, initrd: str | None = None, rootfs: str | None = None) -> None:
        """Raise :class:`ImageError` naming the variable if the binary, kernel, initrd or rootfs is
        missing (the arguments override the settings' files). Called before anything is spawned."""
        self.check_binary()
        files = (
            ("KERNEL", "kernel", self.kernel if kernel is None else kernel),
            ("ROOTFS", "rootfs", self.rootfs if rootfs is None else rootfs),
        )
        for var, what, path in files:
            if not path:
                raise ImageError(f"{what} is not set (set {ENV_PREFIX}{var})")
            if not Path(path).is_file():
                raise ImageError(f"{what} not found: {path} (set {ENV_PREFIX}{var})")
        initrd = self.initrd if initrd is None else initrd
        if initrd and not Path(initrd).is_file():
            raise ImageError(f"initrd not found: {initrd} (set {ENV_PREFIX}INITRD)")


# ---- the API client -------------------------------------------------------------------------------


def map_api_error(exc: BaseException, what: str, timeout_ms: int | None = None) -> VmmError:
    """Translate a foreign failure of one API call (httpx, OS, JSON) into the runtime error tree.

    In the spirit of httpx's ``map_httpcore_exceptions``: timeouts become :class:`VmmTimeout`,
    a malformed answer :class:`VmmApiError`, everything else (socket gone, connection refused or
    reset, broken HTTP) :class:`VmmError`. The message names the call, never a secret."""
    detail = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        within = f" within {timeout_ms} ms" if timeout_ms is not None else ""
        return VmmTimeout(f"firecracker API did not answer {what}{within}")
    if isinstance(exc, httpx.ConnectError | FileNotFoundError | ConnectionRefusedError):
        return VmmError(f"firecracker API socket unreachable for {what} ({detail})")
    if isinstance(exc, httpx.ProtocolError):
        return VmmError(f"firecracker API broke the HTTP protocol on {what} ({detail})")
    if isinstance(exc, httpx.HTTPError | httpx.InvalidURL | OSError):
        return VmmError(f"firecracker API call {what} failed ({detail})")
    if isinstance(exc, ValueError):  # json.JSONDecodeError, UnicodeDecodeError
        return VmmApiError(f"firecracker API answered {what} with malformed JSON ({detail})")
    return VmmError(f"firecracker API call {what} failed ({detail})")


def api_refusal(status: int, content: bytes, what: str) -> VmmApiError:
    """A non-2xx answer: :class:`VmmApiError` carrying the status and Firecracker's ``fault_message``."""
    fault = ""
    try:
        payload = json.loads(content) if content else None
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("fault_message"), str):
        fault = payload["fault_message"]
    elif content:
        fault = content.decode("utf-8", "replace")
    fault = fault.strip()[:1000]
    return VmmApiError(f"firecracker refused {what} (HTTP {status}): {fault or 'no detail'}", status=status, body=fault)


class FirecrackerApi:
    """HTTP/1.1 over one VM's Unix socket; each call bounded by the API timeout.

    ``transport`` is for tests (``httpx.MockTransport``); by default the client connects to ``socket``."""

    def __init__(self, socket: str, timeout_ms: int, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.socket = socket
        self.timeout_ms = timeout_ms
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            transport = self._transport or httpx.AsyncHTTPTransport(uds=self.socket)
            self._client = httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=self.timeout_ms / 1000
            )
        return self._client

    async def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One request. Returns the decoded JSON body (``None`` for 204); raises only VmmError."""
        what = f"{method} {path}"
        try:
            response = await self._http().request(method, path, json=dict(body) if body is not None else None)
            content = response.content
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise map_api_error(exc, what, self.timeout_ms) from exc
        if not 200 <= response.status_code < 300:
            raise api_refusal(response.status_code, content, what)
        if not content:
            return None
        try:
            return json.loads(content)
        except ValueError as exc:
            raise map_api_error(exc, what) from exc

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


# ---- the driver -----------------------------------------------------------------------------------


@dataclass
class _Vm:
    vm_id: str
    workdir: Path
    socket: Path
    api: FirecrackerApi
    child: Child | None
    pid: int | None
    disk: Path
    disk_read_only: bool
    stopping: bool = False
    watcher: asyncio.Task[None] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def exit_code(self) -> int | None:
        return self.child.returncode if self.child is not None else None

    def exited(self) -> bool:
        if self.child is not None:
            return self.child.returncode is not None
        return not pid_alive(self.pid)


class FirecrackerDriver:
    """:class:`~microvm_blueprint.runtime.driver.VmmDriver` for Firecracker."""

    name = "firecracker"

    def __init__(self, settings: FirecrackerSettings) -> None:
        self.settings = settings
        self._vms: dict[str, _Vm] = {}
        self._listener: ExitListener | None = None

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    # ---- plumbing ----------------------------------------------------------------------------------

    def socket_path(self, workdir: str | Path) -> Path:
        """The API socket of the VM in ``workdir``: named from the folder name, short enough for Unix."""
        return Path(self.settings.socket_dir) / f"{Path(workdir).name[:SOCKET_NAME_LEN]}.sock"

    def _new_api(self, socket: Path) -> FirecrackerApi:
        return FirecrackerApi(str(socket), self.settings.api_timeout_ms)

    async def _call(self, vm: _Vm, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """An API call whose error also tells whether the VMM died (exit code + log tail)."""
        try:
            return await vm.api.call(method, path, body)
        except VmmError as exc:
            if not isinstance(exc, VmmApiError) and vm.child is not None:
                await vm.child.wait(0.5)  # a dropped connection: let a dying VMM be reaped, bounded
            if vm.exited():
                code = vm.exit_code()
                raise VmmError(
                    f"firecracker exited (exit code {code}) during {method} {path}: {exc}",
                    exit_code=code, log_tail=tail(vm.workdir / LOG, LOG_TAIL),
                ) from exc
            if not exc.log_tail:
                exc.log_tail = tail(vm.workdir / LOG, LOG_TAIL)
            raise

    async def _state(self, vm: _Vm) -> str:
        info = await self._call(vm, "GET", "/")
        if not isinstance(info, dict) or not isinstance(info.get("state"), str):
            raise VmmApiError("firecracker answered GET / without an instance state", body=str(info)[:500])
        return str(info["state"])

    async def _wait_state(self, vm: _Vm, want: str, timeout_ms: int) -> None:
        deadline = time.monotonic() + timeout_ms / 1000
        while (state := await self._state(vm)) != want:
            if time.monotonic() > deadline:
                raise VmmTimeout(f"firecracker stayed {state!r} for {timeout_ms} ms, wanted {want!r}",
                                 log_tail=tail(vm.workdir / LOG, LOG_TAIL))
            await asyncio.sleep(0.02)

    def _vm(self, record: VmRecord) -> _Vm:
        vm = self._vms.get(record.vm_id)
        if vm is None:
            raise VmmError(f"firecracker of vm '{record.vm_id}' is not running")
        return vm

    @staticmethod
    def _handle(vm: _Vm) -> VmHandle:
        return VmHandle(pid=vm.pid, control=str(vm.socket), extra={"driver": "firecracker", "disk": str(vm.disk)})

    def _check_spec(self, spec: VmSpec) -> None:
        if (spec.image or DEFAULT_IMAGE) != DEFAULT_IMAGE:
            raise ImageError(
                f"image '{spec.image}' is not available with the firecracker provider "
                f"(it boots {ENV_PREFIX}KERNEL and {ENV_PREFIX}ROOTFS)"
            )
        if not 1 <= spec.vcpus <= MAX_VCPUS:
            raise InvalidInput(f"vcpus must be between 1 and {MAX_VCPUS} for firecracker")

    async def _spawn(self, record: VmRecord, disk: Path, disk_read_only: bool) -> _Vm:
        """Start ``firecracker --api-sock`` and wait, with a deadline, until its API answers."""
        workdir = Path(record.workdir)
        sock = self.socket_path(workdir)
        try:
            sock.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            argv = [self.settings.bin, "--api-sock", str(sock), "--id", f"vm-{workdir.name[:SOCKET_NAME_LEN]}"]
            child = await Child.spawn(argv, workdir / LOG, cwd=workdir)
        except OSError as exc:
            raise VmmError(f"cannot start firecracker ({type(exc).__name__}: {exc})") from exc
        vm = _Vm(record.vm_id, workdir, sock, self._new_api(sock), child, child.pid, disk, disk_read_only)
        self._vms[record.vm_id] = vm
        try:
            (workdir / PID).write_text(str(child.pid))
            await self._wait_api(vm)
        except BaseException as exc:
            await self._kill(record.vm_id, workdir)
            if isinstance(exc, OSError):
                raise VmmError(f"cannot start firecracker ({type(exc).__name__}: {exc})") from exc
            raise
        return vm

    async def _wait_api(self, vm: _Vm) -> None:
        timeout_ms = self.settings.socket_ready_timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000
        assert vm.child is not None
        while True:
            if vm.child.returncode is not None:
                raise VmmError("firecracker exited during start-up", exit_code=vm.child.returncode,
                               log_tail=vm.child.log_tail(LOG_TAIL))
            if vm.socket.exists():
                try:
                    await vm.api.call("GET", "/")
                    return
                except VmmApiError:
                    return  # it answers: that is all we wait for
                except VmmError:
                    pass  # bound but not accepting yet
            if time.monotonic() > deadline:
                raise VmmTimeout(f"firecracker API socket did not appear within {timeout_ms} ms",
                                 log_tail=vm.child.log_tail(LOG_TAIL))
            await asyncio.sleep(0.01)

    def _start_watcher(self, vm: _Vm) -> None:
        vm.watcher = asyncio.create_task(self._watch(vm), name=f"firecracker-watch-{vm.workdir.name[:12]}")

    async def _watch(self, vm: _Vm) -> None:
        if vm.child is not None:
            code: int | None = await vm.child.proc.wait()
        else:
            await _wait_pid_exit(vm.pid)
            code = None
        if vm.stopping or self._vms.get(vm.vm_id) is not vm:
            return
        reason = f"firecracker exited unexpectedly (exit code {code})"
        last = tail(vm.workdir / LOG, 500).strip()
        if last:
            reason += f"; log tail: {last}"
        log.warning("%s (vm %r)", reason, vm.vm_id)
        if self._listener is not None:
            self._listener(vm.vm_id, reason)

    async def _kill(self, vm_id: str, workdir: Path, handle: VmHandle | None = None) -> int | None:
        """Stop the VMM: SIGTERM, then SIGKILL, each with a deadline; reap it; remove its socket."""
        grace = self.settings.stop_timeout_ms / 1000
        vm = self._vms.pop(vm_id, None)
        code: int | None = None
        if vm is not None:
            vm.stopping = True
            if vm.child is not None:
                code = await vm.child.stop(polite=None, grace=0, term_grace=grace)
            elif vm.pid and _is_ours(vm.pid, workdir):
                await kill_pid(vm.pid, grace=grace)
            if vm.watcher is not None:
                vm.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await vm.watcher
            await vm.api.aclose()
            sockets = {vm.socket}
        else:  # not ours in this process (operator restarted, never adopted): find it by its pid file
            pid = handle.pid if handle is not None and handle.pid else _read_pid(workdir)
            if pid and _is_ours(pid, workdir):
                await kill_pid(pid, grace=grace)
            sockets = {self.socket_path(workdir)}
            if handle is not None and handle.control:
                sockets.add(Path(handle.control))
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.unlink()
        return code

    def _config(self, spec: VmSpec, disk: Path, read_only: bool, kernel: str, initrd: str,
                boot_args: str) -> dict[str, Any]:
        boot: dict[str, Any] = {"kernel_image_path": kernel, "boot_args": boot_args}
        if initrd:
            boot["initrd_path"] = initrd
        return {
            "machine-config": {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib},
            "boot-source": boot,
            "drives": [{"drive_id": DRIVE_ID, "path_on_host": str(disk), "is_root_device": True,
                        "is_read_only": read_only}],
        }

    async def _logger(self, vm: _Vm) -> None:
        if self.settings.log_level:  # to stdout, i.e. firecracker.log (no log_path: it would have to exist)
            await self._call(vm, "PUT", "/logger", {"level": self.settings.log_level, "show_level": True})

    async def _configure(self, vm: _Vm, config: Mapping[str, Any]) -> None:
        await self._logger(vm)
        await self._call(vm, "PUT", "/machine-config", config["machine-config"])
        await self._call(vm, "PUT", "/boot-source", config["boot-source"])
        for drive in config["drives"]:
            await self._call(vm, "PUT", f"/drives/{drive['drive_id']}", drive)

    def _save_config(self, vm: _Vm, config: Mapping[str, Any]) -> None:
        vm.config = dict(config)
        data = {"config": config, "disk": str(vm.disk), "disk_read_only": vm.disk_read_only}
        (vm.workdir / CONFIG).write_text(json.dumps(data, indent=1))

    # ---- VmmDriver -----------------------------------------------------------------------------------

    async def create(self, vm: VmRecord) -> VmHandle | None:
        s = self.settings
        self._check_spec(vm.spec)
        s.check_host()
        workdir = Path(vm.workdir)
        read_only = s.rootfs_ro
        disk = Path(s.rootfs).resolve() if read_only else workdir / DISK  # read-only: shared, never copied
        if not read_only:
            await _place(Path(s.rootfs), disk, link=False)
        q = await self._spawn(vm, disk, read_only)
        config = self._config(vm.spec, disk, read_only, str(Path(s.kernel).resolve()),
                              str(Path(s.initrd).resolve()) if s.initrd else "", s.boot_args)
        try:
            await self._configure(q, config)
            self._save_config(q, config)
        except BaseException as exc:
            await self._kill(vm.vm_id, workdir)
            if isinstance(exc, OSError):
                raise VmmError(f"cannot write the firecracker configuration ({exc})") from exc
            raise
        self._start_watcher(q)
        return self._handle(q)

    async def boot(self, vm: VmRecord) -> VmHandle | None:
        q = self._vm(vm)
        log_path = q.workdir / LOG
        state = await self._state(q)
        if state == "Not started":
            offset = _size(log_path)
            await self._call(q, "PUT", "/actions", {"action_type": "InstanceStart"})
        elif state == "Running":
            offset = 0  # started before an operator crash: the replayed start looks for the line again
        else:
            raise VmmError(f"firecracker of a created vm is {state!r}", log_tail=tail(log_path, LOG_TAIL))
        timeout_ms = self.settings.boot_timeout_ms
        await self._wait_state(q, "Running", timeout_ms)
        if self.settings.ready_line:
            await self._wait_ready_line(q, offset, timeout_ms)
        return self._handle(q)

    async def _wait_ready_line(self, vm: _Vm, offset: int, timeout_ms: int) -> None:
        """Scan the console (``firecracker.log``) from ``offset`` for the ready line, with a deadline."""
        needle = self.settings.ready_line.encode()
        deadline = time.monotonic() + timeout_ms / 1000
        carry = b""
        while True:
            try:
                with open(vm.workdir / LOG, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
            except OSError:
                chunk = b""
            offset += len(chunk)
            window = carry + chunk
            if needle in window:
                return
            carry = window[-(len(needle) - 1):] if len(needle) > 1 else b""
            if vm.exited():
                raise VmmError("firecracker exited while the guest was booting", exit_code=vm.exit_code(),
                               log_tail=tail(vm.workdir / LOG, LOG_TAIL))
            if time.monotonic() > deadline:
                raise VmmTimeout(
                    f"guest did not print its ready line {self.settings.ready_line!r} within {timeout_ms} ms",
                    log_tail=tail(vm.workdir / LOG, LOG_TAIL),
                )
            await asyncio.sleep(0.05)

    async def pause(self, vm: VmRecord) -> None:
        await self._call(self._vm(vm), "PATCH", "/vm", {"state": "Paused"})

    async def resume(self, vm: VmRecord) -> None:
        q = self._vm(vm)
        await self._call(q, "PATCH", "/vm", {"state": "Resumed"})
        await self._wait_state(q, "Running", self.settings.api_timeout_ms)

    async def snapshot(self, vm: VmRecord, snapdir: str) -> int:
        q = self._vm(vm)
        out = Path(snapdir)
        manifest: dict[str, Any] = {
            "format": SNAP_FORMAT, "vm_status": vm.status.value, "spec": vm.spec.to_json(),
            "config": q.config or self._config(vm.spec, q.disk, q.disk_read_only, self.settings.kernel,
                                               self.settings.initrd, self.settings.boot_args),
            "disk": SNAP_DISK, "disk_read_only": q.disk_read_only,
        }
        if vm.status is VmStatus.CREATED:
            await _place(q.disk, out / SNAP_DISK, link=False)  # config + disk only
        else:
            await self._snapshot_live(q, out, running=vm.status is VmStatus.RUNNING)
            manifest.update(state=SNAP_STATE, memory=SNAP_MEM)
        try:
            (out / SNAP_MANIFEST).write_text(json.dumps(manifest, indent=1))
            return sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        except OSError as exc:
            raise VmmError(f"cannot write the snapshot manifest ({exc})") from exc

    async def _snapshot_live(self, q: _Vm, out: Path, *, running: bool) -> None:
        """Pause (if running), copy the disk, save with the drive pointing at the copy, undo, resume."""
        snap_disk = out / SNAP_DISK
        if running:
            await self._call(q, "PATCH", "/vm", {"state": "Paused"})
        repointed = False
        try:
            await _place(q.disk, snap_disk, link=q.disk_read_only and q.disk.parent == q.workdir)
            await self._call(q, "PATCH", f"/drives/{DRIVE_ID}", {"drive_id": DRIVE_ID, "path_on_host": str(snap_disk)})
            repointed = True
            await self._call(q, "PUT", "/snapshot/create", {
                "snapshot_type": "Full",
                "snapshot_path": str(out / SNAP_STATE),
                "mem_file_path": str(out / SNAP_MEM),
            })
        finally:
            if repointed:
                try:
                    await self._call(q, "PATCH", f"/drives/{DRIVE_ID}",
                                     {"drive_id": DRIVE_ID, "path_on_host": str(q.disk)})
                except VmmError as exc:
                    # Resumed, the guest would write into the snapshot's disk: stop it instead.
                    await self._kill(q.vm_id, q.workdir)
                    raise VmmError(f"firecracker could not switch the disk back after a snapshot, "
                                   f"so it was stopped: {exc}", log_tail=exc.log_tail) from exc
            if running:
                await self._call(q, "PATCH", "/vm", {"state": "Resumed"})
        if running:
            await self._wait_state(q, "Running", self.settings.api_timeout_ms)

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        src = Path(snapshot.path)
        manifest = _read_manifest(src)
        status = snapshot.vm_status
        read_only = bool(manifest.get("disk_read_only", False))
        config: dict[str, Any] = manifest["config"]
        boot = config.get("boot-source") or {}
        if status is VmStatus.CREATED:
            self.settings.check_host(kernel=str(boot.get("kernel_image_path", "")),
                                     initrd=str(boot.get("initrd_path", "")), rootfs=str(src / SNAP_DISK))
        else:
            self.settings.check_binary()  # the kernel is in the snapshot's memory
            for name in (SNAP_STATE, SNAP_MEM, SNAP_DISK):
                if not (src / name).is_file():
                    raise VmmError(f"snapshot '{snapshot.snapshot_id}' of vm '{snapshot.vm_id}' is missing {name}")
        workdir = Path(vm.workdir)
        disk = workdir / DISK
        await _place(src / SNAP_DISK, disk, link=read_only)  # the new VM's own copy (a link if read-only)
        q = await self._spawn(vm, disk, read_only)
        try:
            config = {**config, "drives": [{**d, "path_on_host": str(disk)} if d.get("drive_id") == DRIVE_ID else d
                                           for d in config.get("drives", [])]}
            if status is VmStatus.CREATED:
                await self._configure(q, config)
            else:
                await self._logger(q)  # logger (and metrics) are the only calls allowed before a load
                await self._call(q, "PUT", "/snapshot/load", {
                    "snapshot_path": str(src / SNAP_STATE),
                    "mem_backend": {"backend_type": "File", "backend_path": str(src / SNAP_MEM)},
                    "resume_vm": False,
                })
                await self._call(q, "PATCH", f"/drives/{DRIVE_ID}", {"drive_id": DRIVE_ID, "path_on_host": str(disk)})
                if status is VmStatus.RUNNING:
                    await self._call(q, "PATCH", "/vm", {"state": "Resumed"})
                    await self._wait_state(q, "Running", self.settings.api_timeout_ms)
                else:
                    await self._wait_state(q, "Paused", self.settings.api_timeout_ms)
            self._save_config(q, config)
        except BaseException as exc:
            await self._kill(vm.vm_id, workdir)
            if isinstance(exc, OSError):
                raise VmmError(f"cannot write the firecracker configuration ({exc})") from exc
            raise
        self._start_watcher(q)
        return self._handle(q)

    async def destroy(self, vm: VmRecord) -> None:
        code = await self._kill(vm.vm_id, Path(vm.workdir), vm.handle)
        if code is not None:
            log.info("firecracker of vm %r stopped (exit code %s)", vm.vm_id, code)
        await asyncio.to_thread(shutil.rmtree, vm.workdir, True)

    async def delete_snapshot(self, snapshot: SnapshotRecord) -> None:
        await asyncio.to_thread(shutil.rmtree, snapshot.path, True)

    async def alive(self, vm: VmRecord) -> bool:
        q = self._vms.get(vm.vm_id)
        if q is None:
            return await self._probe(vm) is not None
        if q.exited():
            return False
        try:
            await self._state(q)
        except VmError:
            return False
        return True

    async def _probe(self, vm: VmRecord) -> _Vm | None:
        """A VMM of ``vm`` left by an earlier operator process: pid alive, ours, and ``GET /`` answers."""
        workdir = Path(vm.workdir)
        pid = vm.handle.pid if vm.handle is not None and vm.handle.pid else _read_pid(workdir)
        if not pid or not pid_alive(pid) or not _is_ours(pid, workdir):
            return None
        sock = Path(vm.handle.control) if vm.handle is not None and vm.handle.control else self.socket_path(workdir)
        saved = _read_json(workdir / CONFIG)
        disk = Path(saved.get("disk") or workdir / DISK)
        q = _Vm(vm.vm_id, workdir, sock, self._new_api(sock), None, pid, disk,
                bool(saved.get("disk_read_only", False)), config=dict(saved.get("config") or {}))
        try:
            await self._state(q)
        except VmError:
            await q.api.aclose()
            return None
        return q

    async def adopt(self, vm: VmRecord) -> bool:
        if vm.vm_id in self._vms:
            return await self.alive(vm)
        q = await self._probe(vm)
        if q is None:
            return False
        self._vms[vm.vm_id] = q
        self._start_watcher(q)
        return True

    async def console(self, vm: VmRecord, tail_bytes: int) -> str:
        return tail(Path(vm.workdir) / LOG, tail_bytes) if tail_bytes > 0 else ""

    async def close(self, *, stop_vms: bool) -> None:
        for vm_id, q in list(self._vms.items()):
            if stop_vms:
                await self._kill(vm_id, q.workdir)
                continue
            q.stopping = True
            self._vms.pop(vm_id, None)
            if q.watcher is not None:
                q.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await q.watcher
            await q.api.aclose()


# ---- helpers --------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_pid(workdir: Path) -> int | None:
    try:
        return int((workdir / PID).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_ours(pid: int, workdir: Path) -> bool:
    """The pid is a VMM this driver started for ``workdir`` (spawned with it as cwd): guards pid reuse."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(workdir.resolve())
    except OSError:
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_manifest(src: Path) -> dict[str, Any]:
    manifest = _read_json(src / SNAP_MANIFEST)
    if manifest.get("format") != SNAP_FORMAT or not isinstance(manifest.get("config"), dict):
        raise VmmError(f"snapshot folder {src.name} has no readable firecracker manifest")
    return manifest


async def _place(src: Path, dst: Path, *, link: bool) -> None:
    """Copy ``src`` to ``dst`` (a hard link when ``link`` and the file is never written)."""
    def run() -> None:
        if link:
            try:
                os.link(src, dst)
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
        shutil.copyfile(src, dst)

    try:
        await asyncio.to_thread(run)
    except FileNotFoundError as exc:
        raise ImageError(f"disk image not found: {exc.filename}") from exc
    except OSError as exc:
        raise VmmError(f"cannot copy the disk {src.name} ({type(exc).__name__}: {exc})") from exc


async def _wait_pid_exit(pid: int | None) -> None:
    """Wait for a process that is not our child (a re-adopted VMM) to exit: a pidfd, else polling."""
    if not pid:
        return
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        while pid_alive(pid):
            await asyncio.sleep(0.2)
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
