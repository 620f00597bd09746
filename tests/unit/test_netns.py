"""Bridge networking (DESIGN.md §10, issue #15): names, addresses, generated commands and nft rules, the
store's /30 pool, the settings' checks; and, as root, the real objects made and removed (no VMM)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.settings import ProviderKind, parse_network
from microvm_blueprint.envparse import Env
from microvm_blueprint.errors import ConfigError
from microvm_blueprint.runtime import netns
from microvm_blueprint.runtime.adapters.qemu.argv import network_args
from microvm_blueprint.runtime.errors import QuotaExceeded
from microvm_blueprint.runtime.model import NetworkMode, PortMapping, VmNetwork
from microvm_blueprint.runtime.netns import Plumbing
from microvm_blueprint.runtime.store import Store

from ..waiting import until

PORTS = (PortMapping(22, "127.0.0.1", 40022), PortMapping(80, "127.0.0.1", 40080))


def _root_with_tools() -> str | None:
    missing = netns.host_problems()
    return "; ".join(missing) if missing else None


def test_names_are_derived_from_the_id_and_fit_the_kernel_limits() -> None:
    key = netns.vm_key("vm-a")
    assert len(key) == 12 and key == netns.vm_key("vm-a") != netns.vm_key("vm-b")
    assert netns.ns_name("vm-a") == f"mvm-{key}" == netns.host_table("vm-a")
    assert netns.host_veth("vm-a") == f"mvm{key}" and len(netns.host_veth("vm-a")) == 15
    assert netns.exec_prefix("vm-a") == ["ip", "netns", "exec", f"mvm-{key}"]
    assert netns.ns_name("x" * 256).startswith("mvm-") and len(netns.ns_name("\u00e9" * 100)) == 16


def test_each_slot_is_its_own_30_of_the_pool() -> None:
    p0 = Plumbing("a", "10.201.0.0/16", 0)
    p3 = Plumbing("a", "10.201.0.0/16", 3)
    assert (p0.host_ip, p0.ns_ip) == ("10.201.0.1", "10.201.0.2")
    assert (p3.host_ip, p3.ns_ip, str(p3.subnet)) == ("10.201.0.13", "10.201.0.14", "10.201.0.12/30")
    assert netns.slot_count(netns.parse_pool("10.201.0.0/16")) == 16384
    with pytest.raises(Exception, match="outside MICROVM_BRIDGE_POOL"):
        _ = Plumbing("a", "10.201.0.0/29", 2).subnet


@pytest.mark.parametrize(("raw", "why"), [
    ("10.201.0.0/30", "at least two /30"),
    ("172.16.0.0/12", "must not overlap"),
    ("10.201.0.1/16", "host bits"),
    ("nonsense", "octets"),
])
def test_a_bad_pool_is_refused_with_the_reason(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        netns.parse_pool(raw)


def test_setup_skips_what_exists_and_never_remakes_a_tap() -> None:
    p = Plumbing("vm", "10.201.0.0/16", 1)
    full = netns.setup_commands(p, have_ns=False, have_veth=False, have_tap=False)
    assert full[0] == ["ip", "netns", "add", p.ns]
    assert ["ip", "link", "add", p.veth, "type", "veth", "peer", "name", "veth0", "netns", p.ns] in full
    assert ["ip", "-n", p.ns, "tuntap", "add", "dev", "tap0", "mode", "tap"] in full
    assert ["ip", "-n", p.ns, "addr", "replace", "172.16.0.1/30", "dev", "tap0"] in full
    assert ["ip", "-n", p.ns, "route", "replace", "default", "via", "10.201.0.5", "dev", "veth0"] in full
    again = netns.setup_commands(p, have_ns=True, have_veth=True, have_tap=True)
    assert not any(c[:3] == ["ip", "netns", "add"] or "tuntap" in c or c[1:3] == ["link", "add"] for c in again)
    assert all(isinstance(a, str) for c in full for a in c)  # argv lists, never a shell string


def test_namespace_rules_nat_the_guest_and_deny_egress_by_default() -> None:
    deny = netns.ns_rules(Plumbing("vm", "10.201.0.0/16", 0, PORTS))
    assert deny.startswith("table inet mvm {}\ndelete table inet mvm\n")  # replaced atomically
    assert 'iifname "veth0" ip daddr 10.201.0.2 tcp dport { 22, 80 } dnat ip to 172.16.0.2' in deny
    assert 'oifname "veth0" ip saddr 172.16.0.2 masquerade' in deny
    assert 'iifname "tap0" drop' in deny and "policy drop" in deny
    assert 'iifname "tap0" oifname "veth0"' not in deny
    allow = netns.ns_rules(Plumbing("vm", "10.201.0.0/16", 0, PORTS, egress=True))
    assert 'iifname "tap0" oifname "veth0" ip daddr != { 10.201.0.0/16, 127.0.0.0/8 } accept' in allow


def test_host_rules_publish_ports_and_keep_the_vm_off_the_host_and_other_vms() -> None:
    p = Plumbing("vm", "10.201.0.0/16", 2, PORTS)
    rules = netns.host_rules(p)
    assert rules.startswith(f"table inet {p.table} {{}}\ndelete table inet {p.table}\n")
    assert rules.count("ip daddr 127.0.0.1 tcp dport 40022 dnat ip to 10.201.0.10:22") == 2  # prerouting + output
    assert f'iifname "{p.veth}" drop' in rules.split("chain input")[1].split("chain forward")[0]
    fwd = rules.split("chain forward")[1]
    assert f'iifname "{p.veth}" oifname "mvm*" drop' in fwd and f'iifname "{p.veth}" drop' in fwd
    assert "masquerade" in rules and f'ip saddr {p.ns_ip} oifname != "mvm*" masquerade' not in rules
    allow = netns.host_rules(Plumbing("vm", "10.201.0.0/16", 2, PORTS, egress=True))
    assert f'ip saddr {p.ns_ip} oifname != "mvm*" masquerade' in allow
    assert f'iifname "{p.veth}" drop' not in allow.split("chain forward")[1]
    anywhere = netns.host_rules(Plumbing("vm", "10.201.0.0/16", 2, (PortMapping(22, "0.0.0.0", 40022),)))
    assert "fib daddr type local tcp dport 40022 dnat ip to 10.201.0.10:22" in anywhere
    assert p.loopback_publish and not p.needs_forwarding


@pytest.mark.parametrize("egress", [False, True])
def test_nft_accepts_the_generated_rules(egress: bool) -> None:
    reason = _root_with_tools()
    if reason:
        pytest.skip(reason)
    p = Plumbing("check-only", "10.201.0.0/16", 7, PORTS, egress=egress)
    for script in (netns.host_rules(p), netns.ns_rules(p)):  # -c: checked by the kernel, nothing applied
        done = subprocess.run(["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True, timeout=30,
                              check=False)
        assert done.returncode == 0, done.stderr + script


def test_qemu_gets_the_namespace_tap() -> None:
    assert network_args(VmNetwork(NetworkMode.BRIDGE, PORTS)) == [
        "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no", "-device", "virtio-net-device,netdev=net0"]


def test_a_user_mode_nic_gets_the_egress_policy_recorded_with_the_vm() -> None:
    """``restrict=`` follows the VM's recorded policy (``VmNetwork.egress``), not a driver setting: a VM
    created under ``MICROVM_EGRESS=allow`` keeps its egress whatever the operator now runs with."""
    def restrict(egress: bool) -> list[str]:
        [opts] = [a for a in network_args(VmNetwork(NetworkMode.USER, PORTS, egress=egress)) if a.startswith("user,")]
        return [o for o in opts.split(",") if o.startswith("restrict=")]

    assert restrict(True) == ["restrict=off"]
    assert restrict(False) == ["restrict=on"]


def test_the_store_hands_out_each_30_once_and_takes_it_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    pool = "10.201.0.0/29"
    assert store.take_bridge_slot("a", pool, 2) == 0
    assert store.take_bridge_slot("b", pool, 2) == 1
    assert store.take_bridge_slot("a", pool, 2) == 0  # the one it holds
    with pytest.raises(QuotaExceeded, match="no free /30"):
        store.take_bridge_slot("c", pool, 2)
    store.release_bridge_slot("a")
    assert store.take_bridge_slot("c", pool, 2) == 0
    store.close()
    again = Store(tmp_path / "s.sqlite3")
    assert again.bridge_slots() == {"b": (pool, 1), "c": (pool, 0)}


def test_settings_enable_bridge_or_name_what_the_host_lacks() -> None:
    env = Env({"MICROVM_NETWORK": "bridge", "MICROVM_BRIDGE_POOL": "10.9.0.0/24"})
    ok = parse_network(env, ProviderKind.QEMU, host_problems=list)
    assert ok.mode is NetworkMode.BRIDGE and ok.bridge_pool == "10.9.0.0/24"
    with pytest.raises(ConfigError, match=r"bridge needs root .*; `nft` \(apt-get install nftables\)"):
        parse_network(env, ProviderKind.QEMU,
                      host_problems=lambda: ["root (network namespaces ...)", "`nft` (apt-get install nftables)"])
    with pytest.raises(ConfigError, match=re.escape("MICROVM_BRIDGE_POOL='10.9.0.0/31'")):
        parse_network(Env({"MICROVM_BRIDGE_POOL": "10.9.0.0/31"}), ProviderKind.QEMU, host_problems=list)
    fc = parse_network(env, ProviderKind.FIRECRACKER, host_problems=list)  # TAP in a namespace: Firecracker too
    assert fc.mode is NetworkMode.BRIDGE and fc.bridge_pool == "10.9.0.0/24"
    with pytest.raises(ConfigError, match=r"bridge needs root"):
        parse_network(env, ProviderKind.FIRECRACKER, host_problems=lambda: ["root (network namespaces ...)"])
    with pytest.raises(ConfigError, match="user is not possible with Firecracker"):
        parse_network(Env({"MICROVM_NETWORK": "user"}), ProviderKind.FIRECRACKER, host_problems=list)
    if os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "nft", "sysctl")):
        assert netns.host_problems() == [] or netns.host_problems() == ["/dev/net/tun (the tun kernel module)"]


def test_ensure_makes_everything_again_and_again_and_teardown_leaves_nothing() -> None:
    reason = _root_with_tools()
    if reason:
        pytest.skip(reason)
    vm_id = f"unit-netns-{os.getpid()}"
    p = Plumbing(vm_id, "10.201.0.0/16", 16000, PORTS)

    def state() -> tuple[bool, bool, bool, bool]:
        ns = p.ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        veth = subprocess.run(["ip", "link", "show", "dev", p.veth], capture_output=True, check=False).returncode == 0
        table = p.table in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
        tap = ns and subprocess.run(["ip", "-n", p.ns, "link", "show", "dev", "tap0"], capture_output=True,
                                    check=False).returncode == 0
        return ns, veth, tap, table

    async def go() -> None:
        try:
            await netns.ensure(p)
            assert state() == (True, True, True, True)
            await netns.ensure(p)  # idempotent: what reconciliation re-runs
            await netns.run(["nft", "delete", "table", "inet", p.table])  # a rule lost: re-made
            await netns.ensure(p)
            assert state() == (True, True, True, True)
            _, addrs = await netns.run(["ip", "-n", p.ns, "-4", "-o", "addr"])
            assert f"{p.ns_ip}/30" in addrs and "172.16.0.1/30" in addrs
        finally:
            await netns.teardown(vm_id)
        assert state() == (False, False, False, False)
        await netns.teardown(vm_id)  # again: nothing to do, no error

    asyncio.run(go())


def test_a_stale_name_is_reattached_only_to_a_vmm_in_a_namespace_of_its_own() -> None:
    """The re-attach branch of :func:`netns.ensure` (a restarted operator whose namespace name no longer
    opens the VM's namespace), without root: what replaces the stale name."""
    ns = "mvm-0123456789ab"
    remove = ["ip", "netns", "del", ns]
    assert netns.stale_name_commands(ns, 4242, 7001, 4026531840) == [remove, ["ip", "netns", "attach", ns, "4242"]]
    assert netns.stale_name_commands(ns, None, None, 4026531840) == [remove]  # no pid known: made afresh
    assert netns.stale_name_commands(ns, 4242, None, 4026531840) == [remove]  # the VMM is gone
    # a pid that now names a process of the operator's own namespace (reused): never given the VM's rules
    assert netns.stale_name_commands(ns, 4242, 4026531840, 4026531840) == [remove]


def test_pid_netns_reads_a_process_namespace_or_none() -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    assert netns.pid_netns("self") == own == netns.pid_netns(os.getpid())
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert netns.pid_netns(pid_max + 1) is None  # no such process


def test_ensure_reattaches_a_stale_name_from_the_vmm_pid_or_else_makes_the_namespace_afresh() -> None:
    """As root, for real: a name left by an operator that ran in another mount namespace (an empty file
    under /run/netns) is re-attached to the namespace of the process inside (what reconciliation passes:
    the re-adopted VMM's pid), and with no pid, or a pid of the host's namespace, made afresh."""
    reason = _root_with_tools()
    if reason or shutil.which("unshare") is None:
        pytest.skip(reason or "no unshare(1)")
    vm_id = f"unit-reattach-{os.getpid()}"
    p = Plumbing(vm_id, "10.201.0.0/16", 16001, PORTS)
    name = Path("/run/netns") / p.ns
    own = os.stat("/proc/self/ns/net").st_ino

    def stale() -> None:
        name.parent.mkdir(parents=True, exist_ok=True)
        name.touch()  # listed by `ip netns list`, opens nothing

    def named() -> int:
        return os.stat(name).st_ino  # a bind mount of a namespace: its inode

    async def go(vmm: subprocess.Popen[bytes]) -> None:
        await until(lambda: netns.pid_netns(vmm.pid) not in (None, own), 10, "the stand-in VMM in its namespace")
        try:
            stale()
            assert not await netns._ns_usable(p.ns)
            await netns.ensure(p, inside_pid=vmm.pid)
            assert named() == netns.pid_netns(vmm.pid)  # the VMM's own namespace, with its TAP and veth
            await netns.run(["ip", "-n", p.ns, "link", "show", "dev", "tap0"])
            await netns.run(["ip", "link", "show", "dev", p.veth])
            await netns.teardown(vm_id)
            for pid in (None, os.getpid()):  # no pid known; a pid of the host's namespace
                stale()
                await netns.ensure(p, inside_pid=pid)
                assert await netns._ns_usable(p.ns)
                assert named() not in (own, netns.pid_netns(vmm.pid)), pid
                await netns.teardown(vm_id)
        finally:
            await netns.teardown(vm_id)
            name.unlink(missing_ok=True)

    vmm = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    try:
        asyncio.run(go(vmm))
    finally:
        vmm.kill()
        vmm.wait(10)
    assert p.ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
