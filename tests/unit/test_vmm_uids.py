"""A uid (and gid) of its own per VMM (DESIGN.md §9, ``MICROVM_VMM_UID_RANGE``): taken at create and
restore, recorded with the VM, handed to the driver, released at destroy, never held by two VMs, kept
across an operator restart; a used-up range is a clear error that changes nothing; the range itself
is checked at start. The VMM of a real QEMU running as it: tests/integration/test_qemu_vmm_uids.py."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from microvm_blueprint.blueprint.operator import build_provider
from microvm_blueprint.blueprint.settings import OperatorSettings
from microvm_blueprint.errors import ConfigError
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.confine import DEFAULT_UID_RANGE, check_uid_range, parse_uid_range
from microvm_blueprint.runtime.errors import QuotaExceeded
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, SnapshotRecord, VmHandle, VmRecord, VmSpec, VmStatus
from microvm_blueprint.runtime.store import Store

RANGE = (300_000, 300_002)


class UidDriver(InMemoryDriver):
    """The in-memory driver as one that switches users: it notes the uid each VMM is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int | None] = {}

    def isolates_users(self) -> bool:
        return True

    async def create(self, vm: VmRecord) -> VmHandle | None:
        self.seen[vm.vm_id] = vm.vmm_uid
        return await super().create(vm)

    async def restore(self, vm: VmRecord, snapshot: SnapshotRecord) -> VmHandle | None:
        self.seen[vm.vm_id] = vm.vmm_uid
        return await super().restore(vm, snapshot)


def _life(tmp_path: Path, driver: InMemoryDriver | None = None, uids: tuple[int, int] | None = RANGE) -> Lifecycle:
    return Lifecycle(driver or UidDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state",
                     vmm_uids=uids)


_calls = iter(range(1, 10**6))


def _o() -> Origin:
    return Origin(next(_calls))


# ---- the store --------------------------------------------------------------------------------


def test_the_store_hands_out_the_lowest_free_uid_and_takes_it_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    assert [store.take_vmm_uid(v, RANGE) for v in ("a", "b", "c")] == [300_000, 300_001, 300_002]
    assert store.take_vmm_uid("b", RANGE) == 300_001  # the one it holds, again
    store.release_vmm_uid("a")
    assert store.vmm_uid("a") is None
    assert store.take_vmm_uid("d", RANGE) == 300_000  # free again: re-used
    assert store.vmm_uids() == {"d": 300_000, "b": 300_001, "c": 300_002}


def test_a_used_up_range_is_a_clear_error_that_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    for v in ("a", "b", "c"):
        store.take_vmm_uid(v, RANGE)
    before = store.vmm_uids()
    with pytest.raises(QuotaExceeded, match=r"MICROVM_VMM_UID_RANGE 300000-300002 has no free uid left"):
        store.take_vmm_uid("d", RANGE)
    assert store.vmm_uids() == before


def test_uids_survive_a_reopen_and_orphans_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    for v in ("live", "gone", "never"):
        store.take_vmm_uid(v, RANGE)
    store.insert_vm("live", VmStatus.CREATED, VmSpec(), "/nowhere", None, Origin(), "create")
    store.insert_vm("gone", VmStatus.CREATED, VmSpec(), "/nowhere", None, Origin(), "create")
    store.update_vm("gone", VmStatus.DESTROYED, Origin(), "destroy", handle=None)
    store.close()
    again = Store(path)
    assert again.vmm_uids() == {"live": 300_000, "gone": 300_001, "never": 300_002}
    assert again.drop_orphan_vmm_uids() == 2
    assert again.vmm_uids() == {"live": 300_000}


def test_a_store_from_before_per_vm_uids_opens_and_its_vms_keep_the_shared_user(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    store.insert_vm("old", VmStatus.CREATED, VmSpec(), "/nowhere", None, Origin(), "create")
    store.close()
    with sqlite3.connect(path) as db:  # as the schema-3 store of an earlier operator left it
        db.execute("DROP TABLE vmm_uids")
    again = Store(path)
    assert again.vmm_uid("old") is None and again.vmm_uids() == {}
    assert again.take_vmm_uid("new", RANGE) == 300_000


# ---- the lifecycle core -----------------------------------------------------------------------


async def test_each_vm_runs_as_its_own_uid_released_at_destroy(tmp_path: Path) -> None:
    driver = UidDriver()
    life = _life(tmp_path, driver)
    try:
        await life.create_vm("a", None, _o())
        await life.create_vm("b", None, _o())
        assert driver.seen == {"a": 300_000, "b": 300_001}
        assert life.store.vmm_uids() == {"a": 300_000, "b": 300_001}
        vm_a = life.store.get_vm("a")
        assert vm_a is not None and life._record(vm_a).vmm_uid == 300_000  # what every later driver call gets
        await life.snapshot_vm("a", "s", _o())
        await life.restore_vm("a", "s", "clone", _o())
        assert driver.seen["clone"] == 300_002  # a clone is another VMM: a uid of its own
        await life.destroy_vm("a", _o())
        assert "a" not in life.store.vmm_uids()
        await life.create_vm("c", None, _o())
        assert driver.seen["c"] == 300_000  # released, so re-used
    finally:
        await life.close()


async def test_a_create_beyond_the_range_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    life = _life(tmp_path, uids=(300_000, 300_000))
    try:
        await life.create_vm("a", None, _o())
        with pytest.raises(QuotaExceeded, match="MICROVM_VMM_UID_RANGE"):
            await life.create_vm("b", None, _o())
        assert life.store.get_vm("b") is None
        assert life.store.vmm_uids() == {"a": 300_000}
        vm_a = life.store.get_vm("a")
        assert vm_a is not None and [p.name for p in life.vms_dir.iterdir()] == [Path(vm_a.workdir).name]
    finally:
        await life.close()


async def test_uids_survive_an_operator_restart(tmp_path: Path) -> None:
    life = _life(tmp_path)
    await life.create_vm("a", None, _o())
    await life.create_vm("b", None, _o())
    await life.destroy_vm("a", _o())
    await life.close()
    driver = UidDriver()
    again = _life(tmp_path, driver)
    try:
        await again.reconcile()
        assert again.store.vmm_uids() == {"b": 300_001}
        await again.create_vm("c", None, _o())
        assert driver.seen["c"] == 300_000  # b's uid is never handed out while b holds it
    finally:
        await again.close()


async def test_a_driver_that_does_not_switch_users_gets_no_uids(tmp_path: Path) -> None:
    life = _life(tmp_path, InMemoryDriver())
    try:
        assert life.vmm_uids is None
        await life.create_vm("a", None, _o())
        assert life.store.vmm_uids() == {}
    finally:
        await life.close()


# ---- the setting ------------------------------------------------------------------------------


def test_the_range_setting_parses_and_refuses_what_is_not_a_range() -> None:
    assert OperatorSettings.from_env({}, Path("/d")).vmm_uid_range == (1_879_048_192, 1_879_113_727)
    assert OperatorSettings.from_env({"MICROVM_VMM_UID_RANGE": "70000-70009"}, Path("/d")).vmm_uid_range == (
        70_000, 70_009)
    assert OperatorSettings.from_env({"MICROVM_VMM_UID_RANGE": "off"}, Path("/d")).vmm_uid_range is None
    assert parse_uid_range("") is None
    for bad in ("1000-2000", "70000", "70009-70000", "a-b", "70000-4294967295", "-5-10"):
        with pytest.raises(ConfigError, match="MICROVM_VMM_UID_RANGE"):
            parse_uid_range(bad)


def test_a_range_holding_host_ids_is_refused_at_start(tmp_path: Path) -> None:
    free = (1_500_000_000, 1_500_000_099)  # no account has such ids
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\nbob:1500000050:65536\n")
    check_uid_range(free, subuid=str(tmp_path / "none"), subgid=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"bob's subordinate ids 1500000050-1500065585"):
        check_uid_range(free, subuid=str(subuid), subgid=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"user root \(uid 0\)"):
        check_uid_range((0, 70_000))


async def test_build_provider_refuses_a_range_that_is_not_the_vmms_alone(tmp_path: Path) -> None:
    settings = dataclasses.replace(OperatorSettings.from_env({}, tmp_path / "data"), vmm_uid_range=(0, 70_000))
    with pytest.raises(ConfigError, match="MICROVM_VMM_UID_RANGE=0-70000 overlaps"):
        build_provider(settings, UidDriver())


def test_the_default_range_is_clear_of_what_useradd_hands_out(tmp_path: Path) -> None:
    """``useradd`` gives each new user 65,536 subordinate ids from 100000 on (login.defs SUB_UID_MIN,
    SUB_UID_COUNT); the earlier default 200000-265535 overlapped the second user's, so a root operator on
    such a host refused to start. The default must pass beside many users' allocations."""
    subuid = tmp_path / "subuid"
    subuid.write_text("".join(f"user{i}:{100000 + i * 65536}:65536\n" for i in range(1000)))
    check_uid_range(DEFAULT_UID_RANGE, subuid=str(subuid), subgid=str(subuid))
    with pytest.raises(ConfigError, match="user1's subordinate ids 165536-231071"):
        check_uid_range((200000, 265535), subuid=str(subuid), subgid=str(tmp_path / "none"))
