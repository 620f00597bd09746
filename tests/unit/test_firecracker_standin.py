"""The Firecracker stand-in must itself refuse what Firecracker refuses (so driver tests mean something)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from microvm_blueprint.runtime import images
from microvm_blueprint.runtime.configdrive import GuestConfig, build_config_drive

from ..fakes.firecracker_support import (
    STAND_IN,
    config_drive_problems,
    final_drives,
    instance_id,
    kill_stand_ins,
    short_socket_dir,
    stand_ins,
)

PROJECT_ROOTFS = b"\0" * 1000 + images.ROOT_INIT.format(ready=images.READY_LINE).encode()


@dataclass
class Api:
    c: httpx.Client
    tmp: Path
    proc: subprocess.Popen[bytes]
    out: Path

    def fault(self, r: httpx.Response, status: int = 400) -> str:
        assert r.status_code == status, (r.status_code, r.text)
        return str(r.json()["fault_message"])

    def state(self) -> str:
        return str(self.c.get("/").json()["state"])

    def boot(self, boot_args: str = "console=ttyS0") -> None:
        ok(self.c.put("/boot-source", json={"kernel_image_path": str(self.tmp / "k"), "boot_args": boot_args}))
        ok(self.c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128}))
        ok(self.c.put("/drives/rootfs", json={"drive_id": "rootfs", "path_on_host": str(self.tmp / "d"),
                                               "is_root_device": True, "is_read_only": False}))
        ok(self.c.put("/actions", json={"action_type": "InstanceStart"}))

    def snap(self) -> dict[str, str]:
        return {"snapshot_path": str(self.tmp / "state"), "mem_file_path": str(self.tmp / "mem")}


def ok(r: httpx.Response) -> None:
    assert r.status_code == 204, (r.status_code, r.text)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    return proc.wait(timeout)


def start(tmp: Path, name: str = "fc", *extra: str) -> Api:
    sock = Path(short_socket_dir(tmp)) / f"{name}.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{name}.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(STAND_IN), "--api-sock", str(sock), "--id", "test-vm", *extra],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, "stand-in did not start"
        time.sleep(0.02)
    (tmp / "k").write_bytes(b"k")
    (tmp / "d").write_bytes(PROJECT_ROOTFS)  # this project's image unless a test says otherwise
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=5)
    return Api(client, tmp, proc, out)


@pytest.fixture
def api(tmp_path: Path, shared: Path) -> Iterator[Api]:
    a = start(tmp_path)
    yield a
    a.c.close()
    if a.proc.poll() is None:
        a.proc.kill()
    a.proc.wait()
    assert kill_stand_ins(str(tmp_path)) == [], "a stand-in process was left running"


def test_routes_come_from_the_shared_spec(api: Api, shared: Path) -> None:
    """The spec is read from ../shared at run time; a path it lacks is refused."""
    import yaml

    spec = yaml.safe_load((shared / "firecracker" / "firecracker.yaml").read_text())
    assert {"/", "/actions", "/snapshot/load", "/vm"} <= set(spec["paths"])
    assert "Invalid request method and/or path" in api.fault(api.c.get("/not-in-the-spec"))


def test_unknown_path_or_method(api: Api) -> None:
    assert "Invalid request method and/or path: PUT /nowhere" in api.fault(api.c.put("/nowhere", json={}))
    assert "Invalid request method and/or path: DELETE /vm" in api.fault(api.c.delete("/vm"))
    assert "Invalid request method and/or path" in api.fault(api.c.get("/vm"))  # /vm has only PATCH
    assert "Invalid request method and/or path" in api.fault(api.c.put("/drives", json={}))


def test_unknown_fields_are_refused(api: Api) -> None:
    f = api.fault(api.c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}))
    assert "bogus" in f and "Additional properties" in f
    f = api.fault(api.c.put("/snapshot/load", json={"snapshot_path": "s", "mem_backend": {
        "backend_type": "File", "backend_path": "m", "extra": True}}))
    assert "mem_backend" in f and "extra" in f  # nested objects are closed too
    assert api.state() == "Not started"


def test_wrong_types_and_enums_are_refused(api: Api) -> None:
    assert "'two' is not of type 'integer'" in api.fault(
        api.c.put("/machine-config", json={"vcpu_count": "two", "mem_size_mib": 128}))
    assert "is not of type 'boolean'" in api.fault(api.c.put("/drives/rootfs", json={
        "drive_id": "rootfs", "is_root_device": "yes"}))
    assert "is greater than the maximum" in api.fault(
        api.c.put("/machine-config", json={"vcpu_count": 33, "mem_size_mib": 128}))
    assert "'Explode' is not one of" in api.fault(api.c.put("/actions", json={"action_type": "Explode"}))
    assert "'Sleeping' is not one of" in api.fault(api.c.patch("/vm", json={"state": "Sleeping"}))
    assert "is not of type 'object'" in api.fault(api.c.put("/actions", json=["InstanceStart"]))


def test_missing_required_fields_and_bodies_are_refused(api: Api) -> None:
    assert "'mem_size_mib' is a required property" in api.fault(api.c.put("/machine-config", json={"vcpu_count": 1}))
    assert "'kernel_image_path' is a required property" in api.fault(api.c.put("/boot-source", json={}))
    assert "'action_type' is a required property" in api.fault(api.c.put("/actions", json={}))
    assert "body is missing" in api.fault(api.c.put("/actions"))
    assert "takes no body" in api.fault(api.c.request("GET", "/", json={"x": 1}))
    assert "deserializing" in api.fault(
        api.c.put("/logger", content=b"{not json", headers={"content-type": "application/json"}))


def test_instance_info_and_vm_config_follow_the_spec(api: Api) -> None:
    info = api.c.get("/").json()
    assert set(info) == {"app_name", "id", "state", "vmm_version"}
    assert (info["id"], info["state"]) == ("test-vm", "Not started")
    api.boot()
    cfg = api.c.get("/vm/config").json()
    assert cfg["drives"][0]["drive_id"] == "rootfs" and cfg["machine-config"]["mem_size_mib"] == 128
    assert api.c.get("/version").json() == {"firecracker_version": "1.12.1"}


def test_configuration_only_before_start_and_start_only_once(api: Api) -> None:
    assert "without kernel configuration" in api.fault(api.c.put("/actions", json={"action_type": "InstanceStart"}))
    api.boot()
    assert api.state() == "Running"
    after = "not supported after starting"
    assert after in api.fault(api.c.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 256}))
    assert after in api.fault(api.c.put("/boot-source", json={"kernel_image_path": str(api.tmp / "k")}))
    assert after in api.fault(api.c.put("/drives/data", json={"drive_id": "data", "path_on_host": str(api.tmp / "d"),
                                                                "is_root_device": False, "is_read_only": True}))
    assert after in api.fault(api.c.put("/network-interfaces/eth0", json={"iface_id": "eth0", "host_dev_name": "t"}))
    assert after in api.fault(api.c.put("/actions", json={"action_type": "InstanceStart"}))


def test_drive_rules(api: Api) -> None:
    d = {"drive_id": "rootfs", "path_on_host": str(api.tmp / "d"), "is_root_device": True, "is_read_only": False}
    assert "does not match" in api.fault(api.c.put("/drives/other", json=d))
    assert "Unable to open drive file" in api.fault(api.c.put("/drives/rootfs", json={**d, "path_on_host": "/nope"}))
    ok(api.c.put("/drives/rootfs", json=d))
    assert "root block device already exists" in api.fault(api.c.put("/drives/b", json={**d, "drive_id": "b"}))
    assert "before starting" in api.fault(api.c.patch("/drives/rootfs", json={"drive_id": "rootfs"}))


def test_the_journal_records_the_drives_and_what_a_guest_finds_on_them(tmp_path: Path, shared: Path) -> None:
    journal = tmp_path / "drives.jsonl"
    a = start(tmp_path, "fc", "--fake-journal", str(journal))
    try:
        first = build_config_drive(GuestConfig.make("i-first", "host-a"), tmp_path / "cidata.img")
        second = build_config_drive(GuestConfig.make("i-second", "host-a"), tmp_path / "cidata2.img")
        (tmp_path / "plain").write_bytes(b"\0" * 4096)
        root = {"drive_id": "rootfs", "path_on_host": str(tmp_path / "d"), "is_root_device": True, "is_read_only": False}
        ok(a.c.put("/drives/rootfs", json=root))
        cidata = {"drive_id": "cidata", "path_on_host": str(first), "is_root_device": False, "is_read_only": True}
        ok(a.c.put("/drives/cidata", json=cidata))
        assert "Unable to open drive file" in a.fault(a.c.put("/drives/x", json={**cidata, "drive_id": "x",
                                                                                   "path_on_host": "/nope"}))
        ok(a.c.put("/boot-source", json={"kernel_image_path": str(tmp_path / "k")}))
        ok(a.c.put("/actions", json={"action_type": "InstanceStart"}))
        ok(a.c.patch("/drives/cidata", json={"drive_id": "cidata", "path_on_host": str(second)}))
        lines = [json.loads(line) for line in journal.read_text().splitlines()]
        assert [(x["pid"], x["event"]) for x in lines] == ([(a.proc.pid, "put")] * 2 + [(a.proc.pid, "start")]
                                                           + [(a.proc.pid, "patch")])
        assert {x["netns"] for x in lines} == {os.readlink("/proc/self/ns/net")} and lines[2]["nets"] == []
        assert "found" not in lines[0]["drives"][0]  # the root drive is not read
        assert instance_id(lines[1]["drives"][1]["found"]["meta-data"]) == "i-first"
        drives = final_drives(journal)[a.proc.pid]
        assert drives == lines[-1]["drives"] and config_drive_problems(drives) == []
        assert drives[1]["found"]["fat_label"] == "CIDATA" and instance_id(drives[1]["found"]["meta-data"]) == "i-second"
        assert config_drive_problems([drives[0]]) == ["drives are ['rootfs'], not ['rootfs', 'cidata']"]
        plain = {**drives[1], "path_on_host": str(tmp_path / "plain"), "found": {"fat_label": None}}
        assert config_drive_problems([drives[0], plain]) == ["cidata's FAT label is None: {'fat_label': None}"]
        writable = {**drives[1], "is_read_only": False}
        assert config_drive_problems([drives[0], writable])[0].startswith("cidata is not a read-only non-root drive")
    finally:
        a.c.close()
        a.proc.kill()
        a.proc.wait()


def test_pause_resume_only_after_boot(api: Api) -> None:
    before = "not supported before starting"
    assert before in api.fault(api.c.patch("/vm", json={"state": "Paused"}))
    assert before in api.fault(api.c.patch("/vm", json={"state": "Resumed"}))
    api.boot()
    ok(api.c.patch("/vm", json={"state": "Paused"}))
    assert api.state() == "Paused"
    ok(api.c.patch("/vm", json={"state": "Resumed"}))
    assert api.state() == "Running"


def test_snapshot_create_only_while_paused(api: Api) -> None:
    assert "not paused" in api.fault(api.c.put("/snapshot/create", json=api.snap()))  # not started
    api.boot()
    assert "not paused" in api.fault(api.c.put("/snapshot/create", json=api.snap()))  # running
    ok(api.c.patch("/vm", json={"state": "Paused"}))
    assert "dirty page tracking" in api.fault(api.c.put("/snapshot/create", json={**api.snap(), "snapshot_type": "Diff"}))
    ok(api.c.put("/snapshot/create", json={**api.snap(), "snapshot_type": "Full"}))
    state = json.loads((api.tmp / "state").read_text())
    assert state["machine-config"]["mem_size_mib"] == 128 and "rootfs" in state["drives"]
    assert (api.tmp / "mem").stat().st_size == 128 * 1024


def test_load_refused_after_configuration_and_after_start(api: Api, tmp_path: Path) -> None:
    api.boot()
    ok(api.c.patch("/vm", json={"state": "Paused"}))
    ok(api.c.put("/snapshot/create", json=api.snap()))
    load = {"snapshot_path": str(tmp_path / "state"), "mem_backend": {"backend_type": "File",
                                                                       "backend_path": str(tmp_path / "mem")}}
    assert "not allowed after configuring" in api.fault(api.c.put("/snapshot/load", json=load))  # started
    fresh = start(tmp_path / "b", "b")
    try:
        ok(fresh.c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128}))
        assert "not allowed after configuring" in fresh.fault(fresh.c.put("/snapshot/load", json=load))
        assert fresh.proc.poll() is None  # a refused (not attempted) load leaves the process alone
    finally:
        fresh.c.close()
        fresh.proc.kill()
        fresh.proc.wait()


def test_load_on_a_fresh_process_then_rules_of_a_loaded_vm(api: Api, tmp_path: Path) -> None:
    api.boot()
    ok(api.c.patch("/vm", json={"state": "Paused"}))
    ok(api.c.put("/snapshot/create", json=api.snap()))
    fresh = start(tmp_path / "b", "b")
    try:
        (tmp_path / "log").write_text("")
        ok(fresh.c.put("/logger", json={"log_path": str(tmp_path / "log"), "level": "Info"}))  # allowed first
        both = {"snapshot_path": str(tmp_path / "state"), "mem_file_path": str(tmp_path / "mem"),
                "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "mem")}}
        assert "Exactly one" in fresh.fault(fresh.c.put("/snapshot/load", json=both))
        del both["mem_file_path"]
        ok(fresh.c.put("/snapshot/load", json={**both, "resume_vm": False}))
        assert fresh.state() == "Paused"
        assert "not supported after starting" in fresh.fault(fresh.c.put("/actions", json={"action_type": "InstanceStart"}))
        assert "not supported after starting" in fresh.fault(
            fresh.c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128}))
        assert "not allowed after" in fresh.fault(fresh.c.put("/snapshot/load", json=both))
        (tmp_path / "d2").write_bytes(b"d")
        ok(fresh.c.patch("/drives/rootfs", json={"drive_id": "rootfs", "path_on_host": str(tmp_path / "d2")}))
        assert "Invalid block device ID" in fresh.fault(fresh.c.patch("/drives/x", json={"drive_id": "x"}))
        ok(fresh.c.patch("/vm", json={"state": "Resumed"}))
        assert fresh.state() == "Running"
    finally:
        fresh.c.close()
        fresh.proc.kill()
        fresh.proc.wait()


@pytest.mark.parametrize("broken", ["missing state", "missing memory", "missing disk", "wrong memory"])
def test_a_failed_load_kills_the_process(api: Api, tmp_path: Path, broken: str) -> None:
    api.boot()
    ok(api.c.patch("/vm", json={"state": "Paused"}))
    ok(api.c.put("/snapshot/create", json=api.snap()))
    api.c.close()
    api.proc.kill()
    api.proc.wait()
    if broken == "wrong memory":
        (tmp_path / "mem").write_bytes(b"short")
    else:
        (tmp_path / {"missing state": "state", "missing memory": "mem", "missing disk": "d"}[broken]).unlink()
    fresh = start(tmp_path / "b", "b")
    try:
        load = {"snapshot_path": str(tmp_path / "state"),
                "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "mem")}}
        assert "Load snapshot error" in fresh.fault(fresh.c.put("/snapshot/load", json=load))
        assert wait_exit(fresh.proc) == 1  # a failed load ends the process
    finally:
        fresh.c.close()
        if fresh.proc.poll() is None:
            fresh.proc.kill()
        fresh.proc.wait()


def test_console_output_needs_console_on_ttys0(tmp_path: Path, shared: Path) -> None:
    with_console, without = start(tmp_path, "a"), start(tmp_path, "b")
    try:
        with_console.boot("console=ttyS0 quiet")
        without.boot("quiet")
        deadline = time.monotonic() + 10
        while "tick 2" not in with_console.out.read_text():
            assert time.monotonic() < deadline, with_console.out.read_text()
            time.sleep(0.05)
        assert "MICROVM-READY" in with_console.out.read_text()
        assert "MICROVM-READY" not in without.out.read_text() and "tick" not in without.out.read_text()
    finally:
        for a in (with_console, without):
            a.c.close()
            a.proc.kill()
            a.proc.wait()
    assert stand_ins(str(tmp_path)) == []


def test_a_stock_rootfs_boots_to_a_login_prompt_not_the_ready_line(tmp_path: Path, shared: Path) -> None:
    """A guest prints what its rootfs's init prints: a stock distribution image, a kernel transcript
    (none with ``quiet``) and a login prompt; never MICROVM-READY, never ticks."""
    loud, quiet, project = start(tmp_path, "a"), start(tmp_path / "q", "q"), start(tmp_path / "p", "p")
    try:
        for a in (loud, quiet):
            (a.tmp / "d").write_bytes(b"\0" * 4096 + b"/lib/systemd/systemd\0")
        loud.boot("console=ttyS0 reboot=k panic=1")
        quiet.boot("console=ttyS0 quiet")
        project.boot("console=ttyS0 quiet")  # this project's image, as a clock for the others
        deadline = time.monotonic() + 10
        while not all("localhost login: " in a.out.read_text() for a in (loud, quiet)):
            assert time.monotonic() < deadline, (loud.out.read_text(), quiet.out.read_text())
            time.sleep(0.05)
        assert "Linux version" in loud.out.read_text() and "Run /sbin/init as init process" in loud.out.read_text()
        assert "Linux version" not in quiet.out.read_text()
        while "tick 2" not in project.out.read_text():  # a project guest booted as early has ticked twice
            assert time.monotonic() < deadline, project.out.read_text()
            time.sleep(0.05)
        for a in (loud, quiet):
            text = a.out.read_text()
            assert "MICROVM-READY" not in text and "tick" not in text, text
        ok(loud.c.patch("/vm", json={"state": "Paused"}))  # a snapshot keeps the kind of guest
        ok(loud.c.put("/snapshot/create", json=loud.snap()))
        assert json.loads((loud.tmp / "state").read_text())["guest"] == "stock"
    finally:
        for a in (loud, quiet, project):
            a.c.close()
            a.proc.kill()
            a.proc.wait()
    assert stand_ins(str(tmp_path)) == []


def test_bad_instance_id_is_refused_at_start(tmp_path: Path) -> None:
    sock = Path(short_socket_dir(tmp_path)) / "x.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(STAND_IN), "--api-sock", str(sock), "--id", "bad id!"],
                          capture_output=True, timeout=30)
    assert done.returncode == 1 and b"Invalid instance ID" in done.stderr
    done = subprocess.run([sys.executable, str(STAND_IN), "--api-sock", str(sock), "--no-such-flag"],
                          capture_output=True, timeout=30)
    assert done.returncode == 2  # unknown flags are refused, as Firecracker refuses them
