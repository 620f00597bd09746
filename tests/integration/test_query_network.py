"""The `network` object of the query API (DESIGN.md §8) over real HTTP, in-memory provider with user-mode
networking and real SQLite: published ports shown exactly, and every VM body valid against the served
OpenAPI document, with no field it does not document."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from microvm_blueprint.blueprint.journal import JobJournal
from microvm_blueprint.blueprint.query import QueryApp
from microvm_blueprint.blueprint.server import QueryServer
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import NetworkMode, NetworkSettings, Origin, VmSpec
from microvm_blueprint.runtime.store import Store

jsonschema = pytest.importorskip("jsonschema")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFNGMa6e5RyWvtnugA0FwZ1M6BZasAb9bkLLhGTcR/y3 test@example"


async def _serve(life: Lifecycle, tmp: Path) -> AsyncIterator[httpx.AsyncClient]:
    server = QueryServer(QueryApp(life, JobJournal(tmp / "jobs.sqlite3")), "127.0.0.1", 0)
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        yield http
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
async def life(tmp_path: Path) -> Lifecycle:
    # exactly three host ports, so which ones a VM gets is known without assuming the allocator's order
    network = NetworkSettings(mode=NetworkMode.USER, publish_addr="127.0.0.1", port_range=(43100, 43102))
    return Lifecycle(InMemoryDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state", network=network)


@pytest.fixture
async def http(life: Lifecycle, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _serve(life, tmp_path):
        yield client


async def test_published_ports_are_shown_exactly(life: Lifecycle, http: httpx.AsyncClient) -> None:
    created = await life.create_vm("web", VmSpec(vcpus=2, mem_mib=512, disk_mib=2048, ssh_keys=(KEY,),
                                                 ports=(8080, 22)), Origin(7, "0xc"))
    await life.start_vm("web", Origin(8, "0xc"))
    body = (await http.get("/vms/web")).json()
    assert body["spec"] == {"vcpus": 2, "mem_mib": 512, "image": "default", "disk_mib": 2048, "ssh_keys": 1,
                            "ports": [22, 8080]}
    network = body["network"]
    assert set(network) == {"mode", "guest_ip", "ports", "egress"}
    assert network["egress"] == "deny"  # the fixture's operator runs with MICROVM_EGRESS unset
    assert (network["mode"], network["guest_ip"]) == ("user", "10.0.2.15")
    assert [(p["guest_port"], p["host"]) for p in network["ports"]] == [(22, "127.0.0.1"), (8080, "127.0.0.1")]
    assert all(set(p) == {"guest_port", "host", "host_port"} for p in network["ports"])
    taken = {p["host_port"] for p in network["ports"]}
    assert len(taken) == 2 and taken <= {43100, 43101, 43102}
    assert network == created.network.to_json()  # what create reserved, unchanged by start
    # the list shows the same object; a second VM gets the one host port left
    other = await life.create_vm("other", VmSpec(ports=(5432,)), Origin())
    [left] = {43100, 43101, 43102} - taken
    listed = {v["vm_id"]: v["network"] for v in (await http.get("/vms")).json()}
    assert listed == {"web": network, "other": {"mode": "user", "guest_ip": "10.0.2.15",
                                               "ports": [{"guest_port": 5432, "host": "127.0.0.1", "host_port": left}],
                                               "egress": "deny"}}
    assert other.network.to_json() == listed["other"]
    # destroy gives the ports back: the VM lists none, and they can be taken again
    await life.destroy_vm("web", Origin())
    assert (await http.get("/vms/web")).json()["network"] == {"mode": "user", "guest_ip": "10.0.2.15", "ports": [],
                                                                  "egress": "deny"}
    again = await life.create_vm("again", VmSpec(ports=(22, 80)), Origin())
    assert {p.host_port for p in again.network.ports} == taken


def _strict(schema: Any) -> Any:
    """The OpenAPI 3.0 schema as JSON Schema (``nullable`` -> a null type), with no undocumented fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if k not in ("nullable", "description")}
    if schema.get("nullable"):
        out["type"] = [schema["type"], "null"]
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False
    return out


async def test_every_vm_body_matches_the_served_openapi_document(life: Lifecycle, http: httpx.AsyncClient,
                                                                 tmp_path: Path) -> None:
    doc = (await http.get("/openapi.json")).json()
    one = _strict(copy.deepcopy(doc["paths"]["/vms/{vm_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]))
    many = _strict(copy.deepcopy(doc["paths"]["/vms"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]))
    network = one["properties"]["network"]
    assert network["required"] == ["mode", "guest_ip", "ports", "egress"]
    assert network["properties"]["ports"]["items"]["required"] == ["guest_port", "host", "host_port"]
    await life.create_vm("keys", VmSpec(disk_mib=4096, ssh_keys=(KEY, KEY), ports=(80,)), Origin(1, "0xc"))
    await life.create_vm("plain", None, Origin())
    await life.start_vm("plain", Origin())
    await life.snapshot_vm("plain", "s1", Origin())
    await life.create_vm("gone", None, Origin())
    await life.destroy_vm("gone", Origin())
    bodies = [(await http.get(f"/vms/{vm}")).json() for vm in ("keys", "plain", "gone")]
    for body in bodies:
        jsonschema.validate(body, one)
    assert bodies[0]["spec"]["ssh_keys"] == 2 and [p["guest_port"] for p in bodies[0]["network"]["ports"]] == [22, 80]
    jsonschema.validate((await http.get("/vms")).json(), many)
    jsonschema.validate((await http.get("/vms", params={"limit": 2})).json(), many)
    # and a VM of an operator without networking: mode none, guest_ip null
    bare = Lifecycle(InMemoryDriver(), Store(tmp_path / "bare.sqlite3"), state_dir=tmp_path / "bare")
    await bare.create_vm("bare", None, Origin())
    async for client in _serve(bare, tmp_path):
        body = (await client.get("/vms/bare")).json()
    assert body["network"] == {"mode": "none", "guest_ip": None, "ports": [], "egress": "deny"}
    jsonschema.validate(body, one)
    # the schema can fail: an undocumented field or a null port is refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**body, "surprise": 1}, one)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**body, "network": {**body["network"], "ports": [{"guest_port": 22, "host": "h",
                                                                              "host_port": None}]}}, one)
