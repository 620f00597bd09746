"""Per-caller quotas (README, Security model): what one caller owns (its VMs, their memory, their
snapshots' bytes) is bounded, so one customer cannot take the whole host. They are reservations like the
host quotas (checked and taken under the same lock before any VMM work, given back on failure); a refusal
changes nothing and is recorded as the call's outcome, as a host-quota refusal is. The service owner and
the service itself are held by the host quotas only."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.settings import OperatorSettings
from microvm_blueprint.errors import TransientError
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.errors import InvalidInput, QuotaExceeded, RecordedFailure
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import HostLimits, Origin, SnapshotRecord, VmHandle, VmRecord, VmSpec
from microvm_blueprint.runtime.store import Store
from microvm_blueprint.tangle.errors import ConfigError

from .test_quotas_settings import GatedDriver, _burst

A = "0x00000000000000000000000000000000000000A1"
B = "0x00000000000000000000000000000000000000b2"
OWNER = "0x00000000000000000000000000000000000000Ee"  # the service owner
MIB = VmSpec(mem_mib=256, image="")


class GatedRestores(GatedDriver):
    """:class:`GatedDriver` whose restores wait at the gate too."""

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        self.entered.append(f"restore:{vm.vm_id}")
        await asyncio.wait_for(self.gate.wait(), 30)
        return await InMemoryDriver.restore(self, vm, snapshot)


def life(tmp: Path, driver: InMemoryDriver | None = None, **limits: int) -> Lifecycle:
    return Lifecycle(driver or InMemoryDriver(), Store(tmp / "s.db"), state_dir=tmp / "st",
                     limits=HostLimits(**limits), service_owner=OWNER)


_ids = iter(range(70_000, 80_000))


def by(caller: str | None) -> Origin:
    return Origin(call_id=next(_ids), caller=caller)


async def owned(lc: Lifecycle, caller: str) -> list[str]:
    return [v.vm_id for v in await lc.list_vms() if (v.owner or "").lower() == caller.lower() and v.status.value != "destroyed"]


async def test_vm_count_per_caller_whatever_the_letter_case(tmp_path: Path) -> None:
    lc = life(tmp_path, caller_max_vms=2)
    await lc.create_vm("a1", None, by(A))
    await lc.create_vm("a2", None, by(A.lower()))  # the same caller, spelled in lower case
    with pytest.raises(QuotaExceeded, match=re.escape(f"quota exceeded: at most 2 vms for caller {A.upper()}")):
        await lc.create_vm("a3", None, by(A.upper()))
    await lc.create_vm("b1", None, by(B))  # another caller has a quota of its own
    await lc.destroy_vm("a1", by(A))  # destroy gives the share back
    await lc.create_vm("a3", None, by(A))
    assert await owned(lc, A) == ["a2", "a3"]


async def test_guest_memory_per_caller(tmp_path: Path) -> None:
    lc = life(tmp_path, caller_max_total_mem_mib=384)
    await lc.create_vm("a1", MIB, by(A))
    with pytest.raises(QuotaExceeded) as err:
        await lc.create_vm("a2", MIB, by(A))
    assert str(err.value) == f"quota exceeded: total guest memory for caller {A} would be 512 MiB (limit 384 MiB)"
    await lc.create_vm("a2", VmSpec(mem_mib=128, image=""), by(A))  # what still fits
    await lc.create_vm("b1", MIB, by(B))
    await lc.destroy_vm("a1", by(A))
    await lc.create_vm("a3", MIB, by(A))
    assert await owned(lc, A) == ["a2", "a3"]


async def test_snapshot_bytes_per_caller(tmp_path: Path) -> None:
    lc = life(tmp_path, caller_max_snapshot_bytes=150)
    for vm, caller in (("a", A), ("b", B)):
        await lc.create_vm(vm, None, by(caller))
    await lc.snapshot_vm("a", "s1", by(A))  # ~110 bytes of manifest
    with pytest.raises(QuotaExceeded, match=re.escape(f"limit of 150 bytes for caller {A}")):
        await lc.snapshot_vm("a", "s2", by(A))
    await lc.snapshot_vm("b", "s1", by(B))  # B's bytes are B's
    await lc.snapshot_vm("a", "by-owner", by(OWNER))  # the service owner is exempt; the snapshot is A's
    await lc.delete_snapshot("a", "s1", by(A))
    with pytest.raises(QuotaExceeded, match="for caller"):  # A's VM still holds the service owner's snapshot
        await lc.snapshot_vm("a", "s2", by(A))
    await lc.delete_snapshot("a", "by-owner", by(A))  # a deleted snapshot gives its bytes back
    await lc.snapshot_vm("a", "s2", by(A))
    assert [(await lc.get_vm(v)).snapshots for v in ("a", "b")] == [("s2",), ("s1",)]
    assert len(list((tmp_path / "st" / "snapshots").rglob("manifest.json"))) == 2


async def test_a_burst_of_snapshots_reserves_per_caller_before_the_vmm_works(tmp_path: Path) -> None:
    driver = GatedDriver()
    driver.gate.set()
    lc = life(tmp_path, driver, caller_max_snapshot_bytes=4096)
    for vm, caller in (("a1", A), ("a2", A), ("b", B)):
        await lc.create_vm(vm, None, by(caller))
        await lc.start_vm(vm, by(caller))
    driver.gate.clear()
    driver.entered.clear()
    # a running VM's snapshot may take its guest memory: A's first one reserves all A has left, B's is B's
    outcomes = await _burst([lc.snapshot_vm(vm, "s", by(c)) for vm, c in (("a1", A), ("a2", A), ("b", B))], driver, 2)
    assert [str(o) for o in outcomes if isinstance(o, QuotaExceeded)] == [
        f"quota exceeded: snapshot disk limit of 4096 bytes for caller {A} reached"], outcomes
    assert lc._snaps_taken == {}
    assert sorted(v.vm_id for v in await lc.list_vms() if v.snapshots) in (["a1", "b"], ["a2", "b"])


async def test_the_real_snapshot_size_is_checked_against_the_callers_limit(tmp_path: Path) -> None:
    lc = life(tmp_path, caller_max_snapshot_bytes=100)  # a created VM reserves 0; its ~110 bytes do not fit
    await lc.create_vm("a", None, by(A))
    with pytest.raises(QuotaExceeded, match=re.escape(f"would pass the limit of 100 bytes for caller {A}")):
        await lc.snapshot_vm("a", "s", by(A))
    assert (await lc.get_vm("a")).snapshots == ()
    assert list((tmp_path / "st" / "snapshots").rglob("manifest.json")) == []


async def test_a_burst_of_two_callers_each_gets_its_quota_and_the_host_quota_holds(tmp_path: Path) -> None:
    driver = GatedDriver()
    lc = life(tmp_path, driver, max_vms=5, caller_max_vms=2)
    calls = [lc.create_vm(f"{who}-{i}", None, by(caller)) for i in range(4) for who, caller in (("a", A), ("b", B))]
    outcomes = await _burst(calls, driver, 4)  # only the calls that fit reach the VMM
    refused = sorted({str(o) for o in outcomes if isinstance(o, QuotaExceeded)})
    assert refused == [f"quota exceeded: at most 2 vms for caller {c}" for c in (A, B)], outcomes
    assert (len(await owned(lc, A)), len(await owned(lc, B))) == (2, 2)
    # two more callers: one VM left on the host, whoever asks
    driver.gate.clear()
    driver.entered.clear()
    c, d = "0x" + "c" * 40, "0x" + "d" * 40
    calls = [lc.create_vm(f"{who}-{i}", None, by(caller)) for i in range(3) for who, caller in (("c", c), ("d", d))]
    outcomes = await _burst(calls, driver, 1)
    assert [str(o) for o in outcomes if isinstance(o, QuotaExceeded)] == ["quota exceeded: at most 5 vms"] * 5
    assert len(await lc.list_vms()) == 5
    assert lc._vms_taken == {}


async def test_a_restore_counts_for_the_caller_that_restores(tmp_path: Path) -> None:
    driver = GatedRestores()
    driver.gate.set()
    lc = life(tmp_path, driver, caller_max_vms=4, caller_max_total_mem_mib=2048)
    for vm in ("a", "b"):
        await lc.create_vm(vm, MIB, by(A))
        await lc.snapshot_vm(vm, "s", by(A))
    driver.gate.clear()
    driver.entered.clear()
    # restores (from two sources: one source's restores take turns on its lock) and creates in flight at
    # once: A has room for two more VMs, and a restore in flight counts as a create in flight does
    calls = [lc.restore_vm(src, "s", f"r-{src}", by(A)) for src in ("a", "b")]
    calls += [lc.create_vm(f"c{i}", MIB, by(A)) for i in range(2)]
    outcomes = await _burst(calls, driver, 2)
    assert [str(o) for o in outcomes if isinstance(o, QuotaExceeded)] == [
        f"quota exceeded: at most 4 vms for caller {A}"] * 2, outcomes
    assert len(await owned(lc, A)) == 4
    # the service owner may clone A's snapshot (exempt): the clone is the owner's and A's count is unchanged
    clone = await lc.restore_vm("a", "s", "owners-clone", by(OWNER))
    assert clone.owner == OWNER and len(await owned(lc, A)) == 4
    with pytest.raises(QuotaExceeded, match="for caller"):
        await lc.restore_vm("a", "s", "r9", by(A))
    assert lc._vms_taken == {}


async def test_the_service_owner_and_the_service_are_held_by_the_host_quotas_only(tmp_path: Path) -> None:
    lc = life(tmp_path, max_vms=4, caller_max_vms=1, caller_max_total_mem_mib=256, caller_max_snapshot_bytes=1)
    for i in range(2):
        await lc.create_vm(f"o{i}", MIB, by(OWNER.lower()))  # any letter case of the owner
        await lc.create_vm(f"s{i}", MIB, Origin())  # the service itself (no caller)
    await lc.snapshot_vm("o0", "s", by(OWNER))
    await lc.snapshot_vm("o0", "t", by(OWNER))
    with pytest.raises(QuotaExceeded, match=r"^quota exceeded: at most 4 vms$"):
        await lc.create_vm("o9", MIB, by(OWNER))
    with pytest.raises(QuotaExceeded, match=r"at most 4 vms$"):  # the host is full for customers too
        await lc.create_vm("a", None, by(A))


async def test_the_service_owner_unknown_yet_is_a_retry_never_a_refusal(tmp_path: Path) -> None:
    def owner() -> str:
        raise TransientError("the service owner is not known yet")

    lc = Lifecycle(InMemoryDriver(), Store(tmp_path / "s.db"), state_dir=tmp_path / "st",
                   limits=HostLimits(caller_max_vms=1), service_owner=owner)
    call = by(A)
    with pytest.raises(TransientError):
        await lc.create_vm("a", None, call)
    assert lc.store.get_call(call.call_id or 0) is None  # not recorded: the same call may run again
    await lc.create_vm("s", None, Origin())  # the service itself needs no owner to be known


async def test_a_refusal_changes_nothing_and_is_recorded_as_a_host_quota_refusal_is(tmp_path: Path) -> None:
    lc = life(tmp_path, max_vms=10, caller_max_vms=1)
    await lc.create_vm("a1", None, by(A))
    before = (await lc.list_vms(), sorted(p.name for p in (tmp_path / "st" / "vms").iterdir()))
    for limits, origin, vm_id, text in [
        (HostLimits(max_vms=10, caller_max_vms=1), by(A), "a2", "quota exceeded: at most 1 vms for caller " + A),
        (HostLimits(max_vms=1), by(B), "b1", "quota exceeded: at most 1 vms"),  # a host quota, for comparison
    ]:
        lc.limits = limits
        with pytest.raises(QuotaExceeded, match=re.escape(text)):
            await lc.create_vm(vm_id, None, origin)
        done = lc.store.get_call(origin.call_id or 0)
        assert done is not None and (done.ok, done.error) == (False, text)
        assert lc.store.history(vm_id) == []  # no VM row, no history
        with pytest.raises(RecordedFailure, match=re.escape(text)):  # a replay answers the same refusal
            await lc.create_vm(vm_id, None, origin)
    assert (await lc.list_vms(), sorted(p.name for p in (tmp_path / "st" / "vms").iterdir())) == before
    assert lc.store.get_vm("a2") is None and lc._vms_taken == {}


def test_caller_quota_settings(tmp_path: Path) -> None:
    for env, message in [
        ({"MICROVM_CALLER_MAX_VMS": "many"}, "MICROVM_CALLER_MAX_VMS='many' is not an integer"),
        ({"MICROVM_CALLER_MAX_VMS": "0"}, "MICROVM_CALLER_MAX_VMS='0' must be at least 1"),
        ({"MICROVM_CALLER_MAX_TOTAL_MEM_MIB": "64"}, "MICROVM_CALLER_MAX_TOTAL_MEM_MIB='64' must be at least 128"),
        ({"MICROVM_CALLER_MAX_SNAPSHOT_BYTES": "-1"}, "MICROVM_CALLER_MAX_SNAPSHOT_BYTES='-1' must be at least 1"),
        ({"MICROVM_CALLER_MAX_SNAPSHOT_BYTES": "1e9"}, "MICROVM_CALLER_MAX_SNAPSHOT_BYTES='1e9' is not an integer"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            OperatorSettings.from_env(env, tmp_path)
        assert not isinstance(err.value, InvalidInput) and "\n" not in str(err.value)
    unset = OperatorSettings.from_env({}, tmp_path).limits
    assert (unset.caller_max_vms, unset.caller_max_total_mem_mib, unset.caller_max_snapshot_bytes) == (None,) * 3
    s = OperatorSettings.from_env({"MICROVM_CALLER_MAX_VMS": "3", "MICROVM_CALLER_MAX_TOTAL_MEM_MIB": "2048",
                                   "MICROVM_CALLER_MAX_SNAPSHOT_BYTES": "1073741824"}, tmp_path).limits
    assert (s.caller_max_vms, s.caller_max_total_mem_mib, s.caller_max_snapshot_bytes) == (3, 2048, 1 << 30)
