"""``MICROVM_NETWORK=bridge`` with Firecracker (issue #15 item 2, DESIGN.md §10), against the stand-in.

The real lifecycle makes each VM's namespace ``mvm-<hash>`` with its TAP ``tap0`` (``runtime/netns.py``,
root, ``ip`` and ``nft``); the driver runs the stand-in inside it (``ip netns exec``, or the jailer's
``--netns``) and sends ``PUT /network-interfaces/eth0`` before ``InstanceStart``. The stand-in checks
every body against the spec, attaches to the TAP by name in the namespace it runs in (as Firecracker
does: a TAP that is not there, or that another process holds, is refused) and journals, per process,
its interfaces and its namespace (``/proc/self/ns/net``) at every step: the tests compare that with the
inode of ``/var/run/netns/<ns>``. Pool 10.202.0.0/16 (the QEMU bridge tests use 10.201.0.0/16).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from microvm_blueprint.blueprint.operator import build_provider
from microvm_blueprint.blueprint.settings import OperatorSettings
from microvm_blueprint.runtime import netns
from microvm_blueprint.runtime.adapters.firecracker import FirecrackerApi, FirecrackerDriver
from microvm_blueprint.runtime.adapters.firecracker.driver import GUEST_MAC, _instance_id
from microvm_blueprint.runtime.errors import VmmApiError, VmmError
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import (
    NetworkMode,
    NetworkSettings,
    Origin,
    VmNetwork,
    VmRecord,
    VmSpec,
    VmStatus,
    fs_name,
)
from microvm_blueprint.runtime.store import Store

from ..fakes.firecracker_api import JAILER_RECORD
from ..fakes.firecracker_support import (
    JOURNAL,
    STAND_IN,
    config_drive_problems,
    fake_jailer,
    journal,
    kill_stand_ins,
    short_socket_dir,
    stand_in_settings,
)
from ..waiting import until

POOL = "10.202.0.0/16"
ANON = Origin()
ETH0 = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC}


@pytest.fixture
async def host(shared: Path) -> AsyncIterator[None]:
    missing = netns.host_problems()
    if missing:
        pytest.skip("bridge networking needs " + "; ".join(missing))
    _, used = await netns.run(["ip", "-4", "-o", "addr"])
    if " 10.202." in used:
        pytest.skip("10.202.0.0/16 is in use on this machine (another Firecracker bridge test running?)")
    yield


@pytest.fixture
def chroot_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="jb-"))  # short: the API socket lives under it
    yield base
    shutil.rmtree(base, ignore_errors=True)


def ns_inode(vm_id: str) -> str:
    """What ``readlink /proc/self/ns/net`` says inside the VM's namespace."""
    return f"net:[{os.stat(f'/var/run/netns/{netns.ns_name(vm_id)}').st_ino}]"


def user_name(uid: int) -> str:
    """How ``ip -d link`` names a TAP's owner: the user's name if it has one, else the number."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def leftovers(vm_ids: list[str]) -> list[str]:
    """Anything of these VMs' networks still on the host: namespaces, links, nft tables."""
    seen = namespaces()
    seen += subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    seen += subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    return [v for v in vm_ids if netns.vm_key(v) in seen]


def bridge_life(driver: FirecrackerDriver, tmp: Path) -> Lifecycle:
    return Lifecycle(driver, Store(tmp / "s.sqlite3"), state_dir=tmp / "state",
                     network=NetworkSettings(mode=NetworkMode.BRIDGE, bridge_pool=POOL))


def by_instance(entries: dict[int, list[dict[str, Any]]]) -> dict[str, list[list[dict[str, Any]]]]:
    """Journal lines per Firecracker instance id (a VM's folder name), one list per process."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for lines in entries.values():
        out.setdefault(lines[0]["id"], []).append(lines)
    return out


def instance(life: Lifecycle, vm_id: str) -> str:
    return _instance_id(life.vms_dir / fs_name(vm_id))


async def close_all(life: Lifecycle, vm_ids: list[str], marker: str) -> None:
    await life.close(stop_vms=True)
    for v in vm_ids:
        await netns.teardown(v)
    assert kill_stand_ins(marker) == [], "stand-in processes were left running"


async def test_bridge_vms_and_a_clone_each_run_in_their_own_namespace_with_eth0_on_its_tap(
        host: None, tmp_path: Path) -> None:
    driver = FirecrackerDriver(stand_in_settings(tmp_path / "fc"))
    life = bridge_life(driver, tmp_path)
    vm_ids = ["fb-a", "fb-b", "fb-c"]
    try:
        await life.create_vm("fb-a", VmSpec(ports=(8080,)), ANON)
        await life.create_vm("fb-b", VmSpec(), ANON)
        for v in ("fb-a", "fb-b"):
            assert (await life.start_vm(v, ANON)).status is VmStatus.RUNNING
        assert (await life.get_vm("fb-a")).to_json()["network"]["mode"] == "bridge"
        await life.snapshot_vm("fb-a", "s1", ANON)
        assert (await life.restore_vm("fb-a", "s1", "fb-c", ANON)).status is VmStatus.RUNNING

        # every VMM runs in its VM's namespace, and each VM has a namespace of its own
        inodes = {v: ns_inode(v) for v in vm_ids}
        assert len(set(inodes.values())) == 3
        for v in vm_ids:
            vm = life.store.get_vm(v)
            assert vm is not None and vm.handle is not None and vm.handle.pid
            assert os.readlink(f"/proc/{vm.handle.pid}/ns/net") == inodes[v], v

        # the stand-ins' own account: eth0 on tap0 before InstanceStart, inside the namespace
        seen = by_instance(journal(tmp_path / "fc" / JOURNAL))
        for v in ("fb-a", "fb-b"):
            [lines] = seen[instance(life, v)]
            events = [e["event"] for e in lines]
            assert events.count("start") == 1 and events.count("net") == 1, events
            assert events.index("net") < events.index("start"), events
            start = lines[events.index("start")]
            assert start["nets"] == [ETH0], start["nets"]
            assert config_drive_problems(start["drives"]) == [], start["drives"]
            assert {e["netns"] for e in lines} == {inodes[v]}, (v, lines)
        # the clone: its saved eth0 (tap0, no override needed) re-opened at the load, in its own namespace
        [clone] = seen[instance(life, "fb-c")]
        clone_events = [e["event"] for e in clone]
        assert clone_events[0] == "load" and "start" not in clone_events and "net" not in clone_events, clone_events
        assert clone[0]["nets"] == [ETH0]
        assert {e["netns"] for e in clone} == {inodes["fb-c"]} != {inodes["fb-a"]}

        # each TAP is held by its VM's VMM: a second one in A's namespace is refused it
        assert await second_vmm_tap_fault(tmp_path, "fb-a") == "in use by another process"

        # a live snapshot with a NIC cannot come back without a namespace (the load would open tap0)
        snap = life.store.get_snapshot("fb-a", "s1")
        assert snap is not None
        none_vm = VmRecord("fb-x", VmStatus.RUNNING, VmSpec(), str(tmp_path / "x"), network=VmNetwork())
        Path(none_vm.workdir).mkdir()
        with pytest.raises(VmmError, match="was taken with a network interface"):
            await driver.restore(none_vm, snap)

        # destroy leaves no namespace, link or rule of any VM
        assert leftovers(vm_ids) == vm_ids
        for v in vm_ids:
            assert (await life.destroy_vm(v, ANON)).status is VmStatus.DESTROYED
        assert leftovers(vm_ids) == []
        assert not any(netns.ns_name(v) in namespaces() for v in vm_ids)
        assert life.store.bridge_slots() == {}
    finally:
        await close_all(life, vm_ids, driver.settings.socket_dir)


@contextlib.asynccontextmanager
async def raw_stand_in(tmp: Path, name: str, prefix: list[str]) -> AsyncIterator[FirecrackerApi]:
    """One more stand-in (argv after ``prefix``), outside any lifecycle; killed and reaped after."""
    sock = Path(short_socket_dir(tmp / name)) / f"{name}.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp / f"{name}.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(*prefix, sys.executable, str(STAND_IN), "--api-sock", str(sock),
                                                    "--id", name, stdout=log, stderr=asyncio.subprocess.STDOUT)
    api = FirecrackerApi(str(sock), 5000)
    try:
        await until(lambda: sock.exists() or proc.returncode is not None, 15, f"the {name} stand-in's socket")
        assert proc.returncode is None, (tmp / f"{name}.log").read_text()
        yield api
    finally:
        await api.aclose()
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def second_vmm_tap_fault(tmp: Path, vm_id: str) -> str:
    """Start one more stand-in inside ``vm_id``'s namespace and ask it for tap0: the fault it answers."""
    async with raw_stand_in(tmp, "probe", netns.exec_prefix(vm_id)) as api:
        with pytest.raises(VmmApiError) as caught:
            await api.call("PUT", "/network-interfaces/eth0", ETH0)
    return "in use by another process" if "in use by another process" in str(caught.value) else str(caught.value)


async def test_the_stand_in_refuses_a_tap_its_namespace_does_not_have(host: None, tmp_path: Path) -> None:
    """Outside a VM's namespace there is no tap0: what a Firecracker not run inside it would get (so the
    checks above can fail)."""
    tap = f"fbt{os.getpid() % 100000}"
    async with raw_stand_in(tmp_path, "root", []) as api:
        with pytest.raises(VmmApiError, match=f"no device {tap} in network namespace"):
            await api.call("PUT", "/network-interfaces/eth0", {**ETH0, "host_dev_name": tap})
        with pytest.raises(VmmApiError, match="Invalid MAC"):
            await api.call("PUT", "/network-interfaces/eth0", {**ETH0, "guest_mac": "not-a-mac"})
        with pytest.raises(VmmApiError, match="deserializing the json body"):  # the spec's closed schema
            await api.call("PUT", "/network-interfaces/eth0", {**ETH0, "tap": "tap0"})
        code, _ = await netns.run(["ip", "link", "show", "dev", tap], check=False)
        assert code != 0, f"the stand-in made a TAP {tap}"  # it opens TAPs, never creates one


async def test_bridge_under_the_jailer_joins_the_namespace_with_netns(
        host: None, tmp_path: Path, chroot_base: Path) -> None:
    settings = stand_in_settings(tmp_path / "fc", jailer=str(fake_jailer(tmp_path / "bin")),
                                 chroot_base=str(chroot_base), jailer_uid=999, jailer_gid=995)
    driver = FirecrackerDriver(settings)
    # as the operator builds it: each TAP belongs to its VM's own jailer user (a uid of MICROVM_VMM_UID_RANGE),
    # who opens it without privileges
    env = {"MICROVM_PROVIDER": "firecracker", "MICROVM_NETWORK": "bridge", "MICROVM_BRIDGE_POOL": POOL}
    life = build_provider(OperatorSettings.from_env(env, tmp_path / "data"), driver)
    vm_ids = ["fj-a", "fj-c"]
    try:
        await life.create_vm("fj-a", VmSpec(), ANON)
        uid = life.store.vmm_uid("fj-a")
        assert uid is not None and uid not in (999, 995)
        _, tap = await netns.run(["ip", "-n", netns.ns_name("fj-a"), "-d", "link", "show", "dev", "tap0"])
        assert f"user {user_name(uid)} group {group_name(uid)}" in tap, tap
        await life.start_vm("fj-a", ANON)
        await life.snapshot_vm("fj-a", "s1", ANON)
        await life.restore_vm("fj-a", "s1", "fj-c", ANON)
        seen = by_instance(journal(tmp_path / "fc" / JOURNAL))
        for v in vm_ids:
            jail = chroot_base / "firecracker" / instance(life, v)
            record = json.loads((jail / JAILER_RECORD).read_text())
            argv = record["argv"]
            assert argv[argv.index("--netns") + 1] == f"/var/run/netns/{netns.ns_name(v)}"
            assert argv.index("--netns") < argv.index("--")  # the jailer's flag, not Firecracker's
            assert record["netns"] == ns_inode(v)
            own = str(life.store.vmm_uid(v))  # the jailer runs each VM's Firecracker as that VM's own uid/gid
            assert (argv[argv.index("--uid") + 1], argv[argv.index("--gid") + 1]) == (own, own)
            [lines] = seen[instance(life, v)]
            assert {e["netns"] for e in lines} == {ns_inode(v)}
        [a] = seen[instance(life, "fj-a")]
        events = [e["event"] for e in a]
        assert events.index("net") < events.index("start") and a[events.index("start")]["nets"] == [ETH0]
        assert seen[instance(life, "fj-c")][0][0]["nets"] == [ETH0]
        for v in vm_ids:
            await life.destroy_vm(v, ANON)
        assert leftovers(vm_ids) == []
    finally:
        await close_all(life, vm_ids, driver.settings.socket_dir)
        with contextlib.suppress(OSError):
            shutil.rmtree(chroot_base)


async def test_a_restart_under_another_egress_setting_keeps_each_vms_own_policy(host: None, tmp_path: Path) -> None:
    """Issue #15 follow-up: the egress policy is recorded with the VM. An operator restarted with
    ``MICROVM_EGRESS=deny`` re-makes a re-adopted VM's rules with the ``allow`` it was created under (it
    neither closes nor, the other way round, opens a running VM's egress); a new VM gets ``deny``. A VM
    whose row predates the record (schema 2) gets the policy its live rules show."""
    def life_with(driver: FirecrackerDriver, egress: bool) -> Lifecycle:
        return Lifecycle(driver, Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state",
                         network=NetworkSettings(mode=NetworkMode.BRIDGE, bridge_pool=POOL, egress=egress))

    async def ns_rules(vm_id: str) -> str:
        _, out = await netns.run(["ip", "netns", "exec", netns.ns_name(vm_id), "nft", "list", "ruleset"])
        return out

    async def host_table(vm_id: str) -> str:
        _, out = await netns.run(["nft", "list", "table", "inet", netns.host_table(vm_id)])
        return out

    egress_rule = 'iifname "tap0" oifname "veth0" ip daddr != { 10.202.0.0/16, 127.0.0.0/8 } accept'
    vm_ids = ["fe-open", "fe-legacy", "fe-new"]
    first = FirecrackerDriver(stand_in_settings(tmp_path / "fc"))
    life = life_with(first, egress=True)
    second: FirecrackerDriver | None = None
    try:
        await life.create_vm("fe-open", VmSpec(), ANON)
        await life.start_vm("fe-open", ANON)
        await life.create_vm("fe-legacy", VmSpec(), ANON)
        assert egress_rule in await ns_rules("fe-open")  # the test can tell allow from deny
        assert (await life.get_vm("fe-open")).to_json()["network"]["egress"] == "allow"
        await life.close()  # the VMM keeps running, as after an operator restart
        life.store.close()
        with sqlite3.connect(tmp_path / "s.sqlite3") as conn:  # as a row from before schema 3 would be
            conn.execute("UPDATE networks SET egress=NULL WHERE vm_id='fe-legacy'")
        # a rule lost while the operator was down: reconciliation must re-make the table, not keep it
        await netns.run(["ip", "netns", "exec", netns.ns_name("fe-open"), "nft", "delete", "table", "inet", "mvm"])

        second = FirecrackerDriver(stand_in_settings(tmp_path / "fc"))
        life = life_with(second, egress=False)
        assert "2 vm(s) re-adopted" in await life.reconcile()
        rebuilt = await ns_rules("fe-open")
        assert egress_rule in rebuilt, rebuilt
        assert 'oifname != "mvm*" masquerade' in await host_table("fe-open")
        assert (await life.get_vm("fe-open")).to_json()["network"]["egress"] == "allow"
        assert egress_rule in await ns_rules("fe-legacy")  # read from its live rules, then recorded
        assert (await life.get_vm("fe-legacy")).to_json()["network"]["egress"] == "allow"
        assert life.store.unrecorded_egress() == set()

        await life.create_vm("fe-new", VmSpec(), ANON)
        fresh = await ns_rules("fe-new")
        assert 'iifname "tap0" oifname "veth0"' not in fresh and "chain forward" in fresh, fresh
        assert 'oifname != "mvm*" masquerade' not in await host_table("fe-new")
        assert (await life.get_vm("fe-new")).to_json()["network"]["egress"] == "deny"
    finally:
        await close_all(life, vm_ids, first.settings.socket_dir)
