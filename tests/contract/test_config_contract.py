"""Job 8's inputs (DESIGN.md §8) as executable rules, run against every provider: the spec it records,
the host ports it publishes (own ports for every VM and every clone, released at destroy), and every
validation error, each of which changes nothing."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import socket

import pytest

from microvm_blueprint.runtime.errors import InvalidInput, QuotaExceeded
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import NetworkMode, Origin, VmSpec, VmStatus

from .conftest import PORT_RANGE

_calls = itertools.count(50_000)


def o() -> Origin:
    return Origin(call_id=next(_calls), caller="0x00000000000000000000000000000000000000c1")


def key(kind: str = "ssh-ed25519", comment: str = "test@host") -> str:
    blob = len(kind).to_bytes(4, "big") + kind.encode() + (32).to_bytes(4, "big") + bytes(range(32))
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


def publishes(p: Lifecycle) -> bool:
    return p.network.mode is not NetworkMode.NONE


async def test_a_configured_vm_records_its_spec_and_network(provider: Lifecycle) -> None:
    ports = (8080,) if publishes(provider) else ()
    spec = VmSpec(vcpus=1, mem_mib=256, disk_mib=0, ssh_keys=(key(),), ports=ports)
    view = await provider.create_vm("cfg", spec, o())
    body = view.to_json()
    assert body["spec"]["ssh_keys"] == 1  # counted, not listed
    assert body["network"]["mode"] == provider.network.mode.value
    if publishes(provider):
        assert body["network"]["guest_ip"] == "10.0.2.15"
        guest = [m["guest_port"] for m in body["network"]["ports"]]
        assert guest == [22, 8080]  # keys given: 22 is published with what was asked
        hosts = [m["host_port"] for m in body["network"]["ports"]]
        assert len(set(hosts)) == 2 and all(PORT_RANGE[0] <= h <= PORT_RANGE[1] for h in hosts)
        assert {m["host"] for m in body["network"]["ports"]} == {"127.0.0.1"}
    else:
        assert body["network"] == {"mode": "none", "guest_ip": None, "ports": [], "egress": "deny"}
    again = await provider.get_vm("cfg")
    assert again.network == view.network and again.spec.ssh_keys == (key(),)


async def test_ports_without_a_network_are_refused_and_change_nothing(provider: Lifecycle) -> None:
    if publishes(provider):
        pytest.skip("this provider's network publishes ports")
    with pytest.raises(InvalidInput, match="ports cannot be published: this operator runs with MICROVM_NETWORK=none"):
        await provider.create_vm("p", VmSpec(ports=(80,)), o())
    assert await provider.list_vms() == []


async def test_a_clone_publishes_the_same_guest_ports_on_its_own_host_ports(provider: Lifecycle) -> None:
    if not publishes(provider):
        pytest.skip("no published ports with MICROVM_NETWORK=none")
    src = await provider.create_vm("src", VmSpec(ports=(80, 443)), o())
    await provider.snapshot_vm("src", "s", o())
    clone = await provider.restore_vm("src", "s", "clone", o())
    assert [m.guest_port for m in clone.network.ports] == [80, 443]
    assert not {m.host_port for m in clone.network.ports} & {m.host_port for m in src.network.ports}
    gone = await provider.destroy_vm("src", o())
    assert gone.status is VmStatus.DESTROYED and gone.network.ports == ()  # released
    assert (await provider.get_vm("clone")).network == clone.network  # the clone keeps its own


async def test_destroy_frees_the_ports_for_the_next_vm(provider: Lifecycle) -> None:
    if not publishes(provider):
        pytest.skip("no published ports with MICROVM_NETWORK=none")
    only = free_port()
    provider.network = dataclasses.replace(provider.network, port_range=(only, only))  # room for one port
    first = await provider.create_vm("a", VmSpec(ports=(80,)), o())
    assert [m.host_port for m in first.network.ports] == [only]
    with pytest.raises(QuotaExceeded, match=f"no free host port left in {only}-{only}"):
        await provider.create_vm("b", VmSpec(ports=(80,)), o())
    assert [v.vm_id for v in await provider.list_vms()] == ["a"]  # the refused create left nothing
    await provider.destroy_vm("a", o())
    second = await provider.create_vm("b", VmSpec(ports=(80,)), o())
    assert [m.host_port for m in second.network.ports] == [only]
    assert (await provider.get_vm("a")).network.ports == ()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BAD = [
    (VmSpec(ssh_keys=(key() + "\n" + key(),)), "ssh_authorized_keys[0] must be a single line"),
    (VmSpec(ssh_keys=("ssh-ed25519 " + "A" * 9 * 1024,)), "ssh_authorized_keys[0] is 9228 bytes, more than the maximum of 8192"),
    (VmSpec(ssh_keys=(key("ssh-dss"),)), "ssh_authorized_keys[0] has an unknown key type"),
    (VmSpec(ssh_keys=(key(comment="a\0b"),)), "ssh_authorized_keys[0] contains a NUL character"),
    (VmSpec(ssh_keys=(key(),) * 17), "ssh_authorized_keys has 17 keys, more than the maximum of 16"),
    (VmSpec(ports=tuple(range(1, 18))), "ports has 17 entries, more than the maximum of 16"),
    (VmSpec(ports=(0,)), "ports[0] 0 is not a port number (1-65535)"),
    (VmSpec(ports=(80, 80)), "ports[1] 80 is listed twice"),
    (VmSpec(disk_mib=-1), "disk_mib must not be negative"),
]


@pytest.mark.parametrize(("spec", "error"), BAD, ids=[e.split(" ")[0] + str(i) for i, (_, e) in enumerate(BAD)])
async def test_every_bad_input_names_its_field_and_changes_nothing(
    provider: Lifecycle, spec: VmSpec, error: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        await provider.create_vm("bad", spec, o())
    assert str(err.value).startswith(error), str(err.value)
    assert await provider.list_vms() == []
    assert provider.store.network("bad").ports == ()
