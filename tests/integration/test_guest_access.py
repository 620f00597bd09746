"""Customers' access to their own VM (issue #12, DESIGN.md §8): real `debian` guests under TCG, created
with job 8 through the real router, Lifecycle and QEMU driver; SSH with the customer's key on the
published host port, a second published port, egress denied (and allowed), a restored clone with ports
and an instance-id of its own, an operator killed with networked VMs running, and destroy freeing the ports.

Boots are few (one `debian` boot per test: ~20 s each under TCG here) and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME, TRUE, build_router
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.adapters.qemu.argv import CONFIG_DRIVE, CONSOLE_LOG
from microvm_blueprint.runtime.configdrive import hostname_for
from microvm_blueprint.runtime.errors import VmError
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import NetworkMode, NetworkSettings, Origin, VmStatus
from microvm_blueprint.runtime.store import Store
from microvm_blueprint.tangle.abi import encode_args
from microvm_blueprint.tangle.calls import JobCall

from ..qemu_support import ensure_debian_image, qemu_pids
from ..waiting import until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

BOOT_TIMEOUT = 180.0
SSH_DEADLINE = 180.0
_calls = iter(range(1, 10**9))


# ---- support ----------------------------------------------------------------------------------------


_debian_image = ensure_debian_image  # the name the other guest tests import


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@microvm", "-f", str(path)],
                   check=True, timeout=30)
    return path


def _ssh_sync(key: Path, port: int, command: str, stdin: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
         "root@127.0.0.1", command],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False)


async def ssh(key: Path, port: int, command: str, *, stdin: str | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_ssh_sync, key, port, command, stdin, timeout)


async def ssh_ok(key: Path, port: int, command: str, *, stdin: str | None = None, timeout: float = 60) -> str:
    r = await ssh(key, port, command, stdin=stdin, timeout=timeout)
    assert r.returncode == 0, f"ssh -p {port} {command!r} failed ({r.returncode}): {r.stderr}"
    return r.stdout


async def wait_ssh(key: Path, port: int, deadline: float = SSH_DEADLINE) -> None:
    """Until root gets a shell on ``port`` (the guest's sshd answers and takes the key)."""
    last: list[subprocess.CompletedProcess[str]] = []

    async def answers() -> bool:
        try:
            r = await ssh(key, port, "echo ok-$((6*7))", timeout=30)
        except subprocess.TimeoutExpired:
            return False
        last[:] = [r]
        return r.returncode == 0 and r.stdout.strip() == "ok-42"

    try:
        await until(answers, deadline, f"ssh as root on 127.0.0.1:{port}", every=1.0)
    except AssertionError:
        raise AssertionError(f"no ssh on port {port}: {last[-1].stderr if last else ''}") from None


def host_port(life: Lifecycle, vm_id: str, guest_port: int) -> int:
    """The published host port of ``guest_port``, as the store (and the query API's view) says."""
    ports = {p.guest_port: p for p in life.store.network(vm_id).ports}
    assert guest_port in ports, f"guest port {guest_port} of {vm_id} is not published: {ports}"
    assert ports[guest_port].host == "127.0.0.1"
    return ports[guest_port].host_port


def drive_instance_id(life: Lifecycle, vm_id: str) -> str:
    """The instance-id the operator wrote on ``vm_id``'s config drive (read on the host with mtools)."""
    stored = life.store.get_vm(vm_id)
    assert stored is not None
    out = subprocess.run(["mtype", "-i", str(Path(stored.workdir) / CONFIG_DRIVE), "::/meta-data"],
                         capture_output=True, text=True, timeout=30, check=True,
                         env={**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"})
    return _json_field(out.stdout, "instance-id")


def _json_field(text: str, name: str) -> str:
    import json

    value = json.loads(text)[name]
    assert isinstance(value, str)
    return value


async def submit_job8(life: Lifecycle, vm_id: str, vcpus: int, mem_mib: int, disk_mib: int, image: str,
                      keys: list[str], ports: list[int]) -> None:
    """Job 8 as the runner runs it: ABI-encoded inputs, decoded once by the router, then the handler."""
    job = JOBS_BY_NAME["create_vm_with_config"]
    assert job.index == 8
    inputs = encode_args(job.arg_types, [vm_id, vcpus, mem_mib, disk_mib, image, keys, ports])
    call = JobCall(service_id=0, call_id=next(_calls), job_index=8, caller="0x" + "c" * 40, inputs=inputs)
    routed = build_router(life).prepare(call)
    assert routed.route is not None and routed.refused is None, routed.refused
    assert await routed.route.handler(call, routed.args) == TRUE


KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256")
"""Host key types compared (RSA left out: making one under TCG costs seconds, and -R makes each type alike)."""


def _keyscan(port: int) -> set[str]:
    r = subprocess.run(["ssh-keyscan", "-T", "30", "-t", "ed25519,ecdsa", "-p", str(port), "127.0.0.1"],
                       capture_output=True, text=True, timeout=120, check=False)
    return {" ".join(line.split()[1:3]) for line in r.stdout.splitlines()
            if line.strip() and not line.startswith("#") and len(line.split()) >= 3}


async def host_keys(port: int, deadline: float = 120) -> set[str]:
    """``type base64`` of the guest's host keys of :data:`KEY_TYPES` on ``port`` (``ssh-keyscan``), once it
    answers with all of them (dropbear ``-R`` makes each on its first use)."""
    seen: list[set[str]] = []

    async def all_types() -> bool:
        seen[:] = [await asyncio.to_thread(_keyscan, port)]
        return {k.split()[0] for k in seen[0]} == set(KEY_TYPES)

    await until(all_types, deadline, f"the host keys on 127.0.0.1:{port}", every=1.0)
    return seen[0]


def refused(port: int) -> bool:
    """True if nothing accepts TCP connections on 127.0.0.1:``port`` any more."""
    with socket.socket() as s:
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def fetch_line(port: int) -> str | None:
    """One line from a server at 127.0.0.1:``port`` (None while nothing answers behind the forward)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return data.decode(errors="replace").strip() or None


GUEST_SERVER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from " + socket.gethostname().encode() + b"\n")
    c.close()
"""

GUEST_CONNECT = r"""
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(6)
    try:
        s.connect((host, int(port)))
        s.sendall(b"from-guest\n")
        print(target, "connected")
    except OSError as exc:
        print(target, "failed", type(exc).__name__)
    finally:
        s.close()
"""


def guest_connect(targets: list[str]) -> str:
    """A shell command: the guest tries a TCP connection to each ``host:port`` (6 s timeout each)."""
    script = GUEST_CONNECT.replace("'", "'\"'\"'")
    return f"python3 -c '{script}' " + " ".join(targets)


class Operators:
    """Operators (Lifecycle + QemuDriver, user-mode networking) over one store and state folder; at the
    end keeps every VM's console as evidence when the test failed, destroys what is left, and checks
    that no QEMU process and no VM folder remain."""

    def __init__(self, tmp_path: Path, image_dir: Path) -> None:
        self.tmp = tmp_path
        self.image_dir = image_dir
        self.all: list[Lifecycle] = []

    def make(self, *, egress: bool = False) -> Lifecycle:
        driver = QemuDriver(QemuSettings(image_dir=self.image_dir, accel="tcg", boot_timeout=BOOT_TIMEOUT))
        life = Lifecycle(driver, Store(self.tmp / "s.sqlite3"), state_dir=self.tmp / "state",
                         network=NetworkSettings(mode=NetworkMode.USER, egress=egress))
        self.all.append(life)
        return life

    async def finish(self, failed: bool) -> None:
        life = self.all[-1] if self.all else self.make()
        if failed:  # keep the evidence: every VM's console (QEMU's own log file, read before destroy)
            for stored in life.store.list_vms():
                log = Path(stored.workdir) / CONSOLE_LOG
                if log.exists():
                    text = log.read_text(errors="replace")[-8000:]
                    (self.tmp / f"console-{stored.vm_id}.log").write_text(text)
                    print(f"--- console of {stored.vm_id} ---\n{text}")
        for vm in await life.list_vms():
            if vm.status is not VmStatus.DESTROYED:
                with contextlib.suppress(VmError):
                    await life.destroy_vm(vm.vm_id, Origin())
        for other in self.all:
            await other.close(stop_vms=True)
        assert qemu_pids(self.tmp) == set(), "a QEMU process was left behind"
        assert list((self.tmp / "state" / "vms").iterdir()) == [], "a VM folder was left behind"


@pytest.fixture
async def operators(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Operators]:
    ops = Operators(tmp_path, _debian_image())
    yield ops
    rep = getattr(request.node, "rep_call", None)
    await ops.finish(rep is not None and rep.failed)


# ---- the tests ----------------------------------------------------------------------------------------


async def test_a_job8_debian_vm_over_ssh_its_ports_clone_and_operator_restart(
        operators: Operators, tmp_path: Path) -> None:
    key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
    pub = key.with_suffix(".pub").read_text().strip()
    life = operators.make()
    o = Origin()
    times: dict[str, float] = {}

    # ---- 1. job 8 -> start -> ssh on the published port of guest port 22 -----------------------
    started = time.monotonic()
    await submit_job8(life, "web-1", 2, 512, 1024, "debian", [pub], [22, 8080])
    view = await life.get_vm("web-1")
    assert view.status is VmStatus.CREATED
    assert (view.spec.vcpus, view.spec.mem_mib, view.spec.disk_mib, view.spec.image) == (2, 512, 1024, "debian")
    assert view.network.mode is NetworkMode.USER and view.network.mode.guest_ip == "10.0.2.15"
    assert sorted(p.guest_port for p in view.network.ports) == [22, 8080]
    ssh_port, web_port = host_port(life, "web-1", 22), host_port(life, "web-1", 8080)
    assert ssh_port != web_port
    await life.start_vm("web-1", o)
    times["create+start (ready line)"] = time.monotonic() - started
    await wait_ssh(key, ssh_port)
    times["create+start to ssh"] = time.monotonic() - started

    out = await ssh_ok(key, ssh_port, "hostname; nproc; awk '/^MemTotal:/{print $2}' /proc/meminfo;"
                       " df -m --output=size / | tail -1; cat /var/lib/cloud/data/instance-id")
    hostname, nproc, memtotal_kib, root_mib, instance_id = out.split()
    assert hostname == hostname_for("web-1")  # from the config drive
    assert int(nproc) == 2
    # the kernel keeps a little for itself: MemTotal is a bit below the 512 MiB the VM has
    assert 0.85 * 512 * 1024 <= int(memtotal_kib) <= 512 * 1024, memtotal_kib
    assert 0.9 * 1024 <= int(root_mib) <= 1024, root_mib  # grown from the image's 512 MiB to disk_mib
    source_iid = drive_instance_id(life, "web-1")
    assert instance_id == source_iid  # what the guest read off its drive at boot

    # a second published port reaches a server the customer starts in the guest
    assert await asyncio.to_thread(fetch_line, web_port) is None  # nothing listens on 8080 yet
    server = GUEST_SERVER.replace("'", "'\"'\"'")
    await ssh_ok(key, ssh_port, f"setsid nohup python3 -c '{server}' >/dev/null 2>&1 < /dev/null &")
    lines: list[str | None] = []

    async def served() -> bool:
        lines[:] = [await asyncio.to_thread(fetch_line, web_port)]
        return lines[0] is not None

    await until(served, 60, "the guest's server on the second published port", every=0.5)
    assert lines[0] == f"hello from {hostname_for('web-1')}"

    # ---- 2. egress denied: not the host's loopback through 10.0.2.2, not anything else -----------
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        loopback_port = listener.getsockname()[1]
        out = await ssh_ok(key, ssh_port, guest_connect([f"10.0.2.2:{loopback_port}", "192.0.2.1:80"]))
        assert f"10.0.2.2:{loopback_port} failed" in out, out
        assert "192.0.2.1:80 failed" in out, out
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing from the guest ever reached the host's loopback

    # ---- 3. snapshot the running VM, restore it as a clone: both answer on their own ports --------
    snap = await life.snapshot_vm("web-1", "s1", o)
    assert snap.vm_status is VmStatus.RUNNING
    started = time.monotonic()
    clone = await life.restore_vm("web-1", "s1", "web-2", o)
    assert clone.status is VmStatus.RUNNING
    clone_ssh, clone_web = host_port(life, "web-2", 22), host_port(life, "web-2", 8080)
    assert {clone_ssh, clone_web}.isdisjoint({ssh_port, web_port})  # ports of its own
    assert host_port(life, "web-1", 22) == ssh_port  # the source keeps its ports
    await wait_ssh(key, clone_ssh)
    times["restore to ssh"] = time.monotonic() - started
    clone_iid = drive_instance_id(life, "web-2")
    assert clone_iid != source_iid  # a new instance-id on the clone's config drive
    # both at once, each on its own port; the clone reads the instance-id off *its* drive (and, while
    # running, re-identifies itself from it: test_a_clone_of_a_running_guest_re_identifies_itself...)
    read_drive = ("echo 3 > /proc/sys/vm/drop_caches; mkdir -p /mnt/cidata; "
                  "dev=$(python3 -c 'import sys; sys.path.insert(0, \"/usr/lib/microvm\"); import guestinit; "
                  "print(guestinit.find_drive()[0])'); mount -t vfat -o ro \"$dev\" /mnt/cidata && "
                  "python3 -c 'import sys; sys.path.insert(0, \"/usr/lib/microvm\"); import guestinit; "
                  "guestinit.MOUNT = \"/mnt/cidata\"; print(guestinit.load(\"meta-data\")[\"instance-id\"])'; "
                  "umount /mnt/cidata")
    src_out, clone_out = await asyncio.gather(ssh_ok(key, ssh_port, read_drive), ssh_ok(key, clone_ssh, read_drive))
    assert src_out.split() == [source_iid]
    assert clone_out.split() == [clone_iid]
    # the clone's copy of the guest server answers on the clone's own second port
    async def clone_served() -> bool:
        return await asyncio.to_thread(fetch_line, clone_web) is not None

    await until(clone_served, 60, "the clone's server", every=0.5)
    # the server the clone carried over from the source names the clone's own hostname (re-identified)
    clone_lines: list[str | None] = []

    async def clone_named() -> bool:
        clone_lines[:] = [await asyncio.to_thread(fetch_line, clone_web)]
        return clone_lines[0] == f"hello from {hostname_for('web-2')}"

    await until(clone_named, 60, "the clone's server to name the clone's hostname", every=1.0)
    assert await asyncio.to_thread(fetch_line, web_port) == f"hello from {hostname_for('web-1')}"

    # ---- 4. the operator dies with both networked VMs running; the next one re-adopts them --------
    before = {vm: life.store.network(vm) for vm in ("web-1", "web-2")}
    await life.close(stop_vms=False)  # as kill -9 leaves things: the QMP sessions drop, QEMU runs on
    assert len(qemu_pids(tmp_path)) == 2
    second = operators.make()
    summary = await second.reconcile()
    assert summary.startswith("reconciled: 2 vm(s) re-adopted"), summary
    for vm in ("web-1", "web-2"):
        assert second.store.network(vm) == before[vm]  # the same host ports, from the store
        assert (await second.get_vm(vm)).network == before[vm]
    await asyncio.gather(wait_ssh(key, ssh_port, 60), wait_ssh(key, clone_ssh, 60))

    # ---- destroy frees the ports: refused afterwards, and the store holds none ---------------------
    for vm, ports in (("web-1", (ssh_port, web_port)), ("web-2", (clone_ssh, clone_web))):
        await second.destroy_vm(vm, o)
        assert second.store.network(vm).ports == ()
        assert (await second.get_vm(vm)).network.ports == ()
        for port in ports:
            assert await asyncio.to_thread(refused, port), f"port {port} still answers after destroy"
    print("\ndebian under TCG: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


async def test_with_egress_allowed_the_same_loopback_listener_is_reached(operators: Operators,
                                                                         tmp_path: Path) -> None:
    """The switch works: ``MICROVM_EGRESS=allow`` (restrict=off) lets the guest reach the listener that
    the denied case could not. Only the host's loopback is ever targeted."""
    key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
    life = operators.make(egress=True)
    o = Origin()
    await submit_job8(life, "open-1", 1, 256, 0, "debian", [key.with_suffix(".pub").read_text().strip()], [])
    port = host_port(life, "open-1", 22)  # keys given: guest port 22 is published without asking
    await life.start_vm("open-1", o)
    await wait_ssh(key, port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        loopback_port = listener.getsockname()[1]
        out = await ssh_ok(key, port, guest_connect([f"10.0.2.2:{loopback_port}"]))
        assert f"10.0.2.2:{loopback_port} connected" in out, out
        listener.settimeout(30)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            assert conn.recv(100) == b"from-guest\n"
    await life.destroy_vm("open-1", o)
    assert await asyncio.to_thread(refused, port)


IDENTITY = "hostname; cat /var/lib/cloud/data/instance-id; cat /etc/hostname"
HOLD_DRIVE = ("dev=$(python3 -c 'import sys; sys.path.insert(0, \"/usr/lib/microvm\"); import guestinit; "
              "print(guestinit.find_drive()[0])'); dd if=$dev of=/dev/null bs=64k count=16 2>/dev/null; "
              "setsid nohup sleep 100000 < $dev > /dev/null 2>&1 & echo $dev")
"""Reads the config drive into the page cache and keeps it open (so the kernel keeps those blocks): a clone
restored from this guest's memory then holds the *source's* drive blocks, and must read past them."""
WATCHER_CPU = ("for p in /proc/[0-9]*; do if tr '\\0' ' ' < $p/cmdline 2>/dev/null "
               "| grep -qx 'python3 -S /usr/lib/microvm/guestinit.py --watch '; then "
               "awk '{print $14+$15}' $p/stat; fi; done; cut -d' ' -f1 /proc/uptime")
"""The drive watcher's CPU time (clock ticks) and the guest's uptime (s)."""


async def test_a_clone_of_a_running_guest_re_identifies_itself_while_running(operators: Operators,
                                                                           tmp_path: Path) -> None:
    """Issue #12 items 1 and 6: a VM restored from a snapshot of a running `debian` guest gets a config drive
    with a new instance-id and its own hostname; the running clone notices (no reboot), applies them, says
    ``microvm: re-identified as <id>`` on its console, while the source keeps its own identity. Host keys
    too (README: each VM has host keys of its own): two VMs fresh from the image have different ones, and
    once the clone's line is out it answers with new ones while the source keeps its own."""
    from microvm_blueprint.runtime.guestinit import REIDENT_PREFIX

    if shutil.which("ssh-keyscan") is None:
        pytest.skip("ssh-keyscan is not installed (scripts/bootstrap.sh installs ssh)")
    key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
    life = operators.make()
    o = Origin()
    pub = key.with_suffix(".pub").read_text().strip()
    await submit_job8(life, "src-1", 1, 256, 0, "debian", [pub], [22])
    await submit_job8(life, "fresh-1", 1, 256, 0, "debian", [pub], [22])
    src_port, fresh_port = host_port(life, "src-1", 22), host_port(life, "fresh-1", 22)
    await asyncio.gather(life.start_vm("src-1", o), life.start_vm("fresh-1", o))
    await wait_ssh(key, src_port)
    # two VMs fresh from one image: host keys of their own (made in each guest, none in the image)
    source_keys = await host_keys(src_port)
    fresh_keys = await host_keys(fresh_port)
    assert source_keys.isdisjoint(fresh_keys), f"two fresh VMs share host keys: {source_keys & fresh_keys}"
    await life.destroy_vm("fresh-1", o)  # two guests at a time under TCG are enough
    source_iid = drive_instance_id(life, "src-1")
    assert (await ssh_ok(key, src_port, IDENTITY)).split() == ["src-1", source_iid, "src-1"]
    cpu_before = [float(v) for v in (await ssh_ok(key, src_port, WATCHER_CPU)).split()]
    held = (await ssh_ok(key, src_port, HOLD_DRIVE)).strip()
    assert held.startswith("/dev/vd"), held

    snap = await life.snapshot_vm("src-1", "live", o)
    assert snap.vm_status is VmStatus.RUNNING
    started = time.monotonic()
    clone = await life.restore_vm("src-1", "live", "src-2", o)
    assert clone.status is VmStatus.RUNNING
    clone_port = host_port(life, "src-2", 22)
    clone_iid = drive_instance_id(life, "src-2")
    assert clone_iid != source_iid
    assert hostname_for("src-2") == "src-2"
    await wait_ssh(key, clone_port)  # root's keys still work (re-written from the clone's drive)
    seen: list[str] = []

    async def reidentified() -> bool:
        r = await ssh(key, clone_port, IDENTITY, timeout=30)
        seen[:] = [r.stdout]
        return r.returncode == 0 and r.stdout.split() == ["src-2", clone_iid, "src-2"]

    try:
        await until(reidentified, 60, "the running clone to take its own hostname and instance-id", every=1.0)
    except AssertionError:
        raise AssertionError(f"the clone still says {seen[-1:]!r} (its drive says src-2 {clone_iid})") from None
    took = time.monotonic() - started

    def console(vm_id: str) -> str:
        stored = life.store.get_vm(vm_id)
        assert stored is not None
        return (Path(stored.workdir) / CONSOLE_LOG).read_text(errors="replace")

    async def said() -> bool:
        return f"{REIDENT_PREFIX}{clone_iid}" in await asyncio.to_thread(console, "src-2")

    await until(said, 30, "the clone's console line", every=0.5)
    # the line is out: new connections meet the clone's own host keys, not the source's (kept on its
    # disk and, in memory, by the dropbear listener the clone carried over)
    clone_keys = await asyncio.to_thread(_keyscan, clone_port)
    assert {k.split()[0] for k in clone_keys} >= {"ssh-ed25519"}, f"no host key from the clone: {clone_keys}"
    assert clone_keys.isdisjoint(source_keys), f"the clone answers with the source's host keys: {clone_keys}"
    clone_keys = await host_keys(clone_port)
    assert clone_keys.isdisjoint(source_keys) and clone_keys.isdisjoint(fresh_keys)
    assert "host keys renewed" in console("src-2") and "SSH server not back" not in console("src-2")
    await wait_ssh(key, clone_port)  # root still gets in through the restarted listener
    assert await host_keys(src_port) == source_keys  # the source's keys are its own still
    assert console("src-2").count(REIDENT_PREFIX) == 1
    # the source keeps its own identity, and never re-identified
    assert (await ssh_ok(key, src_port, IDENTITY)).split() == ["src-1", source_iid, "src-1"]
    assert REIDENT_PREFIX not in console("src-1")
    # the clone's network was the same (user mode, 10.0.2.15): left as it was, not re-done
    assert "network re-applied" not in console("src-2")
    assert (await ssh_ok(key, clone_port, "ip -4 -o addr show dev eth0")).split()[3] == "10.0.2.15/24"
    # what the watcher costs the source (a figure, not an assertion): its CPU time while polling, after
    # its start (python3 itself, the first read of the drive)
    cpu_after = [float(v) for v in (await ssh_ok(key, src_port, WATCHER_CPU)).split()]
    hz = os.sysconf("SC_CLK_TCK")
    print(f"\nclone re-identified {took:.1f} s after restore began (TCG); the source's drive watcher: "
          f"{cpu_before[0] / hz:.2f} s CPU to start, then {(cpu_after[0] - cpu_before[0]) / hz:.2f} s CPU "
          f"in {cpu_after[1] - cpu_before[1]:.0f} s of polling")
