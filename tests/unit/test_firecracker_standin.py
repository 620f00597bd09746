"""The Firecracker stand-in must itself refuse what Firecracker refuses (so driver tests mean something)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..fakes.firecracker_support import STAND_IN


@pytest.fixture
def api(tmp_path: Path, shared: Path) -> Iterator[tuple[httpx.Client, Path, subprocess.Popen[bytes]]]:
    sock = tmp_path / "fc.sock"
    proc = subprocess.Popen([sys.executable, str(STAND_IN), "--api-sock", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "stand-in did not start"
        time.sleep(0.02)
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "d").write_bytes(b"d")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=5)
    yield client, tmp_path, proc
    client.close()
    proc.kill()
    proc.wait()


def fault(r: httpx.Response) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    return str(r.json()["fault_message"])


def boot(c: httpx.Client, tmp: Path) -> None:
    assert c.put("/boot-source", json={"kernel_image_path": str(tmp / "k")}).status_code == 204
    assert c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128}).status_code == 204
    assert c.put("/drives/rootfs", json={"drive_id": "rootfs", "path_on_host": str(tmp / "d"),
                                          "is_root_device": True}).status_code == 204
    assert c.put("/actions", json={"action_type": "InstanceStart"}).status_code == 204


def test_schema_is_enforced(api) -> None:  # type: ignore[no-untyped-def]
    c, _tmp, _ = api
    assert "Invalid request method and/or path" in fault(c.put("/nowhere", json={}))
    assert "Invalid request method and/or path" in fault(c.delete("/vm"))
    assert "invalid body" in fault(c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128, "x": 1}))
    assert "invalid body" in fault(c.put("/machine-config", json={"vcpu_count": "two", "mem_size_mib": 128}))
    assert "invalid body" in fault(c.put("/machine-config", json={"vcpu_count": 1}))
    assert "invalid body" in fault(c.put("/actions", json={"action_type": "Explode"}))
    assert "invalid body" in fault(c.patch("/vm", json={"state": "Sleeping"}))
    assert "deserializing" in fault(c.put("/logger", content=b"{not json", headers={"content-type": "application/json"}))
    assert c.get("/").json()["state"] == "Not started"


def test_state_rules(api) -> None:  # type: ignore[no-untyped-def]
    c, tmp, _ = api
    assert "before starting" in fault(c.patch("/vm", json={"state": "Paused"}))
    assert "without kernel" in fault(c.put("/actions", json={"action_type": "InstanceStart"}))
    boot(c, tmp)
    assert c.get("/").json()["state"] == "Running"
    assert "after starting" in fault(c.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 256}))
    assert "after starting" in fault(c.put("/actions", json={"action_type": "InstanceStart"}))
    snap = {"snapshot_path": str(tmp / "s"), "mem_file_path": str(tmp / "m")}
    assert "not paused" in fault(c.put("/snapshot/create", json=snap))
    assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
    assert c.put("/snapshot/create", json=snap).status_code == 204
    assert "not allowed" in fault(c.put("/snapshot/load", json={"snapshot_path": str(tmp / "s")}))


def test_load_only_on_a_fresh_process_and_a_failed_load_kills_it(api) -> None:  # type: ignore[no-untyped-def]
    c, tmp, proc = api
    assert c.put("/logger", json={"log_path": str(tmp / "log")}).status_code == 204  # allowed before a load
    assert "Load snapshot error" in fault(c.put("/snapshot/load", json={"snapshot_path": str(tmp / "missing")}))
    deadline = time.monotonic() + 10
    while proc.poll() is None:
        assert time.monotonic() < deadline, "a failed load must end the process"
        time.sleep(0.05)
    assert proc.returncode != 0


def test_config_before_load_is_refused(api) -> None:  # type: ignore[no-untyped-def]
    c, tmp, _ = api
    assert c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128}).status_code == 204
    assert "not allowed" in fault(c.put("/snapshot/load", json={"snapshot_path": str(tmp / "s")}))


