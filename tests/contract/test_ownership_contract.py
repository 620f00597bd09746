"""DESIGN.md §9, ownership: the ownership column of the state x job table, run against every provider.

A VM belongs to the caller that created (or restored) it, and so do its snapshots. Every change (jobs
1-5 and 7) from another caller fails with ``vm '<id>' belongs to another caller``, changes nothing, and
is put on the VM's audit trail as ``refused:<job>``; the service owner, and the service itself (an
``Origin`` without a caller), may do everything.
"""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Awaitable, Callable

import pytest

from microvm_blueprint.runtime.errors import InvalidTransition, OwnershipError, RecordedFailure, VmAlreadyExists
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmStatus

from .conftest import SERVICE_OWNER
from .test_lifecycle_contract import CELLS, EXPECTED_AFTER, TABLE

OWNER = "0x00000000000000000000000000000000000000A1"
OTHER = "0x00000000000000000000000000000000000000b2"
_calls = itertools.count(5000)


def by(caller: str | None) -> Origin:
    return Origin(call_id=next(_calls), caller=caller)


Job = Callable[[Lifecycle, str, Origin], Awaitable[object]]
#: jobs 1-5 and 7 on VM ``v`` (which has a snapshot "keep"); create (0, 6, 8) makes a new VM instead
JOBS: dict[str, Job] = {
    "start_vm": lambda p, v, o: p.start_vm(v, o),
    "stop_vm": lambda p, v, o: p.stop_vm(v, o),
    "snapshot_vm": lambda p, v, o: p.snapshot_vm(v, "other", o),
    "destroy_vm": lambda p, v, o: p.destroy_vm(v, o),
    "restore_vm": lambda p, v, o: p.restore_vm(v, "keep", "clone", o),
    "delete_snapshot": lambda p, v, o: p.delete_snapshot(v, "keep", o),
}
STATUSES = [VmStatus.CREATED, VmStatus.RUNNING, VmStatus.STOPPED, VmStatus.DESTROYED, VmStatus.FAILED]


async def owned_vm(p: Lifecycle, vm_id: str, status: VmStatus, owner: str = OWNER) -> None:
    """``vm_id`` made by ``owner``, with a snapshot "keep", brought to ``status``."""
    await p.create_vm(vm_id, None, by(owner))
    await p.snapshot_vm(vm_id, "keep", by(owner))
    if status in (VmStatus.RUNNING, VmStatus.STOPPED, VmStatus.FAILED):
        await p.start_vm(vm_id, by(owner))
    if status is VmStatus.STOPPED:
        await p.stop_vm(vm_id, by(owner))
    if status is VmStatus.FAILED:
        p._on_vmm_exit(vm_id, "killed by test")
    if status is VmStatus.DESTROYED:
        await p.destroy_vm(vm_id, by(owner))
    assert (await p.get_vm(vm_id)).status is status


@pytest.mark.parametrize("job", list(JOBS))
@pytest.mark.parametrize("status", STATUSES, ids=lambda s: s.value)
async def test_a_non_owner_is_refused_and_changes_nothing(provider: Lifecycle, status: VmStatus, job: str) -> None:
    await owned_vm(provider, "vm-o", status)
    before = await provider.get_vm("vm-o")
    call = by(OTHER)
    with pytest.raises(OwnershipError) as err:
        await JOBS[job](provider, "vm-o", call)
    assert str(err.value) == "vm 'vm-o' belongs to another caller"
    after = await provider.get_vm("vm-o")
    assert (after.status, after.snapshots, after.owner) == (before.status, before.snapshots, OWNER)
    assert after.history[: len(before.history)] == before.history
    # the audit trail: exactly one more entry, the refused attempt, with its caller and call id
    assert [(h.action, h.status, h.caller, h.call_id) for h in after.history[len(before.history):]] == [
        (f"refused:{job}", status, OTHER, call.call_id)
    ]
    assert [v.vm_id for v in await provider.list_vms()] == ["vm-o"]  # no clone
    # a replay of the refused call answers the same text (the failure is recorded like any VmError)
    with pytest.raises(RecordedFailure, match=r"^vm 'vm-o' belongs to another caller$"):
        await JOBS[job](provider, "vm-o", call)
    assert len((await provider.get_vm("vm-o")).history) == len(after.history)


@pytest.mark.parametrize(("status", "action"), CELLS)
async def test_the_service_owner_gets_the_owners_table(provider: Lifecycle, status: VmStatus, action: str) -> None:
    """The state x job table, every cell played by the service owner on a customer's VM: the same answers."""
    await owned_vm(provider, "vm-t", status)
    before = await provider.get_vm("vm-t")
    act = {"start": "start_vm", "stop": "stop_vm", "snapshot": "snapshot_vm", "destroy": "destroy_vm"}[action]
    forbidden = TABLE[(status, action)]
    lower = SERVICE_OWNER.lower()  # any spelling of the address
    if forbidden is None:
        await JOBS[act](provider, "vm-t", by(lower))
        after = await provider.get_vm("vm-t")
        assert after.status is EXPECTED_AFTER.get(action, status)
        assert after.history[-1].caller == lower and after.owner == OWNER  # acting does not take it over
    else:
        with pytest.raises(InvalidTransition, match=f"^invalid vm transition for 'vm-t': {status.value} -> "):
            await JOBS[act](provider, "vm-t", by(lower))
        assert (await provider.get_vm("vm-t")).history == before.history


async def test_the_service_owner_and_the_service_may_do_everything(provider: Lifecycle) -> None:
    await owned_vm(provider, "vm-c", VmStatus.RUNNING)
    for acting in (SERVICE_OWNER, None):
        await provider.stop_vm("vm-c", by(acting))
        await provider.start_vm("vm-c", by(acting))
        await provider.snapshot_vm("vm-c", f"s-{acting}", by(acting))
        await provider.delete_snapshot("vm-c", f"s-{acting}", by(acting))
    clone = await provider.restore_vm("vm-c", "keep", "clone", by(SERVICE_OWNER))
    assert clone.owner == SERVICE_OWNER  # the clone is the restorer's
    with pytest.raises(OwnershipError, match=r"^vm 'clone' belongs to another caller$"):
        await provider.stop_vm("clone", by(OWNER))  # the source's owner does not own the clone
    await provider.destroy_vm("vm-c", by(SERVICE_OWNER))
    await provider.destroy_vm("clone", by(None))
    assert {v.vm_id: v.status for v in await provider.list_vms()} == {
        "vm-c": VmStatus.DESTROYED, "clone": VmStatus.DESTROYED,
    }


async def test_restore_needs_the_source_and_gives_the_clone_to_its_restorer(provider: Lifecycle) -> None:
    await owned_vm(provider, "src", VmStatus.STOPPED)
    with pytest.raises(OwnershipError, match=r"^vm 'src' belongs to another caller$"):
        await provider.restore_vm("src", "keep", "stolen", by(OTHER))  # another's snapshot: its memory
    with pytest.raises(OwnershipError):
        await provider.restore_vm("src", "no-such-snapshot", "stolen", by(OTHER))  # nothing learnt either
    mine = await provider.restore_vm("src", "keep", "mine", by(OWNER))
    assert (mine.owner, mine.status, mine.history[0].caller) == (OWNER, VmStatus.CREATED, OWNER)  # "keep": at create
    await provider.destroy_vm("src", by(OWNER))  # snapshots outlive the VM: still the owner's
    with pytest.raises(OwnershipError):
        await provider.restore_vm("src", "keep", "stolen", by(OTHER))
    with pytest.raises(OwnershipError):
        await provider.delete_snapshot("src", "keep", by(OTHER))
    assert (await provider.get_vm("src")).snapshots == ("keep",)
    assert sorted(v.vm_id for v in await provider.list_vms()) == ["mine", "src"]


async def test_an_existing_id_is_not_taken_over(provider: Lifecycle) -> None:
    await owned_vm(provider, "taken", VmStatus.RUNNING)
    with pytest.raises(VmAlreadyExists):
        await provider.create_vm("taken", None, by(OTHER))
    await owned_vm(provider, "other-src", VmStatus.CREATED, owner=OTHER)
    with pytest.raises(VmAlreadyExists):
        await provider.restore_vm("other-src", "keep", "taken", by(OTHER))
    assert (await provider.get_vm("taken")).owner == OWNER


async def test_lookalike_ids_are_distinct_vms(provider: Lifecycle) -> None:
    """Ids are byte-exact: an NFC and an NFD spelling of one word are two VMs with two owners."""
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    assert nfc != nfd and nfc.encode() != nfd.encode()
    await provider.create_vm(nfc, None, by(OWNER))
    await provider.create_vm(nfd, None, by(OTHER))  # not "already exists"
    assert {v.vm_id.encode(): v.owner for v in await provider.list_vms()} == {
        nfc.encode(): OWNER, nfd.encode(): OTHER,
    }
    with pytest.raises(OwnershipError):
        await provider.start_vm(nfc, by(OTHER))  # a lookalike is no key to the other VM
    await provider.start_vm(nfd, by(OTHER))
    assert (await provider.get_vm(nfc)).status is VmStatus.CREATED
