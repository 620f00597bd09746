"""Job 8 `create_vm_with_config` end to end on a real anvil with the dev contract: the customer client
encodes its `string[]` keys and `uint16[]` ports, the operator (in-memory provider, MICROVM_NETWORK=user)
publishes the ports, and the query API shows them; hostile calls fail naming the field and change nothing."""

from __future__ import annotations

from typing import Any

import pytest

from microvm_blueprint.blueprint.client import Outcome, encode_job_args
from microvm_blueprint.blueprint.jobs import JOBS_BY_NAME
from microvm_blueprint.tangle.devnet import Anvil, deploy_dev_tangle

from .conftest import Harness, HarnessFactory, api_get

pytestmark = pytest.mark.chain

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFNGMa6e5RyWvtnugA0FwZ1M6BZasAb9bkLLhGTcR/y3 test@example"
JOB8 = JOBS_BY_NAME["create_vm_with_config"]
NETWORK = {"MICROVM_NETWORK": "user", "MICROVM_PORT_RANGE": "42000-42999"}


async def job8(h: Harness, api_url: str, *args: Any) -> tuple[int, Outcome]:
    """Submit job 8 with the arguments as the CLI gives them (strings, lists of strings)."""
    sub = await h.customer.submit(JOB8, encode_job_args(JOB8, [a if isinstance(a, list) else str(a) for a in args]))
    return sub.call_id, await h.customer.wait_result(sub, timeout=60, api_url=api_url)


def _ports_in_range(network: dict[str, Any], guest_ports: list[int]) -> list[int]:
    """The host ports of ``network``, after checking it is exactly these guest ports on 127.0.0.1."""
    assert network["mode"] == "user" and network["guest_ip"] == "10.0.2.15", network
    assert [p["guest_port"] for p in network["ports"]] == guest_ports, network
    assert all(p["host"] == "127.0.0.1" and 42000 <= p["host_port"] <= 42999 for p in network["ports"]), network
    hosts = [p["host_port"] for p in network["ports"]]
    assert len(set(hosts)) == len(hosts), network
    return hosts


async def test_job_8_publishes_ports_and_the_query_api_shows_them(anvil: Anvil, harness_for: HarnessFactory) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    op = await h.start_operator(settings_env=NETWORK)
    _, created = await job8(h, op.api_url, "vm-1", 2, 512, 1024, "", [KEY], ["8080", "22"])
    assert created.result is True, created
    status, vm = await api_get(f"{op.api_url}/vms/vm-1")
    assert status == 200 and vm["status"] == "created"
    assert vm["spec"] == {"vcpus": 2, "mem_mib": 512, "image": "default", "disk_mib": 1024, "ssh_keys": 1,
                          "ports": [22, 8080]}
    hosts = _ports_in_range(vm["network"], [22, 8080])
    assert (await h.job("start_vm", "vm-1")).result is True
    _, running = await api_get(f"{op.api_url}/vms/vm-1")
    assert running["status"] == "running" and running["network"] == vm["network"]  # the same ports from create on
    _, listed = await api_get(f"{op.api_url}/vms")
    assert [v["network"] for v in listed] == [vm["network"]]

    # keys without ports: guest port 22 is published for them; another VM never shares a host port
    _, second = await job8(h, op.api_url, "vm-2", 1, 256, 0, "", [KEY], [])
    assert second.result is True
    _, vm2 = await api_get(f"{op.api_url}/vms/vm-2")
    assert "disk_mib" not in vm2["spec"] and "ports" not in vm2["spec"]
    [ssh_port] = _ports_in_range(vm2["network"], [22])
    assert ssh_port not in hosts


async def test_hostile_job_8_calls_fail_naming_the_field_and_change_nothing(
    anvil: Anvil, harness_for: HarnessFactory
) -> None:
    h = await harness_for(await deploy_dev_tangle(anvil.rpc_url))
    op = await h.start_operator(settings_env=NETWORK)
    assert (await job8(h, op.api_url, "vm-1", 1, 256, 0, "", [KEY], ["22"]))[1].result is True
    _, before = await api_get(f"{op.api_url}/vms")
    cases = [
        (["vm-bad", 1, 256, 0, "", [KEY], [str(p) for p in range(1000, 1017)]],
         "ports has 17 entries, more than the maximum of 16"),
        (["vm-bad", 1, 256, 0, "", ["ssh-ed25519 " + "A" * 9 * 1024], ["22"]],
         "ssh_authorized_keys[0] is 9228 bytes, more than the maximum of 8192"),
        (["vm-bad", 1, 256, 0, "", [KEY, KEY + "\n" + KEY], ["22"]],
         "ssh_authorized_keys[1] must be a single line"),
        (["vm-bad", 1, 256, 0, "", [], ["22", "0"]], "ports[1] 0 is not a port number (1-65535)"),
    ]
    failed: list[int] = []
    for args, error in cases:
        call_id, outcome = await job8(h, op.api_url, *args)
        assert outcome.result is None, args
        status, body = await api_get(f"{op.api_url}/jobs/{call_id}")
        assert status == 200 and body["status"] == "failed" and body["job"] == "create_vm_with_config", body
        assert body["error"] == error
        failed.append(call_id)
    _, after = await api_get(f"{op.api_url}/vms")
    assert after == before
    assert (await api_get(f"{op.api_url}/vms/vm-bad"))[0] == 404
    assert set(failed).isdisjoint(await h.customer.results(0))  # failures are never written on-chain
    # and the service still serves job 8, never handing out vm-1's host port again
    assert (await job8(h, op.api_url, "vm-2", 1, 256, 0, "", [], ["22"]))[1].result is True
    _, vm2 = await api_get(f"{op.api_url}/vms/vm-2")
    [taken] = [p["host_port"] for p in before[0]["network"]["ports"]]
    assert [p["host_port"] for p in vm2["network"]["ports"]] != [taken]
