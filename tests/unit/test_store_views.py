"""The store's VM views: kept between writes, never stale after one, kept while other VMs change,
bounded in number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microvm_blueprint.runtime import store as store_module
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus
from microvm_blueprint.runtime.store import Store


@pytest.fixture
def life(tmp_path: Path) -> Lifecycle:
    return Lifecycle(InMemoryDriver(), Store(tmp_path / "s.sqlite3"), state_dir=tmp_path / "state")


def count_reads(monkeypatch: pytest.MonkeyPatch, store: Store) -> list[str]:
    reads: list[str] = []
    real = store._read

    def counted(sql: str, args: tuple[object, ...] = ()) -> Any:
        reads.append(sql)
        return real(sql, args)

    monkeypatch.setattr(store, "_read", counted)
    return reads


async def test_a_view_is_read_once_until_the_next_write(life: Lifecycle, monkeypatch: pytest.MonkeyPatch) -> None:
    await life.create_vm("a", None, Origin(1))
    life.store._views.clear()  # as after a restart
    reads = count_reads(monkeypatch, life.store)
    first = await life.get_vm("a")
    n = len(reads)
    assert n >= 1
    assert await life.get_vm("a") is first and len(reads) == n  # served from memory
    await life.start_vm("a", Origin(3))  # a write to this VM: its kept view is dropped
    after = await life.get_vm("a")
    assert len(reads) > n and after.status is VmStatus.RUNNING and after is not first


async def test_every_write_shows_at_once(life: Lifecycle) -> None:
    await life.create_vm("a", None, Origin(1))
    assert (await life.get_vm("a")).status is VmStatus.CREATED
    await life.start_vm("a", Origin(2))
    assert (await life.get_vm("a")).status is VmStatus.RUNNING
    await life.snapshot_vm("a", "s1", Origin(3))
    view = await life.get_vm("a")
    assert view.snapshots == ("s1",) and [h.action for h in view.history] == ["create", "start", "snapshot"]
    await life.delete_snapshot("a", "s1", Origin(4))
    assert (await life.get_vm("a")).snapshots == ()
    await life.stop_vm("a", Origin(5))
    await life.destroy_vm("a", Origin(6))
    assert (await life.get_vm("a")).status is VmStatus.DESTROYED
    with pytest.raises(Exception, match="invalid vm transition"):
        await life.start_vm("a", Origin(7))  # a refused call is recorded (a write) and seen
    assert (await life.get_vm("a")).status is VmStatus.DESTROYED


async def test_kept_views_are_bounded_and_unknown_ids_are_not_kept(
    life: Lifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "VIEW_CACHE", 5)
    for i in range(8):
        await life.create_vm(f"vm-{i}", None, Origin(i + 1))
    for i in range(8):
        await life.get_vm(f"vm-{i}")
    assert list(life.store._views) == [f"vm-{i}" for i in range(3, 8)]  # least recently used out
    assert life.store.vm_view("ghost") is None and "ghost" not in life.store._views


async def test_writes_to_other_vms_keep_a_view(life: Lifecycle, monkeypatch: pytest.MonkeyPatch) -> None:
    await life.create_vm("a", None, Origin(1))
    first = await life.get_vm("a")
    reads = count_reads(monkeypatch, life.store)
    # jobs on other VMs: created, started, snapshotted, restored, destroyed, a refused call
    await life.create_vm("b", None, Origin(2))
    await life.start_vm("b", Origin(3))
    await life.snapshot_vm("b", "s", Origin(4))
    await life.restore_vm("b", "s", "c", Origin(5))
    await life.destroy_vm("c", Origin(6))
    with pytest.raises(Exception, match="invalid vm transition"):
        await life.start_vm("c", Origin(7))
    n = len(reads)
    assert await life.get_vm("a") is first and len(reads) == n  # still served from memory
    b = await life.get_vm("b")
    assert b.status is VmStatus.RUNNING and b.snapshots == ("s",)
    assert (await life.get_vm("c")).status is VmStatus.DESTROYED


def test_a_write_that_does_not_say_which_vms_drops_every_view(life: Lifecycle) -> None:
    store = life.store
    store.insert_vm("a", VmStatus.CREATED, VmSpec(), "/nowhere", None, Origin(1), "create")
    first = store.vm_view("a")
    assert first is not None and store.vm_view("a") is first
    with store._tx() as db:  # e.g. a future write path that does not name its VMs
        db.execute("UPDATE vms SET status='failed' WHERE vm_id='a'")
    after = store.vm_view("a")
    assert after is not None and after.status is VmStatus.FAILED


def test_a_views_json_bytes_are_what_a_json_response_renders() -> None:
    from starlette.responses import JSONResponse

    from microvm_blueprint.runtime.model import HistoryEntry, VmView

    view = VmView(
        vm_id="vm-ü", status=VmStatus.FAILED, spec=VmSpec(), snapshots=("s1", "s2"), created_at=1.5,
        updated_at=2.25, error="boot missed its deadline: “ready” never came",
        history=(HistoryEntry(at=1.5, action="create", status=VmStatus.CREATED, call_id=7, caller="0xab"),),
    )
    assert view.json_bytes == JSONResponse(view.to_json()).body
    assert view.json_bytes is view.json_bytes  # encoded once
