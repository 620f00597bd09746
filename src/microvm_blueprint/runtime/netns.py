"""``MICROVM_NETWORK=bridge`` (DESIGN.md §10): every VM in a network namespace of its own.

Per VM (``key`` = the first 12 hex digits of sha256(vm_id)):

* namespace ``mvm-<key>``; inside it the TAP ``tap0`` the VMM opens (``172.16.0.1/30``: the guest is
  always ``172.16.0.2``, so a clone restored from a snapshot renumbers nothing) and ``veth0``, the inside
  end of a veth pair whose host end is ``mvm<key>``; the pair gets the /30 ``slot`` of
  ``MICROVM_BRIDGE_POOL`` the store allocated (host ``.1``, namespace ``.2``);
* inside the namespace (nft table ``inet mvm``): the guest masqueraded to the veth address; published
  guest ports DNAT'ed from the veth address to the guest; the guest reaches nothing of the namespace
  itself; it reaches beyond it only with ``MICROVM_EGRESS=allow`` and then never the pool (other VMs)
  nor loopback;
* on the host (nft table ``inet mvm-<key>``, one table per VM, so a VM's rules come and go as one
  transaction and never touch another's): ``MICROVM_PUBLISH_ADDR:<host port>`` DNAT'ed to the veth
  address (prerouting for other machines, output for the host itself; loopback clients are
  masqueraded, with ``route_localnet`` on the VM's veth); new connections from the VM's veth to the
  host itself or to another VM dropped; with egress allowed, masquerade to the uplink.

Everything is an argv list (``ip`` from iproute2, ``nft -f -`` with generated rules on stdin,
``sysctl`` from procps run inside the namespace); :func:`ensure` is idempotent (it is what
reconciliation re-runs for a re-adopted VM) and :func:`teardown` too (what destroy and the removal of
orphans run). Rule and command generation are pure functions, unit-tested without root.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import VmmError
from .model import BRIDGE_GATEWAY, BRIDGE_GUEST_IP, PortMapping

log = logging.getLogger(__name__)

DEFAULT_POOL = "10.201.0.0/16"
TAP = "tap0"
NS_VETH = "veth0"
NS_TABLE = "mvm"
PREFIX = "mvm"
CMD_TIMEOUT = 30.0
TAP_NET = f"{BRIDGE_GATEWAY}/30"


def vm_key(vm_id: str) -> str:
    """The 12 hex digits naming a VM's network objects."""
    return hashlib.sha256(vm_id.encode("utf-8")).hexdigest()[:12]


def ns_name(vm_id: str) -> str:
    """The VM's network namespace (``ip netns``)."""
    return f"{PREFIX}-{vm_key(vm_id)}"


def host_veth(vm_id: str) -> str:
    """The host end of the VM's veth pair (15 characters: the kernel's limit)."""
    return f"{PREFIX}{vm_key(vm_id)}"


def host_table(vm_id: str) -> str:
    """The VM's own nft table on the host (family ``inet``)."""
    return f"{PREFIX}-{vm_key(vm_id)}"


def exec_prefix(vm_id: str) -> list[str]:
    """argv prefix that runs a program (the VMM) inside the VM's namespace."""
    return ["ip", "netns", "exec", ns_name(vm_id)]


def parse_pool(raw: str) -> ipaddress.IPv4Network:
    """``MICROVM_BRIDGE_POOL``: an IPv4 network of at least two /30 slots that does not hold the
    guest's own /30. Raises ValueError with the reason."""
    pool = ipaddress.IPv4Network(raw, strict=True)
    if pool.prefixlen > 29:
        raise ValueError("must hold at least two /30 (a prefix of /29 or shorter)")
    if pool.overlaps(ipaddress.IPv4Network(TAP_NET, strict=False)):
        raise ValueError(f"must not overlap the guest's own {TAP_NET}")
    return pool


def slot_count(pool: ipaddress.IPv4Network) -> int:
    return int(pool.num_addresses // 4)


@dataclass(frozen=True)
class Plumbing:
    """What one VM's network is: its names come from ``vm_id``, its addresses from ``slot``."""

    vm_id: str
    pool: str
    slot: int
    ports: tuple[PortMapping, ...] = ()
    egress: bool = False
    tap_owner: tuple[int, int] | None = None  # the VMM user, who opens the TAP without privileges

    @property
    def key(self) -> str:
        return vm_key(self.vm_id)

    @property
    def ns(self) -> str:
        return ns_name(self.vm_id)

    @property
    def veth(self) -> str:
        return host_veth(self.vm_id)

    @property
    def table(self) -> str:
        return host_table(self.vm_id)

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        pool = ipaddress.IPv4Network(self.pool)
        if not 0 <= self.slot < slot_count(pool):
            raise VmmError(f"bridge slot {self.slot} is outside MICROVM_BRIDGE_POOL {self.pool}")
        return ipaddress.IPv4Network((int(pool.network_address) + 4 * self.slot, 30))

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ns_ip(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def loopback_publish(self) -> bool:
        return any(ipaddress.ip_address(p.host).is_loopback for p in self.ports)

    @property
    def needs_forwarding(self) -> bool:
        """The host must route: egress, or ports published on an address other machines reach."""
        return self.egress or any(not ipaddress.ip_address(p.host).is_loopback for p in self.ports)


# ---- pure generation --------------------------------------------------------------------------------


def setup_commands(p: Plumbing, *, have_ns: bool, have_veth: bool, have_tap: bool) -> list[list[str]]:
    """The ``ip``/``sysctl`` argv lists that bring ``p`` into being, skipping what exists (so they can
    run again on a VM whose objects survived an operator crash; the TAP is never re-made under a VMM)."""
    ns, veth = p.ns, p.veth
    cmds: list[list[str]] = []
    if not have_ns:
        cmds.append(["ip", "netns", "add", ns])
    if not have_veth:
        cmds.append(["ip", "link", "add", veth, "type", "veth", "peer", "name", NS_VETH, "netns", ns])
    if not have_tap:
        owner = ["user", str(p.tap_owner[0]), "group", str(p.tap_owner[1])] if p.tap_owner else []
        cmds.append(["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap", *owner])
    cmds += [
        ["ip", "addr", "replace", f"{p.host_ip}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", ns, "addr", "replace", f"{p.ns_ip}/30", "dev", NS_VETH],
        ["ip", "-n", ns, "link", "set", NS_VETH, "up"],
        ["ip", "-n", ns, "addr", "replace", TAP_NET, "dev", TAP],
        ["ip", "-n", ns, "link", "set", TAP, "up"],
        ["ip", "-n", ns, "route", "replace", "default", "via", p.host_ip, "dev", NS_VETH],
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
    ]
    return cmds


def _set(values: Sequence[int]) -> str:
    return "{ " + ", ".join(str(v) for v in values) + " }"


def ns_rules(p: Plumbing) -> str:
    """The nft script run inside the namespace (replaces its table atomically)."""
    guest_ports = sorted({m.guest_port for m in p.ports})
    lines = [
        f"table inet {NS_TABLE} {{}}",
        f"delete table inet {NS_TABLE}",
        f"table inet {NS_TABLE} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    if guest_ports:
        lines.append(f'    iifname "{NS_VETH}" ip daddr {p.ns_ip} tcp dport {_set(guest_ports)} '
                     f"dnat ip to {BRIDGE_GUEST_IP}")
    lines += [
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{NS_VETH}" ip saddr {BRIDGE_GUEST_IP} masquerade',
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname "{TAP}" drop',  # the guest reaches nothing of its namespace
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
    ]
    if guest_ports:
        lines.append(f'    iifname "{NS_VETH}" oifname "{TAP}" ip daddr {BRIDGE_GUEST_IP} '
                     f"tcp dport {_set(guest_ports)} ct status dnat accept")
    if p.egress:
        lines.append(f'    iifname "{TAP}" oifname "{NS_VETH}" ip daddr != {{ {p.pool}, 127.0.0.0/8 }} accept')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def host_rules(p: Plumbing) -> str:
    """The nft script run on the host: the VM's own table, replaced atomically."""
    veth, t = p.veth, p.table
    lines = [
        f"table inet {t} {{}}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    dnat = [
        f"    {_daddr(m.host)}tcp dport {m.host_port} dnat ip to {p.ns_ip}:{m.guest_port}" for m in p.ports
    ]
    lines += dnat
    lines += [
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        *dnat,
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{veth}" ip saddr 127.0.0.0/8 masquerade',
    ]
    if p.egress:
        lines.append(f'    ip saddr {p.ns_ip} oifname != "{PREFIX}*" masquerade')
    lines += [
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname "{veth}" ct state established,related accept',
        f'    iifname "{veth}" drop',  # the VM never reaches the host's own addresses
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{veth}" oifname "{PREFIX}*" drop',  # nor another VM
        f'    iifname "{veth}" ct state established,related accept',
    ]
    if not p.egress:
        lines.append(f'    iifname "{veth}" drop')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _daddr(host: str) -> str:
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        return "fib daddr type local "
    return f"ip daddr {addr} "


# ---- the host ---------------------------------------------------------------------------------------


def host_problems() -> list[str]:
    """What this host lacks for bridge networking (empty: nothing), each naming what is missing."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, veth, TAP and nft rules need it)")
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables"), ("sysctl", "procps")):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` (apt-get install {pkg})")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (the tun kernel module)")
    return missing


async def run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> tuple[int, str]:
    """Run one argv (never a shell) with a deadline; returns (exit code, output). ``check``: a non-zero
    exit raises :class:`VmmError` with the command and its output."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        raise VmmError(f"network: cannot run {argv[0]}: {exc.strerror or exc}") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), CMD_TIMEOUT)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    text = out.decode(errors="replace")
    code = proc.returncode if proc.returncode is not None else -1
    if check and code != 0:
        raise VmmError(f"network: `{' '.join(argv)}` failed", exit_code=code, log_tail=text[-1000:])
    return code, text


async def namespaces() -> set[str]:
    """Names of the host's network namespaces."""
    _, out = await run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in out.splitlines() if line.strip()}


async def _link_exists(name: str, ns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", ns] if ns else []) + ["link", "show", "dev", name]
    code, _ = await run(argv, check=False)
    return code == 0


def _write_sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError as exc:
        raise VmmError(f"network: cannot set {path}: {exc.strerror or exc}") from exc


async def _ns_usable(ns: str) -> bool:
    """Whether the name ``ns`` opens a namespace here: ``ip netns add`` bind-mounts the namespace on
    /run/netns/<ns> in the mount namespace it runs in, so an operator that ran in a mount namespace of
    its own (``ip netns exec``, systemd's private mounts) leaves only an empty file to the next one."""
    code, _ = await run(["ip", "-n", ns, "link", "show", "dev", "lo"], check=False)
    return code == 0


def pid_netns(pid: int | str) -> int | None:
    """The inode of the network namespace ``pid`` is in (``/proc/<pid>/ns/net``; ``"self"``: this
    process); ``None`` when that process is gone or not ours to look at."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def stale_name_commands(ns: str, inside_pid: int | None, pid_ns: int | None, own_ns: int | None) -> list[list[str]]:
    """What replaces the name ``ns`` that no longer opens the VM's namespace (see :func:`_ns_usable`):
    it is removed and, when ``inside_pid`` (the re-adopted VMM) is in a namespace (``pid_ns``) other
    than the operator's own (``own_ns``), attached to that process's namespace again. Otherwise (no pid
    known, the process gone, or a pid now naming a process of the host's namespace: a reused pid, whose
    namespace must never get the VM's rules) nothing is attached and the namespace is made afresh."""
    cmds = [["ip", "netns", "del", ns]]  # the stale name (its mount is in another mount namespace)
    if inside_pid is not None and pid_ns is not None and pid_ns != own_ns:
        cmds.append(["ip", "netns", "attach", ns, str(inside_pid)])
    return cmds


async def ensure(p: Plumbing, *, inside_pid: int | None = None) -> None:
    """Make ``p`` exist and be exactly as generated (idempotent: reconciliation re-runs it).
    ``inside_pid``: a process in the VM's namespace (the re-adopted VMM): a name that no longer opens
    the namespace (see :func:`_ns_usable`) is attached to that process's namespace again
    (:func:`stale_name_commands`, with the namespaces :func:`pid_netns` reads)."""
    have_ns = p.ns in await namespaces()
    if have_ns and not await _ns_usable(p.ns):
        cmds = stale_name_commands(p.ns, inside_pid, pid_netns(inside_pid) if inside_pid is not None else None,
                                   pid_netns("self"))
        log.warning("network namespace %s: its name no longer opens it here; %s", p.ns,
                    f"re-attached from pid {inside_pid}" if len(cmds) > 1 else "made afresh")
        for argv in cmds:
            await run(argv)
        have_ns = len(cmds) > 1
    have_veth = await _link_exists(p.veth)
    if have_ns and not have_veth and await _link_exists(NS_VETH, p.ns):
        await run(["ip", "-n", p.ns, "link", "del", NS_VETH])  # half a pair: start it afresh
    have_tap = have_ns and await _link_exists(TAP, p.ns)
    for argv in setup_commands(p, have_ns=have_ns, have_veth=have_veth, have_tap=have_tap):
        await run(argv)
    if p.loopback_publish:  # a loopback client DNAT'ed out of the veth (then masqueraded)
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{p.veth}/route_localnet", "1")
    if p.needs_forwarding:
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    await run(["ip", "netns", "exec", p.ns, "nft", "-f", "-"], stdin=ns_rules(p))
    await run(["nft", "-f", "-"], stdin=host_rules(p))


async def live_egress(vm_id: str) -> bool | None:
    """Whether the rules now in the VM's namespace let the guest out (``None``: no table to read).
    For a VM whose egress policy predates its record in the store (schema 3)."""
    code, out = await run(["ip", "netns", "exec", ns_name(vm_id), "nft", "list", "table", "inet", NS_TABLE],
                          check=False)
    if code != 0:
        return None
    return f'iifname "{TAP}" oifname "{NS_VETH}"' in out


async def teardown(vm_id: str) -> None:
    """Remove the VM's host table, veth pair and namespace (its TAP goes with it). Idempotent; call it
    once the VMM is gone (a process still inside keeps the namespace alive until it exits)."""
    table = host_table(vm_id)
    code, _ = await run(["nft", "list", "table", "inet", table], check=False)
    if code == 0:
        await run(["nft", "delete", "table", "inet", table])
    if await _link_exists(host_veth(vm_id)):
        await run(["ip", "link", "del", host_veth(vm_id)])
    if ns_name(vm_id) in await namespaces():
        await run(["ip", "netns", "del", ns_name(vm_id)])
