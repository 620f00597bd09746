"""DESIGN.md §5 as executable rules, run against every provider."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from microvm_blueprint.runtime.errors import (
    InvalidInput,
    InvalidTransition,
    RecordedFailure,
    SnapshotAlreadyExists,
    SnapshotNotFound,
    VmAlreadyExists,
    VmNotFound,
)
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus

from .conftest import SERVICE_OWNER

_calls = itertools.count(1000)


def o(caller: str = "0x00000000000000000000000000000000000000c1") -> Origin:
    return Origin(call_id=next(_calls), caller=caller)


async def bring_to(p: Lifecycle, vm_id: str, status: VmStatus) -> None:
    await p.create_vm(vm_id, None, o())
    if status in (VmStatus.RUNNING, VmStatus.STOPPED):
        await p.start_vm(vm_id, o())
    if status is VmStatus.STOPPED:
        await p.stop_vm(vm_id, o())
    if status is VmStatus.DESTROYED:
        await p.destroy_vm(vm_id, o())


ACTIONS = {
    "start": lambda p, v: p.start_vm(v, o()),
    "stop": lambda p, v: p.stop_vm(v, o()),
    "snapshot": lambda p, v: p.snapshot_vm(v, "snap", o()),
    "destroy": lambda p, v: p.destroy_vm(v, o()),
}

# (status, action) -> None when allowed, else the target word in the error text.
TABLE: dict[tuple[VmStatus, str], str | None] = {
    (VmStatus.CREATED, "start"): None,
    (VmStatus.CREATED, "stop"): "stopped",
    (VmStatus.CREATED, "snapshot"): None,
    (VmStatus.CREATED, "destroy"): None,
    (VmStatus.RUNNING, "start"): "running",
    (VmStatus.RUNNING, "stop"): None,
    (VmStatus.RUNNING, "snapshot"): None,
    (VmStatus.RUNNING, "destroy"): None,
    (VmStatus.STOPPED, "start"): None,
    (VmStatus.STOPPED, "stop"): "stopped",
    (VmStatus.STOPPED, "snapshot"): None,
    (VmStatus.STOPPED, "destroy"): None,
    (VmStatus.DESTROYED, "start"): "running",
    (VmStatus.DESTROYED, "stop"): "stopped",
    (VmStatus.DESTROYED, "snapshot"): "snapshot",
    (VmStatus.DESTROYED, "destroy"): "destroyed",
}

#: the table's cells in a stable order (sorted here, not inside parametrize, whose argument type would make
#: mypy infer the cells as ``object``)
CELLS = sorted(TABLE, key=lambda k: (k[0].value, k[1]))

EXPECTED_AFTER = {"start": VmStatus.RUNNING, "stop": VmStatus.STOPPED, "destroy": VmStatus.DESTROYED}


@pytest.mark.parametrize(("status", "action"), CELLS)
async def test_state_by_job_table(provider: Lifecycle, status: VmStatus, action: str) -> None:
    await bring_to(provider, "vm-t", status)
    before = await provider.get_vm("vm-t")
    forbidden = TABLE[(status, action)]
    if forbidden is None:
        await ACTIONS[action](provider, "vm-t")
        after = await provider.get_vm("vm-t")
        assert after.status is EXPECTED_AFTER.get(action, status)
        if action == "snapshot":
            assert after.snapshots == ("snap",)
    else:
        with pytest.raises(InvalidTransition) as err:
            await ACTIONS[action](provider, "vm-t")
        assert str(err.value) == f"invalid vm transition for 'vm-t': {status.value} -> {forbidden}"
        after = await provider.get_vm("vm-t")
        assert (after.status, after.snapshots) == (before.status, before.snapshots)
        assert len(after.history) == len(before.history)


async def test_failed_vm_only_allows_destroy(provider: Lifecycle) -> None:
    await bring_to(provider, "vm-f", VmStatus.RUNNING)
    provider._on_vmm_exit("vm-f", "killed by test")  # what a driver's watcher reports
    assert (await provider.get_vm("vm-f")).status is VmStatus.FAILED
    for action, word in (("start", "running"), ("stop", "stopped"), ("snapshot", "snapshot")):
        with pytest.raises(InvalidTransition, match=f"failed -> {word}$"):
            await ACTIONS[action](provider, "vm-f")
    await provider.destroy_vm("vm-f", o())
    assert (await provider.get_vm("vm-f")).status is VmStatus.DESTROYED


async def test_create_defaults_and_audit(provider: Lifecycle) -> None:
    view = await provider.create_vm("vm-a", None, Origin(call_id=7, caller="0xabc"))
    assert view.status is VmStatus.CREATED
    assert view.spec == VmSpec()
    assert [(h.action, h.call_id, h.caller) for h in view.history] == [("create", 7, "0xabc")]
    await provider.start_vm("vm-a", Origin(call_id=8, caller=SERVICE_OWNER))  # not the owner: the service owner
    hist = (await provider.get_vm("vm-a")).history
    assert [(h.action, h.status, h.call_id) for h in hist] == [
        ("create", VmStatus.CREATED, 7),
        ("start", VmStatus.RUNNING, 8),
    ]
    assert [h.caller for h in hist] == ["0xabc", SERVICE_OWNER]


async def test_already_exists_includes_tombstones(provider: Lifecycle) -> None:
    await bring_to(provider, "vm-x", VmStatus.DESTROYED)
    with pytest.raises(VmAlreadyExists, match=r"^vm 'vm-x' already exists$"):
        await provider.create_vm("vm-x", None, o())
    listed = [v.vm_id for v in await provider.list_vms()]
    assert listed == ["vm-x"]


@pytest.mark.parametrize("action", ["start", "stop", "snapshot", "destroy"])
async def test_not_found(provider: Lifecycle, action: str) -> None:
    with pytest.raises(VmNotFound, match=r"^vm 'ghost' not found$"):
        await ACTIONS[action](provider, "ghost")
    assert await provider.list_vms() == []


@pytest.mark.parametrize(
    ("vm_id", "message"),
    [
        ("", "vm_id must not be empty"),
        ("x" * 257, "vm_id exceeds maximum length of 256 bytes"),
        ("é" * 129, "vm_id exceeds maximum length of 256 bytes"),
        ("bad\nid", "vm_id contains control characters"),
        ("nul\x00", "vm_id contains control characters"),
        ("del\x7f", "vm_id contains control characters"),
    ],
)
async def test_id_rules(provider: Lifecycle, vm_id: str, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        await provider.create_vm(vm_id, None, o())
    assert str(err.value) == message
    assert await provider.list_vms() == []


@pytest.mark.parametrize("vm_id", ["x" * 256, "é" * 128, "../../etc/passwd", "/abs", ".", "..", "a/b\\c", "😀"])
async def test_tricky_ids_stay_inside_state_dir(provider: Lifecycle, vm_id: str) -> None:
    await provider.create_vm(vm_id, None, o())
    await provider.snapshot_vm(vm_id, "../" + vm_id[:50], o())
    state = provider.state_dir.resolve()
    for path in state.rglob("*"):
        assert path.resolve().is_relative_to(state)
        assert vm_id not in path.name or vm_id in {".", ".."}
    assert (await provider.get_vm(vm_id)).vm_id == vm_id


async def test_snapshot_names_and_errors(provider: Lifecycle) -> None:
    await bring_to(provider, "vm-s", VmStatus.RUNNING)
    await provider.snapshot_vm("vm-s", "one", o())
    await provider.snapshot_vm("vm-s", "two", o())
    with pytest.raises(SnapshotAlreadyExists, match=r"^snapshot 'one' already exists for vm 'vm-s'$"):
        await provider.snapshot_vm("vm-s", "one", o())
    assert (await provider.get_vm("vm-s")).snapshots == ("one", "two")
    snap = await provider.get_snapshot("vm-s", "two")
    assert snap.vm_status is VmStatus.RUNNING and snap.size_bytes > 0
    with pytest.raises(SnapshotNotFound, match=r"^snapshot 'nope' not found for vm 'vm-s'$"):
        await provider.get_snapshot("vm-s", "nope")
    await provider.delete_snapshot("vm-s", "one", o())
    assert [s.snapshot_id for s in await provider.list_snapshots("vm-s")] == ["two"]
    with pytest.raises(SnapshotNotFound):
        await provider.delete_snapshot("vm-s", "one", o())


@pytest.mark.parametrize("status", [VmStatus.CREATED, VmStatus.RUNNING, VmStatus.STOPPED])
async def test_restore_keeps_snapshot_status_and_outlives_destroy(provider: Lifecycle, status: VmStatus) -> None:
    await bring_to(provider, "src", status)
    await provider.snapshot_vm("src", "s", o())
    await provider.destroy_vm("src", o())
    assert (await provider.get_vm("src")).snapshots == ("s",)
    view = await provider.restore_vm("src", "s", "copy", o())
    assert view.status is status
    with pytest.raises(VmAlreadyExists, match=r"^vm 'copy' already exists$"):
        await provider.restore_vm("src", "s", "copy", o())
    with pytest.raises(SnapshotNotFound, match=r"^snapshot 'zz' not found for vm 'src'$"):
        await provider.restore_vm("src", "zz", "copy2", o())
    with pytest.raises(VmNotFound):
        await provider.restore_vm("nobody", "s", "copy3", o())
    assert {v.vm_id for v in await provider.list_vms()} == {"src", "copy"}


async def test_replayed_call_answers_the_recorded_outcome(provider: Lifecycle) -> None:
    first = Origin(call_id=42, caller="0x1")
    await provider.create_vm("vm-r", None, first)
    again = await provider.create_vm("vm-r", None, first)  # same call id: no "already exists"
    assert again.status is VmStatus.CREATED
    assert len((await provider.get_vm("vm-r")).history) == 1
    bad = Origin(call_id=43)
    with pytest.raises(InvalidTransition):
        await provider.stop_vm("vm-r", bad)
    with pytest.raises(RecordedFailure, match="created -> stopped"):
        await provider.stop_vm("vm-r", bad)


async def test_a_replayed_snapshot_succeeds_after_the_snapshot_is_deleted(provider: Lifecycle) -> None:
    await provider.create_vm("vm-d", None, Origin(call_id=60, caller="0xc"))  # 0xc owns it
    taken = await provider.snapshot_vm("vm-d", "s1", Origin(call_id=61, caller="0xc"))
    await provider.delete_snapshot("vm-d", "s1", Origin(call_id=62))
    again = await provider.snapshot_vm("vm-d", "s1", Origin(call_id=61, caller="0xc"))  # replay: still a success
    assert (again.snapshot_id, again.vm_status) == ("s1", taken.vm_status)
    assert again.created_at == pytest.approx(taken.created_at, abs=5)
    assert await provider.list_snapshots("vm-d") == []  # and nothing was taken again


async def test_spec_rules(provider: Lifecycle) -> None:
    with pytest.raises(InvalidInput, match="mem_mib must be at least 128"):
        await provider.create_vm("m", VmSpec(vcpus=1, mem_mib=64, image=""), o())
    with pytest.raises(InvalidInput, match="vcpus must be at least 1"):
        await provider.create_vm("m", VmSpec(vcpus=0, mem_mib=256, image=""), o())
    with pytest.raises(InvalidInput, match="exceeds host maximum"):
        await provider.create_vm("m", VmSpec(vcpus=1000, mem_mib=256, image=""), o())
    with pytest.raises(InvalidInput, match="image must be a name"):
        await provider.create_vm("m", VmSpec(vcpus=1, mem_mib=256, image="../x"), o())
    assert await provider.list_vms() == []
    view = await provider.create_vm("m", VmSpec(vcpus=2, mem_mib=128, image=""), o())
    assert view.spec == VmSpec(vcpus=2, mem_mib=128, image="default")


async def test_paging(provider: Lifecycle) -> None:
    for i in range(7):
        await provider.create_vm(f"vm-{i}", None, o())
    page = await provider.list_vms(limit=3)
    assert [v.vm_id for v in page] == ["vm-0", "vm-1", "vm-2"]
    page = await provider.list_vms(limit=3, after="vm-2")
    assert [v.vm_id for v in page] == ["vm-3", "vm-4", "vm-5"]
    assert [v.vm_id for v in await provider.list_vms(after="vm-5")] == ["vm-6"]


async def test_state_survives_restart(provider: Lifecycle, tmp_path: Path) -> None:
    await bring_to(provider, "keep", VmStatus.STOPPED)
    await provider.snapshot_vm("keep", "s", o())
    reopened = Lifecycle(provider.driver, type(provider.store)(provider.store.path), state_dir=provider.state_dir)
    view = await reopened.get_vm("keep")
    assert view.status is VmStatus.STOPPED and view.snapshots == ("s",)


async def test_uint64_call_ids(provider: Lifecycle) -> None:
    big = Origin(call_id=2**64 - 1, caller="0xc")
    await provider.create_vm("big", None, big)
    again = await provider.create_vm("big", None, big)  # replay of the largest call id
    assert again.status is VmStatus.CREATED
    assert (await provider.get_vm("big")).history[0].call_id == 2**64 - 1
