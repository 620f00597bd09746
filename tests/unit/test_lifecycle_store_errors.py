"""A state database that fails for a moment (locked by another connection) is not a call's outcome:
the call is not recorded as failed, and the same call id succeeds once the lock is gone. A database
that cannot be used at all is a different, non-transient error. Real SQLite throughout."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microvm_blueprint.blueprint.journal import JobJournal, JournalError
from microvm_blueprint.errors import TransientError
from microvm_blueprint.runtime.adapters.in_memory import InMemoryDriver
from microvm_blueprint.runtime.errors import OwnershipError, RecordedFailure, StoreUnusable, VmError
from microvm_blueprint.runtime.lifecycle import Lifecycle
from microvm_blueprint.runtime.model import Origin, VmStatus
from microvm_blueprint.runtime.store import Store, StoreError
from microvm_blueprint.tangle.errors import TangleError
from microvm_blueprint.tangle.state import TangleState


class Holder:
    """Another connection that holds the database's write lock (``BEGIN EXCLUSIVE``) until released."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.held = False

    def take(self) -> None:
        self.conn.execute("BEGIN EXCLUSIVE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.conn.execute("ROLLBACK")
            self.held = False


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite3"


@pytest.fixture
def holder(db: Path) -> Iterator[Holder]:
    Store(db).close()  # the file exists, in WAL mode, before anyone locks it
    h = Holder(db)
    yield h
    h.release()
    h.conn.close()


@pytest.fixture
def life(db: Path, tmp_path: Path, holder: Holder) -> Lifecycle:
    store = Store(db)
    store._dbx.conn.execute("PRAGMA busy_timeout=50")  # fail fast on the held lock (5 s in service)
    return Lifecycle(InMemoryDriver(), store, state_dir=tmp_path / "state")


Step = Callable[[Lifecycle, Origin], Awaitable[object]]

STEPS: dict[str, tuple[VmStatus | None, Step, VmStatus]] = {
    # name: (status to bring "vm" to first, the change under test, status after it succeeds)
    "create": (None, lambda p, o: p.create_vm("vm", None, o), VmStatus.CREATED),
    "start": (VmStatus.CREATED, lambda p, o: p.start_vm("vm", o), VmStatus.RUNNING),
    "stop": (VmStatus.RUNNING, lambda p, o: p.stop_vm("vm", o), VmStatus.STOPPED),
    "snapshot": (VmStatus.RUNNING, lambda p, o: p.snapshot_vm("vm", "s", o), VmStatus.RUNNING),
    "destroy": (VmStatus.RUNNING, lambda p, o: p.destroy_vm("vm", o), VmStatus.DESTROYED),
}


@pytest.mark.parametrize("name", list(STEPS))
async def test_a_locked_database_is_not_the_calls_outcome(
    life: Lifecycle, holder: Holder, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, step, after = STEPS[name]
    if before is not None:
        await life.create_vm("vm", None, Origin(1, "0xc"))  # the VM is 0xc's: its later calls are its owner's
    if before is VmStatus.RUNNING:
        await life.start_vm("vm", Origin(2, "0xc"))
    # Contention comes and goes: by the time a failure would be recorded the lock is gone, so a
    # lifecycle that recorded this failure would succeed in recording it (and replay it forever).
    recorded: list[tuple[Any, ...]] = []
    real_record = life.store.record_failure

    def record_failure(*args: Any) -> None:
        holder.release()
        recorded.append(args)
        real_record(*args)

    monkeypatch.setattr(life.store, "record_failure", record_failure)
    call = Origin(call_id=77, caller="0xc")
    holder.take()
    with pytest.raises(StoreError, match="database is locked") as err:
        await step(life, call)
    assert isinstance(err.value, TransientError) and not isinstance(err.value, VmError)
    assert recorded == []
    holder.release()
    assert life.store.get_call(77) is None  # not applied, not failed: the call is still to be done

    await step(life, call)  # the same call id, once the lock is gone: it runs, and succeeds
    view = await life.get_vm("vm")
    assert view.status is after
    assert [h.call_id for h in view.history].count(77) == 1
    outcome = life.store.get_call(77)
    assert outcome is not None and outcome.ok
    assert life._locks == {}


async def test_a_failure_after_the_lock_is_gone_is_still_recorded(life: Lifecycle, holder: Holder) -> None:
    """The other side: a real VmError (here a forbidden transition) stays the call's recorded outcome."""
    await life.create_vm("vm", None, Origin(1))
    with pytest.raises(VmError, match="created -> stopped"):
        await life.stop_vm("vm", Origin(5))
    with pytest.raises(RecordedFailure, match="created -> stopped"):
        await life.stop_vm("vm", Origin(5))


def test_a_locked_store_is_transient_and_leaves_the_connection_usable(db: Path, holder: Holder) -> None:
    store = Store(db)
    store._dbx.conn.execute("PRAGMA busy_timeout=50")
    holder.take()
    with pytest.raises(StoreError, match=r"^state database error: database is locked$"):
        store.add_intent("vm", "create", "/x", 1)
    assert store.get_call(1) is None  # reads still work under another writer (WAL)
    holder.release()
    assert store.add_intent("vm", "create", "/x", 1) > 0  # no transaction left open by the failure
    assert [i.vm_id for i in store.intents()] == ["vm"]


def test_a_store_of_another_schema_is_unusable_not_transient(db: Path) -> None:
    Store(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(StoreUnusable, match="has schema 99, expected 3") as err:
        Store(db)
    assert not isinstance(err.value, TransientError | VmError)


def test_a_corrupt_store_is_unusable_not_transient(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not a database, it is a text file of some length " * 100)
    with pytest.raises(StoreUnusable, match="file is not a database") as err:
        Store(path)
    assert not isinstance(err.value, TransientError | VmError)


def test_other_stores_keep_their_own_error_class_when_locked(tmp_path: Path) -> None:
    """The chain state and the job journal share the database helper; they keep their classes."""
    journal = JobJournal(tmp_path / "journal.sqlite3")
    state = TangleState(tmp_path / "chain.sqlite3")
    for dbx, path, cls in ((journal._dbx, journal.path, JournalError), (state._dbx, state._dbx.path, TangleError)):
        dbx.conn.execute("PRAGMA busy_timeout=50")
        h = Holder(path)
        h.take()
        try:
            with pytest.raises(cls, match="database is locked"):
                with dbx.tx() as conn:
                    conn.execute("SELECT 1")
        finally:
            h.release()
            h.conn.close()
        with dbx.tx() as conn:  # and usable again once the lock is gone
            conn.execute("SELECT 1")


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vms (vm_id TEXT PRIMARY KEY, status TEXT NOT NULL, spec TEXT NOT NULL, workdir TEXT NOT NULL,
                  handle TEXT, error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE history (seq INTEGER PRIMARY KEY AUTOINCREMENT, vm_id TEXT NOT NULL, at REAL NOT NULL,
                      action TEXT NOT NULL, status TEXT NOT NULL, call_id INTEGER, caller TEXT);
INSERT INTO meta VALUES ('schema', '1');
INSERT INTO vms VALUES ('mine', 'running', '{"vcpus":1,"mem_mib":256,"image":"default"}', '/w/a', NULL, NULL, 1, 2);
INSERT INTO vms VALUES ('internal', 'created', '{"vcpus":1,"mem_mib":256,"image":"default"}', '/w/b', NULL, NULL, 1, 1);
INSERT INTO history (vm_id, at, action, status, call_id, caller) VALUES ('mine', 1, 'create', 'created', 3, '0xA');
INSERT INTO history (vm_id, at, action, status, call_id, caller) VALUES ('internal', 1, 'create', 'created', NULL, NULL);
INSERT INTO history (vm_id, at, action, status, call_id, caller) VALUES ('mine', 2, 'start', 'running', 4, '0xB');
"""


async def test_a_schema_1_store_gets_owners_from_the_creating_call(tmp_path: Path) -> None:
    """An existing database (before ownership) opens: each VM belongs to the caller of its first history row."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_1)
    store = Store(path)
    assert {v.vm_id: v.owner for v in store.list_vms()} == {"mine": "0xA", "internal": None}
    store.close()
    store = Store(path)  # opened again: already upgraded, nothing changes
    assert store._read("SELECT value FROM meta WHERE key='schema'") == [("3",)]
    assert store.get_vm("mine") is not None and store.get_vm("mine").owner == "0xA"  # type: ignore[union-attr]
    life = Lifecycle(InMemoryDriver(), store, state_dir=tmp_path / "state")
    with pytest.raises(OwnershipError):
        await life.destroy_vm("mine", Origin(9, "0xB"))  # 0xB only started it
    with pytest.raises(OwnershipError):
        await life.destroy_vm("internal", Origin(10, "0xA"))  # made by the service itself: its owner's only


async def test_a_service_owner_not_known_yet_is_transient_not_a_refusal(tmp_path: Path) -> None:
    """While the chain has not said who owns the service, a non-owner's call is retried, not refused for
    good: nothing is recorded, and once the owner is known the same call id runs."""
    known: list[str] = []

    def service_owner() -> str | None:
        if not known:
            raise TransientError("the owner of service 0 is not known yet")
        return known[0]

    life = Lifecycle(InMemoryDriver(), Store(tmp_path / "s.db"), state_dir=tmp_path / "state",
                     service_owner=service_owner)
    await life.create_vm("vm", None, Origin(1, "0xA"))
    await life.start_vm("vm", Origin(2, "0xA"))  # its owner: the service owner is not asked
    with pytest.raises(TransientError):
        await life.stop_vm("vm", Origin(3, "0xS"))
    assert life.store.get_call(3) is None and len((await life.get_vm("vm")).history) == 2
    known.append("0xs")
    await life.stop_vm("vm", Origin(3, "0xS"))
    assert (await life.get_vm("vm")).status is VmStatus.STOPPED
