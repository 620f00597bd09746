"""``MICROVM_NETWORK=bridge`` with real `debian` guests (issue #15, DESIGN.md §10).

Where it runs: the operator (Lifecycle + QemuDriver, in this process) works in the machine's root
namespace, as on a production host; every address a test touches is one it made itself: the VMs'
namespaces and their veth /30s from a pool of 10.201.x (checked unused here), the root namespace's
own addresses (this machine's, to prove a guest cannot reach them) and a listener the test opens on
127.0.0.1. Nothing is routed off the machine (it has no route out, and egress stays denied).

One test, so the `debian` boots are few (two cold boots, two restores): published SSH on both VMs; A
reaches neither B nor the host (its addresses, its loopback listener) nor anything else; two clones
of one snapshot of A run beside A and all three answer SSH at once; an operator "killed" (closed
without stopping VMs, its host table lost) is replaced by a new one whose reconcile keeps SSH
working; after destroy neither `ip netns list` nor `nft list ruleset` shows anything of any VM.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from microvm_blueprint.errors import ConfigError
from microvm_blueprint.runtime import netns
from microvm_blueprint.runtime.adapters.qemu import QemuDriver, QemuSettings
from microvm_blueprint.runtime.confine import DEFAULT_UID_RANGE, Confinement
from microvm_blueprint.runtime.confine import DEFAULT_USER as VMM_USER
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import BRIDGE_GATEWAY, NetworkMode, NetworkSettings, Origin, VmStatus
from microvm_blueprint.runtime.store import Store

from ..waiting import until
from .test_guest_access import BOOT_TIMEOUT, Operators, _debian_image, _keygen, host_port, ssh_ok, submit_job8, wait_ssh

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

POOL = "10.201.0.0/16"

GUEST_PROBE = r"""
import socket, sys, threading
out = {}
def probe(target):
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(4)
    try:
        s.connect((host, int(port)))
        out[target] = "connected"
    except OSError as exc:
        out[target] = "failed " + type(exc).__name__
    finally:
        s.close()
ts = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in ts]
[t.join() for t in ts]
for t in sys.argv[1:]:
    print(t, out[t])
"""


def probe_cmd(targets: list[str]) -> str:
    script = GUEST_PROBE.replace("'", "'\"'\"'")
    return f"python3 -c '{script}' " + " ".join(targets)


class Listener:
    """A TCP listener on the host that counts who connects (a guest never may)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                c, addr = self.sock.accept()
            except OSError:
                continue
            self.peers.append(addr[0])
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listeners() -> Iterator[tuple[Listener, Listener]]:
    lo, anywhere = Listener("127.0.0.1"), Listener("0.0.0.0")
    yield lo, anywhere
    lo.close()
    anywhere.close()


def host_addresses() -> list[str]:
    """This machine's own IPv4 addresses in the root namespace (never anything outside it)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[3].split("/")[0] for line in out.splitlines()})


def reidentified(life: Lifecycle, vm_id: str) -> bool:
    """True once ``vm_id``'s console says it re-identified (its new host keys and SSH listener are in effect)."""
    from microvm_blueprint.runtime.adapters.qemu.argv import CONSOLE_LOG
    from microvm_blueprint.runtime.guestinit import REIDENT_PREFIX

    stored = life.store.get_vm(vm_id)
    assert stored is not None
    log = Path(stored.workdir) / CONSOLE_LOG
    return log.exists() and REIDENT_PREFIX in log.read_text(errors="replace")


def leftovers(vm_ids: list[str]) -> list[str]:
    """Anything of these VMs' networks still on the host: namespaces, links, nft tables."""
    seen = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    seen += subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    seen += subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    return [v for v in vm_ids if netns.vm_key(v) in seen]


class BridgeOperators(Operators):
    def make(self, *, egress: bool = False, confine: Confinement | None = None) -> Lifecycle:
        """An operator's Lifecycle in bridge mode; with ``confine``, each VM's QEMU runs as a uid of its own
        (the default ``MICROVM_VMM_UID_RANGE``) as in production: the TAP is made for that uid, and QEMU
        drops to it after entering the namespace."""
        driver = QemuDriver(QemuSettings(image_dir=self.image_dir, accel="tcg", boot_timeout=BOOT_TIMEOUT,
                                         confine=confine))
        network = NetworkSettings(mode=NetworkMode.BRIDGE, egress=egress, bridge_pool=POOL)
        life = Lifecycle(driver, Store(self.tmp / "s.sqlite3"), state_dir=self.tmp / "state", network=network,
                         vmm_uids=DEFAULT_UID_RANGE if confine is not None else None)
        self.all.append(life)
        return life


@pytest.fixture
async def operators(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[BridgeOperators]:
    missing = netns.host_problems()
    if missing:
        pytest.skip("bridge networking needs " + "; ".join(missing))
    _, used = await netns.run(["ip", "-4", "-o", "addr"])
    if " 10.201." in used:
        pytest.skip("10.201.0.0/16 is in use on this machine (another bridge test running?)")
    ops = BridgeOperators(tmp_path, _debian_image())
    yield ops
    rep = getattr(request.node, "rep_call", None)
    await ops.finish(rep is not None and rep.failed)


async def test_bridge_ssh_isolation_clones_operator_restart_and_destroy(
        operators: BridgeOperators, tmp_path: Path, listeners: tuple[Listener, Listener]) -> None:
    key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
    pub = key.with_suffix(".pub").read_text().strip()
    life = operators.make()
    for vm_id in ("br-a", "br-b"):
        await submit_job8(life, vm_id, 1, 256, 0, "debian", [pub], [22])
    await asyncio.gather(*(life.start_vm(v, Origin()) for v in ("br-a", "br-b")))
    a_port, b_port = host_port(life, "br-a", 22), host_port(life, "br-b", 22)
    await asyncio.gather(wait_ssh(key, a_port), wait_ssh(key, b_port))

    # 1. the guest has the inside address, and each VM is its own namespace with its own /30
    assert "172.16.0.2/30" in await ssh_ok(key, a_port, "ip -4 -o addr show eth0")
    assert (await life.get_vm("br-a")).to_json()["network"]["mode"] == "bridge"
    slots = life.store.bridge_slots()
    a = netns.Plumbing("br-a", POOL, slots["br-a"][1])
    b = netns.Plumbing("br-b", POOL, slots["br-b"][1])
    assert a.subnet != b.subnet

    # 2. A reaches nothing: not B (by its veth address, its host-side address, its published port),
    # not the host (its own addresses, a listener on its loopback, one on every address), not its
    # own namespace's addresses, nothing beyond (egress denied)
    lo, anywhere = listeners
    targets = [f"{b.ns_ip}:22", f"{b.host_ip}:{anywhere.port}", f"{a.host_ip}:{anywhere.port}",
               f"{a.host_ip}:{b_port}", f"127.0.0.1:{lo.port}", f"{BRIDGE_GATEWAY}:22",
               f"{a.ns_ip}:22", "10.201.255.254:22"]
    targets += [f"{addr}:{anywhere.port}" for addr in host_addresses() if addr != "127.0.0.1"]
    answer = await ssh_ok(key, a_port, probe_cmd(targets), timeout=90)
    results = dict(line.split(" ", 1) for line in answer.strip().splitlines())
    assert set(results) == set(targets), answer
    assert all(r.startswith("failed") for r in results.values()), answer
    assert lo.peers == [] and anywhere.peers == [], (lo.peers, anywhere.peers)
    # ... while the host does reach both listeners (the probes above could have connected)
    with socket.create_connection(("127.0.0.1", lo.port), timeout=5), \
            socket.create_connection((a.host_ip, anywhere.port), timeout=5):
        pass

    # 3. two clones of one snapshot of A, beside A: the same inside address, ports of their own, all answer
    await life.snapshot_vm("br-a", "s1", Origin())
    await asyncio.gather(*(life.restore_vm("br-a", "s1", c, Origin()) for c in ("br-c1", "br-c2")))
    for c in ("br-c1", "br-c2"):  # a clone restarts its SSH listener (new host keys) before this line
        await until(functools.partial(reidentified, life, c), 60, f"{c}'s re-identified line", every=0.5)
    ports = [a_port, host_port(life, "br-c1", 22), host_port(life, "br-c2", 22)]
    assert len(set(ports)) == 3
    names = await asyncio.gather(*(ssh_ok(key, p, f"echo vm-at-{p} > /tmp/who; ip -4 -o addr show eth0")
                                   for p in ports))
    assert all("172.16.0.2/30" in n for n in names), names  # (a clone is its source's guest: same hostname)

    # 4. operator "killed" (VMs left running) and its host table for A lost; a new one re-adopts and
    # re-makes what is missing
    await life.close(stop_vms=False)
    await netns.run(["nft", "delete", "table", "inet", netns.host_table("br-a")])
    life2 = operators.make()
    summary = await life2.reconcile()
    assert "4 vm(s) re-adopted" in summary, summary
    for p in ports:  # each published port still reaches its own VM
        assert (await ssh_ok(key, p, "cat /tmp/who")).strip() == f"vm-at-{p}"

    # 5. destroy leaves nothing of any VM on the host
    vm_ids = ["br-a", "br-b", "br-c1", "br-c2"]
    assert leftovers(vm_ids) == vm_ids
    for v in vm_ids:
        assert (await life2.destroy_vm(v, Origin())).status is VmStatus.DESTROYED
    assert leftovers(vm_ids) == []
    assert life2.store.bridge_slots() == {}


@pytest.fixture
def forwarding() -> Iterator[None]:
    """Egress allowed turns on the host's IPv4 forwarding: put it back as it was."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text()
    yield
    path.write_text(before)


async def test_with_egress_allowed_a_guest_still_reaches_neither_the_host_nor_its_loopback(
        operators: BridgeOperators, tmp_path: Path, listeners: tuple[Listener, Listener], forwarding: None) -> None:
    """Egress passes the namespace, so here the host-side rules alone keep the guest off the host's
    own addresses (targets: this machine's addresses only; nothing is sent off it)."""
    key = await asyncio.to_thread(_keygen, tmp_path / "id_ed25519")
    try:  # as production runs it: QEMU unprivileged (DESIGN.md §9) inside the namespace (§10)
        confine: Confinement | None = Confinement(VMM_USER, parent=f"microvm-test-br-{os.getpid()}")
    except ConfigError:
        confine = None  # no VMM user on this machine (scripts/bootstrap.sh makes it when run as root)
    life = operators.make(egress=True, confine=confine)
    await submit_job8(life, "br-e", 1, 256, 0, "debian", [key.with_suffix(".pub").read_text().strip()], [22])
    await life.start_vm("br-e", Origin())
    if confine is not None and confine.user is not None:
        handle = life.store.get_vm("br-e").handle  # type: ignore[union-attr]
        status = Path(f"/proc/{handle.pid}/status").read_text()  # type: ignore[union-attr]
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        own = life.store.vmm_uid("br-e")  # the VM's own uid, which its TAP belongs to
        assert own is not None and DEFAULT_UID_RANGE[0] <= own <= DEFAULT_UID_RANGE[1], own
        assert uid_line.split()[1:] == [str(own)] * 4, uid_line
        assert "CapEff:\t0000000000000000" in status, status
    port = host_port(life, "br-e", 22)
    await wait_ssh(key, port)
    e = netns.Plumbing("br-e", POOL, life.store.bridge_slots()["br-e"][1])
    lo, anywhere = listeners
    targets = [f"{addr}:{anywhere.port}" for addr in host_addresses() if addr != "127.0.0.1"]
    assert targets, "this machine has no address besides loopback to try"
    targets += [f"127.0.0.1:{lo.port}", f"{e.host_ip}:{anywhere.port}", f"{BRIDGE_GATEWAY}:22"]
    answer = await ssh_ok(key, port, probe_cmd(targets), timeout=90)
    results = dict(line.split(" ", 1) for line in answer.strip().splitlines())
    assert set(results) == set(targets) and all(r.startswith("failed") for r in results.values()), answer
    assert lo.peers == [] and anywhere.peers == [], (lo.peers, anywhere.peers)
    await life.destroy_vm("br-e", Origin())
    assert leftovers(["br-e"]) == []
