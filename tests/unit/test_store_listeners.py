"""The change-notification hooks of the store and the job journal (the query API's waits and events)."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm_blueprint.blueprint.journal import JobJournal
from microvm_blueprint.runtime.errors import StoreUnusable
from microvm_blueprint.runtime.model import Origin, VmSpec, VmStatus
from microvm_blueprint.runtime.store import Store


def test_store_tells_listeners_which_vms_a_committed_write_touched(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    seen: list[tuple[str, ...] | None] = []
    store.add_listener(seen.append)
    store.insert_vm("a", VmStatus.CREATED, VmSpec(), "/w/a", None, Origin(1), "create")
    store.update_vm("a", VmStatus.RUNNING, Origin(2), "start")
    store.record_failure(Origin(3), "stop_vm", "a", "nope")  # touches no view: nobody is told
    store.drop_orphan_networks()  # may touch any VM
    assert seen == [("a",), ("a",), None]
    # a write that fails is not committed: nobody is told
    with pytest.raises(StoreUnusable):
        store.insert_vm("a", VmStatus.CREATED, VmSpec(), "/w/a", None, Origin(4), "create")
    assert len(seen) == 3
    store.remove_listener(seen.append)
    store.update_vm("a", VmStatus.STOPPED, Origin(5), "stop")
    assert len(seen) == 3


def test_a_failing_listener_does_not_fail_the_write(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")

    def broken(_: object) -> None:
        raise RuntimeError("listener bug")

    seen: list[object] = []
    store.add_listener(broken)
    store.add_listener(seen.append)
    store.insert_vm("a", VmStatus.CREATED, VmSpec(), "/w/a", None, Origin(1), "create")
    assert store.get_vm("a") is not None
    assert seen == [("a",)]


def test_events_after_reads_the_history_by_seq(tmp_path: Path) -> None:
    store = Store(":memory:")
    assert store.last_event_seq() == 0
    store.insert_vm("a", VmStatus.CREATED, VmSpec(), "/w/a", None, Origin(1, "0xc"), "create")
    store.insert_vm("b", VmStatus.CREATED, VmSpec(), "/w/b", None, Origin(2**64 - 1), "create")
    store.update_vm("a", VmStatus.RUNNING, Origin(3), "start")
    every = store.events_after(0, limit=10)
    assert [(e.vm_id, e.action, e.status, e.call_id) for e in every] == [
        ("a", "create", VmStatus.CREATED, 1),
        ("b", "create", VmStatus.CREATED, 2**64 - 1),
        ("a", "start", VmStatus.RUNNING, 3),
    ]
    assert every[0].caller == "0xc"
    assert store.last_event_seq() == every[-1].seq
    assert store.events_after(every[0].seq, limit=1) == [every[1]]
    assert store.events_after(0, limit=10, vm_id="a") == [every[0], every[2]]
    assert store.events_after(0, limit=2, newest=True) == every[1:]
    assert store.events_after(0, limit=1, vm_id="a", newest=True) == [every[2]]


def test_journal_tells_listeners_which_call_changed(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "j.sqlite3")
    seen: list[int] = []
    journal.add_listener(seen.append)
    journal.received(2**64 - 1, "create_vm", 0, None)
    journal.finished(2**64 - 1, error=None)
    journal.submitted(2**64 - 1, "0xabc")
    journal.dropped(5, "gone")
    assert seen == [2**64 - 1, 2**64 - 1, 2**64 - 1, 5]
    journal.remove_listener(seen.append)
    journal.received(6, "create_vm", 0, None)
    assert len(seen) == 4
