"""Durable runtime state: SQLite in WAL mode, shared by every adapter.

One row per VM (tombstones kept) with its owner (the caller that created or restored it: DESIGN.md
§9), its snapshots in creation order, an audit trail of every change (and of every refused attempt)
with the call id and caller that caused it, the outcome of every applied call (so a replayed call
is answered with the same result), and intents for steps that live outside SQLite (spawning a VMM,
writing files) so reconciliation at start can finish or undo them.

Every state change is one SQLite transaction. ``path=":memory:"`` gives an ephemeral store.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..sqlitedb import Database
from .errors import QuotaExceeded, StoreUnusable
from .errors import StoreError as StoreError  # re-exported: callers know it as store.StoreError
from .model import (
    HistoryEntry,
    NetworkMode,
    Origin,
    PortMapping,
    SnapshotRecord,
    VmHandle,
    VmNetwork,
    VmSpec,
    VmStatus,
    VmView,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
#: schema versions this code opens, each upgraded in place to SCHEMA_VERSION (1 -> 2: ``vms.owner``;
#: 2 -> 3: ``networks.egress``)
UPGRADABLE = (1, 2)
#: VM views kept between writes (a view is well under 1 KiB)
VIEW_CACHE = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    vm_id       TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    spec        TEXT NOT NULL,
    workdir     TEXT NOT NULL,
    handle      TEXT,
    error       TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    owner       TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id        TEXT NOT NULL,
    snapshot_id  TEXT NOT NULL,
    path         TEXT NOT NULL,
    vm_status    TEXT NOT NULL,
    spec         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    size_bytes   INTEGER NOT NULL,
    UNIQUE (vm_id, snapshot_id)
);
CREATE TABLE IF NOT EXISTS history (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id    TEXT NOT NULL,
    at       REAL NOT NULL,
    action   TEXT NOT NULL,
    status   TEXT NOT NULL,
    call_id  INTEGER,
    caller   TEXT
);
CREATE INDEX IF NOT EXISTS history_vm ON history (vm_id, seq);
CREATE TABLE IF NOT EXISTS calls (
    call_id  INTEGER PRIMARY KEY,
    action   TEXT NOT NULL,
    vm_id    TEXT,
    ok       INTEGER NOT NULL,
    error    TEXT,
    at       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS networks (
    vm_id    TEXT PRIMARY KEY,
    mode     TEXT NOT NULL,
    egress   TEXT
);
CREATE TABLE IF NOT EXISTS ports (
    vm_id       TEXT NOT NULL,
    guest_port  INTEGER NOT NULL,
    host        TEXT NOT NULL,
    host_port   INTEGER NOT NULL,
    PRIMARY KEY (vm_id, guest_port),
    UNIQUE (host, host_port)
);
CREATE TABLE IF NOT EXISTS bridge_slots (
    vm_id  TEXT PRIMARY KEY,
    pool   TEXT NOT NULL,
    slot   INTEGER NOT NULL,
    UNIQUE (pool, slot)
);
CREATE TABLE IF NOT EXISTS vmm_uids (
    vm_id  TEXT PRIMARY KEY,
    uid    INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS intents (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id    TEXT NOT NULL,
    action   TEXT NOT NULL,
    path     TEXT NOT NULL,
    call_id  INTEGER,
    at       REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StoredVm:
    vm_id: str
    status: VmStatus
    spec: VmSpec
    workdir: str
    handle: VmHandle | None
    error: str | None
    created_at: float
    updated_at: float
    owner: str | None = None  # the caller that created or restored it; None: the service itself


@dataclass(frozen=True)
class CallOutcome:
    call_id: int
    action: str
    vm_id: str | None
    ok: bool
    error: str | None


@dataclass(frozen=True)
class HistoryEvent:
    """One row of the audit trail with its place in it (``seq`` grows with every change)."""

    seq: int
    vm_id: str
    at: float
    action: str
    status: VmStatus
    call_id: int | None
    caller: str | None


#: called after each committed write with the VMs it touched (``None``: not known, maybe any)
WriteListener = Callable[[tuple[str, ...] | None], None]


@dataclass(frozen=True)
class Intent:
    seq: int
    vm_id: str
    action: str
    path: str
    call_id: int | None


class Store:
    """Synchronous SQLite store; cheap enough to call from the event loop (WAL, NORMAL sync)."""

    def __init__(self, path: str | Path) -> None:
        """Open (or create) the store. A locked or failing database raises :class:`StoreError`
        (transient: retried, never a call's outcome); a corrupt one, or one of another schema,
        :class:`StoreUnusable`."""
        self._dbx = Database(path, _SCHEMA, error=StoreUnusable, transient=StoreError, what="state database")
        self.path = self._dbx.path
        self._views: OrderedDict[str, VmView] = OrderedDict()  # kept read models (vm_view)
        self._listeners: list[WriteListener] = []
        row = self._read("SELECT value FROM meta WHERE key='schema'")
        if not row:
            with self._tx() as db:
                self._upgrade(db)  # a fresh file has the column; a file without a version row may not
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(str(row[0][0])) in UPGRADABLE:
            with self._tx() as db:
                self._upgrade(db)
                db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif int(str(row[0][0])) != SCHEMA_VERSION:
            raise StoreUnusable(f"state database {self.path} has schema {row[0][0]}, expected {SCHEMA_VERSION}")

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        """Schema 1 -> 2 -> 3, in the caller's transaction and guarded (safe to run twice): add
        ``vms.owner`` and fill it from each VM's first history row (its create or restore, which
        recorded the caller); add ``networks.egress``, NULL in the rows already there (the policy they
        were created under was not recorded: reconciliation fills it in, :meth:`unrecorded_egress`)."""
        columns = {str(r[1]) for r in db.execute("PRAGMA table_info(vms)")}
        if "owner" not in columns:
            db.execute("ALTER TABLE vms ADD COLUMN owner TEXT")
            db.execute(
                "UPDATE vms SET owner=(SELECT caller FROM history h WHERE h.vm_id=vms.vm_id ORDER BY seq LIMIT 1)"
            )
        if "egress" not in {str(r[1]) for r in db.execute("PRAGMA table_info(networks)")}:
            db.execute("ALTER TABLE networks ADD COLUMN egress TEXT")

    def close(self) -> None:
        self._dbx.close()

    # ---- change notification (the query API's waits and event stream) ---------------------------

    def add_listener(self, listener: WriteListener) -> None:
        """Call ``listener(vm_ids)`` after every committed write, in the writing thread, with the VMs
        whose view it may have changed (``None``: not known). It must be quick and must not write; an
        exception from it is logged, never raised into the write."""
        self._listeners.append(listener)

    def remove_listener(self, listener: WriteListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, touches: tuple[str, ...] | None) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(touches)
            except Exception:  # a broken listener must not fail a change already committed
                log.exception("store write listener failed")

    def last_event_seq(self) -> int:
        """The ``seq`` of the newest history row (0 when there is none)."""
        seq: int = self._read("SELECT coalesce(max(seq), 0) FROM history")[0][0]  # type: ignore[assignment]
        return seq

    def events_after(
        self, seq: int, *, limit: int, vm_id: str | None = None, newest: bool = False
    ) -> list[HistoryEvent]:
        """History rows with ``seq`` above ``seq`` in order, at most ``limit`` (the first ones, or with
        ``newest`` the last ones), of one VM if given."""
        sql = "SELECT seq, vm_id, at, action, status, call_id, caller FROM history WHERE seq > ?"
        args: tuple[object, ...] = (seq,)
        if vm_id is not None:
            sql += " AND vm_id = ?"
            args += (vm_id,)
        rows = self._read(sql + f" ORDER BY seq {'DESC' if newest else ''} LIMIT ?", (*args, limit))
        return [
            HistoryEvent(
                seq=int(r[0]),  # type: ignore[call-overload]
                vm_id=str(r[1]),
                at=float(r[2]),  # type: ignore[arg-type]
                action=str(r[3]),
                status=VmStatus(str(r[4])),
                call_id=_u64(r[5]),
                caller=str(r[6]) if r[6] is not None else None,
            )
            for r in (reversed(rows) if newest else rows)
        ]

    @contextmanager
    def _tx(self, touches: tuple[str, ...] | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``touches``: the VMs whose view it may change (only their kept
        views are dropped); ``None`` when that is not known, and every kept view is dropped."""
        with self._dbx.lock:  # the views change with the rows, as one step to a reader
            try:
                with self._dbx.tx() as db:
                    yield db
            finally:
                if touches is None:
                    self._views.clear()
                for vm_id in touches or ():
                    self._views.pop(vm_id, None)
        if touches != () and self._listeners:  # committed (an exception skips this)
            self._notify(touches)

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return self._dbx.rows(sql, args)

    # ---- VMs -------------------------------------------------------------------------------

    @staticmethod
    def _vm(row: tuple[object, ...]) -> StoredVm:
        vm_id, status, spec, workdir, handle, error, created_at, updated_at, owner = row
        return StoredVm(
            vm_id=str(vm_id),
            status=VmStatus(str(status)),
            spec=_spec(str(spec)),
            workdir=str(workdir),
            handle=VmHandle.from_json(json.loads(str(handle))) if handle else None,
            error=str(error) if error is not None else None,
            created_at=float(created_at),  # type: ignore[arg-type]
            updated_at=float(updated_at),  # type: ignore[arg-type]
            owner=str(owner) if owner is not None else None,
        )

    _VM_COLS = "vm_id, status, spec, workdir, handle, error, created_at, updated_at, owner"

    def get_vm(self, vm_id: str) -> StoredVm | None:
        rows = self._read(f"SELECT {self._VM_COLS} FROM vms WHERE vm_id=?", (vm_id,))
        return self._vm(rows[0]) if rows else None

    def list_vms(self, *, limit: int | None = None, after: str | None = None) -> list[StoredVm]:
        return [self._vm(r) for r in self._page(self._VM_COLS, limit, after)]

    def _page(self, cols: str, limit: int | None, after: str | None) -> list[tuple[object, ...]]:
        """``cols`` of the VMs after ``after`` in ``vm_id`` order, at most ``limit`` of them."""
        sql = f"SELECT {cols} FROM vms"
        args: list[object] = []
        if after is not None:
            sql += " WHERE vm_id > ?"
            args.append(after)
        sql += " ORDER BY vm_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._read(sql, tuple(args))

    # ---- read models (the query API's hot path: no handle, no workdir, few statements) ----------

    _VIEW_COLS = "vm_id, status, spec, error, created_at, updated_at, owner"

    def vm_view(self, vm_id: str) -> VmView | None:
        """One VM as the query API shows it, with snapshots and history; ``None`` if unknown.

        Views are kept (``VIEW_CACHE`` of them, least recently used out) until a write that may
        change that VM (a write that does not say which VMs it changes drops them all): polling a VM
        costs a dictionary lookup, not three statements, even while jobs change other VMs. Unknown
        ids are not kept (they cost memory to anyone who asks).
        """
        with self._dbx.lock:  # no write between reading the rows and keeping the view
            view = self._views.get(vm_id)
            if view is not None:
                self._views.move_to_end(vm_id)
                return view
            rows = self._read(f"SELECT {self._VIEW_COLS} FROM vms WHERE vm_id=?", (vm_id,))
            if not rows:
                return None
            snaps = self._read("SELECT snapshot_id FROM snapshots WHERE vm_id=? ORDER BY seq", (vm_id,))
            view = self._view(rows[0], tuple(str(r[0]) for r in snaps), tuple(self.history(vm_id)))
            view = dataclasses.replace(view, network=self.network(vm_id))
            self._views[vm_id] = view
            if len(self._views) > VIEW_CACHE:
                self._views.popitem(last=False)
            return view

    def vm_views(self, *, limit: int | None = None, after: str | None = None) -> list[VmView]:
        """A page of VMs in ``vm_id`` order, with snapshot ids and no history: two statements for the
        page, not one per VM."""
        rows = self._page(self._VIEW_COLS, limit, after)
        snaps: dict[str, list[str]] = {}
        if rows:
            first, last = str(rows[0][0]), str(rows[-1][0])
            for vm_id, snapshot_id in self._read(
                "SELECT vm_id, snapshot_id FROM snapshots WHERE vm_id BETWEEN ? AND ? ORDER BY seq", (first, last)
            ):
                snaps.setdefault(str(vm_id), []).append(str(snapshot_id))
            nets = self._networks(first, last)
        else:
            nets = {}
        return [
            dataclasses.replace(self._view(r, tuple(snaps.get(str(r[0]), ())), ()), network=nets[str(r[0])])
            if str(r[0]) in nets
            else self._view(r, tuple(snaps.get(str(r[0]), ())), ())
            for r in rows
        ]

    # ---- networks and published ports (DESIGN.md §8) ------------------------------------------

    def _networks(self, first: str, last: str) -> dict[str, VmNetwork]:
        """The recorded networks of the VMs with ids in ``[first, last]``: two statements."""
        modes = {
            str(v): (NetworkMode(str(m)), e == "allow")  # NULL (not recorded yet): deny
            for v, m, e in self._read(
                "SELECT vm_id, mode, egress FROM networks WHERE vm_id BETWEEN ? AND ?", (first, last)
            )
        }
        ports: dict[str, list[PortMapping]] = {}
        for vm_id, guest, host, host_port in self._read(
            "SELECT vm_id, guest_port, host, host_port FROM ports WHERE vm_id BETWEEN ? AND ? "
            "ORDER BY vm_id, guest_port",
            (first, last),
        ):
            ports.setdefault(str(vm_id), []).append(PortMapping(int(guest), str(host), int(host_port)))  # type: ignore[call-overload]
        return {v: VmNetwork(mode=m, ports=tuple(ports.get(v, ())), egress=e) for v, (m, e) in modes.items()}

    def network(self, vm_id: str) -> VmNetwork:
        """A VM's network: its mode, the host ports it holds (none once destroyed) and its egress policy."""
        return self._networks(vm_id, vm_id).get(vm_id, VmNetwork())

    def reserve_network(
        self,
        vm_id: str,
        mode: NetworkMode,
        guest_ports: Sequence[int],
        *,
        host: str,
        port_range: tuple[int, int],
        is_free: Callable[[str, int], bool],
        egress: bool = False,
    ) -> VmNetwork:
        """Record ``vm_id``'s network (with its egress policy, which it keeps for life) and take a host
        port for each guest port, in one transaction.

        Ports never collide: one a VM (the table's UNIQUE constraint) and none that ``is_free`` says
        something else on the host listens on. Called before the VMM is spawned (it needs the ports);
        :meth:`release_network` gives them back if the create fails, and :meth:`drop_orphan_networks`
        at start if the operator died in between. Raises :class:`QuotaExceeded` when the range is full.
        """
        lo, hi = port_range
        span = hi - lo + 1
        with self._tx((vm_id,)) as db:
            db.execute("DELETE FROM ports WHERE vm_id=?", (vm_id,))
            db.execute("INSERT OR REPLACE INTO networks (vm_id, mode, egress) VALUES (?, ?, ?)",
                       (vm_id, mode.value, "allow" if egress else "deny"))
            taken = {int(r[0]) for r in db.execute("SELECT host_port FROM ports WHERE host=?", (host,))}
            # start where the last allocation stopped, so a port just released is not handed out at once
            start = int(db.execute("SELECT coalesce(max(host_port), ?) FROM ports WHERE host=?", (lo - 1, host))
                        .fetchone()[0]) + 1 - lo
            mapped: list[PortMapping] = []
            tried = 0
            for guest in sorted(set(guest_ports)):
                while True:
                    if tried >= span:
                        raise QuotaExceeded(
                            f"quota exceeded: no free host port left in {lo}-{hi} on {host}"
                        )
                    candidate = lo + (start + tried) % span
                    tried += 1
                    if candidate in taken or not is_free(host, candidate):
                        continue
                    taken.add(candidate)
                    mapped.append(PortMapping(guest, host, candidate))
                    db.execute(
                        "INSERT INTO ports (vm_id, guest_port, host, host_port) VALUES (?,?,?,?)",
                        (vm_id, guest, host, candidate),
                    )
                    break
        return VmNetwork(mode=mode, ports=tuple(mapped), egress=egress)

    def unrecorded_egress(self) -> set[str]:
        """VMs whose network row predates schema 3 (no egress policy recorded: read as deny)."""
        return {str(r[0]) for r in self._read("SELECT vm_id FROM networks WHERE egress IS NULL")}

    def record_egress(self, vm_id: str, egress: bool) -> None:
        """Record the egress policy of a VM whose row had none (:meth:`unrecorded_egress`)."""
        with self._tx((vm_id,)) as db:
            db.execute("UPDATE networks SET egress=? WHERE vm_id=? AND egress IS NULL",
                       ("allow" if egress else "deny", vm_id))

    def release_network(self, vm_id: str, *, forget: bool = False) -> None:
        """Give ``vm_id``'s host ports back (destroy); ``forget`` also drops its mode (an undone create)."""
        with self._tx((vm_id,)) as db:
            db.execute("DELETE FROM ports WHERE vm_id=?", (vm_id,))
            if forget:
                db.execute("DELETE FROM networks WHERE vm_id=?", (vm_id,))

    def drop_orphan_networks(self) -> int:
        """Release what a create or restore reserved before the operator died (no VM row): at start."""
        with self._tx() as db:
            gone = db.execute("DELETE FROM ports WHERE vm_id NOT IN (SELECT vm_id FROM vms)").rowcount
            db.execute("DELETE FROM networks WHERE vm_id NOT IN (SELECT vm_id FROM vms)")
        return int(gone)

    # ---- bridge networking: one /30 of the pool per VM (DESIGN.md §10) -------------------------

    def take_bridge_slot(self, vm_id: str, pool: str, slots: int) -> int:
        """``vm_id``'s /30 slot in ``pool`` (``slots`` of them): the one it holds, else the lowest free.
        Recorded before any network object exists, so every one the operator makes has a row that
        destroy, an undone create or reconciliation tears down (:meth:`bridge_slots`). Raises
        :class:`QuotaExceeded` when the pool is full."""
        with self._tx(()) as db:
            row = db.execute("SELECT slot FROM bridge_slots WHERE vm_id=? AND pool=?", (vm_id, pool)).fetchone()
            if row is not None:
                return int(row[0])
            db.execute("DELETE FROM bridge_slots WHERE vm_id=?", (vm_id,))
            free = _lowest_free(db, "bridge_slots", "slot", 0, slots - 1, pool=pool)
            if free is None:
                raise QuotaExceeded(f"quota exceeded: MICROVM_BRIDGE_POOL {pool} has no free /30 left")
            db.execute("INSERT INTO bridge_slots (vm_id, pool, slot) VALUES (?,?,?)", (vm_id, pool, free))
            return free

    def bridge_slots(self) -> dict[str, tuple[str, int]]:
        """Every VM holding a slot: ``vm_id -> (pool, slot)``."""
        return {str(v): (str(p), int(s)) for v, p, s in self._read("SELECT vm_id, pool, slot FROM bridge_slots")}  # type: ignore[call-overload]

    def release_bridge_slot(self, vm_id: str) -> None:
        """Give the slot back (after its network objects are gone)."""
        with self._tx(()) as db:
            db.execute("DELETE FROM bridge_slots WHERE vm_id=?", (vm_id,))

    # ---- a uid (and gid) of its own per VMM (DESIGN.md §9) ---------------------------------------

    def take_vmm_uid(self, vm_id: str, uid_range: tuple[int, int]) -> int:
        """``vm_id``'s VMM uid in ``uid_range`` (inclusive): the one it holds, else the lowest no VM holds.
        Recorded before the VMM exists, so destroy, an undone create or reconciliation gives it back
        (:meth:`release_vmm_uid`, :meth:`drop_orphan_vmm_uids`); while recorded, no other VM gets it.
        Raises :class:`QuotaExceeded` when every uid of the range is held (nothing recorded then)."""
        lo, hi = uid_range
        with self._tx(()) as db:
            row = db.execute("SELECT uid FROM vmm_uids WHERE vm_id=?", (vm_id,)).fetchone()
            if row is not None and lo <= int(row[0]) <= hi:
                return int(row[0])
            db.execute("DELETE FROM vmm_uids WHERE vm_id=?", (vm_id,))
            free = _lowest_free(db, "vmm_uids", "uid", lo, hi)
            if free is None:
                raise QuotaExceeded(f"quota exceeded: MICROVM_VMM_UID_RANGE {lo}-{hi} has no free uid left "
                                    f"({hi - lo + 1} VMs hold one each)")
            db.execute("INSERT INTO vmm_uids (vm_id, uid) VALUES (?, ?)", (vm_id, free))
            return free

    def vmm_uid(self, vm_id: str) -> int | None:
        """The uid ``vm_id``'s VMM runs as; ``None``: none of its own (a VM from before per-VM uids, or
        an operator that does not switch users): the shared VMM user."""
        rows = self._read("SELECT uid FROM vmm_uids WHERE vm_id=?", (vm_id,))
        return int(rows[0][0]) if rows else None  # type: ignore[call-overload]

    def vmm_uids(self) -> dict[str, int]:
        """Every VM holding a uid: ``vm_id -> uid``."""
        return {str(v): int(u) for v, u in self._read("SELECT vm_id, uid FROM vmm_uids")}  # type: ignore[call-overload]

    def release_vmm_uid(self, vm_id: str) -> None:
        """Give the uid back (its VMM gone and its folder removed): the next VM may get it."""
        with self._tx(()) as db:
            db.execute("DELETE FROM vmm_uids WHERE vm_id=?", (vm_id,))

    def drop_orphan_vmm_uids(self) -> int:
        """At start: release the uids of VMs destroyed, or never recorded (the operator died between taking
        the uid and recording the VM)."""
        with self._tx(()) as db:
            gone = db.execute(
                "DELETE FROM vmm_uids WHERE vm_id NOT IN (SELECT vm_id FROM vms WHERE status != ?)",
                (VmStatus.DESTROYED.value,),
            ).rowcount
        return int(gone)

    @staticmethod
    def _view(row: tuple[object, ...], snapshots: tuple[str, ...], history: tuple[HistoryEntry, ...]) -> VmView:
        vm_id, status, spec, error, created_at, updated_at, owner = row
        return VmView(
            vm_id=str(vm_id),
            status=VmStatus(str(status)),
            spec=_spec(str(spec)),
            snapshots=snapshots,
            created_at=float(created_at),  # type: ignore[arg-type]
            updated_at=float(updated_at),  # type: ignore[arg-type]
            error=str(error) if error is not None else None,
            history=history,
            owner=str(owner) if owner is not None else None,
        )

    def status_counts(self) -> dict[str, int]:
        """Number of VMs in each status (the metrics' ``microvm_vms``); statuses with none are absent."""
        return {str(status): int(n) for status, n in self._read("SELECT status, count(*) FROM vms GROUP BY status")}  # type: ignore[call-overload]

    def usage(self) -> tuple[int, int, int]:
        """(live VM count, their total guest memory MiB, total snapshot bytes)."""
        live = self._read(
            "SELECT count(*), coalesce(sum(json_extract(spec, '$.mem_mib')), 0) FROM vms "
            "WHERE status NOT IN ('destroyed', 'failed')"
        )[0]
        snap = self._read("SELECT coalesce(sum(size_bytes), 0) FROM snapshots")[0]
        return int(live[0]), int(live[1]), int(snap[0])  # type: ignore[call-overload]

    def usage_of(self, owner: str) -> tuple[int, int, int]:
        """:meth:`usage` of what ``owner`` owns, whatever the letter case: its live VMs, and the snapshots
        of every VM it owns (a destroyed VM's too, as long as they are kept)."""
        key = owner.lower()
        live = self._read(
            "SELECT count(*), coalesce(sum(json_extract(spec, '$.mem_mib')), 0) FROM vms "
            "WHERE status NOT IN ('destroyed', 'failed') AND lower(owner)=?", (key,)
        )[0]
        snap = self._read(
            "SELECT coalesce(sum(s.size_bytes), 0) FROM snapshots s JOIN vms v ON v.vm_id=s.vm_id "
            "WHERE lower(v.owner)=?", (key,)
        )[0]
        return int(live[0]), int(live[1]), int(snap[0])  # type: ignore[call-overload]

    def insert_vm(
        self,
        vm_id: str,
        status: VmStatus,
        spec: VmSpec,
        workdir: str,
        handle: VmHandle | None,
        origin: Origin,
        action: str,
        *,
        intent: int | None = None,
    ) -> None:
        now = time.time()
        with self._tx((vm_id,)) as db:  # the VM belongs to the caller that creates (or restores) it
            db.execute(
                f"INSERT INTO vms ({self._VM_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (vm_id, status.value, json.dumps(spec.to_json()), workdir, _handle(handle), None, now, now,
                 origin.caller),
            )
            self._history(db, vm_id, now, action, status, origin)
            self._call_ok(db, origin, action, vm_id, now)
            if intent is not None:
                db.execute("DELETE FROM intents WHERE seq=?", (intent,))

    def update_vm(
        self,
        vm_id: str,
        status: VmStatus,
        origin: Origin,
        action: str,
        *,
        handle: VmHandle | bool | None = False,
        error: str | None = None,
        intent: int | None = None,
        call_ok: bool = True,
    ) -> None:
        """Set a VM's status (and its handle unless ``handle`` is False), recording the change.

        ``call_ok=False`` records the change in the history without marking the call as applied
        (a call that failed but changed the VM, e.g. a boot that missed its deadline)."""
        now = time.time()
        with self._tx((vm_id,)) as db:
            if handle is False:
                db.execute(
                    "UPDATE vms SET status=?, error=?, updated_at=? WHERE vm_id=?",
                    (status.value, error, now, vm_id),
                )
            else:
                db.execute(
                    "UPDATE vms SET status=?, error=?, updated_at=?, handle=? WHERE vm_id=?",
                    (status.value, error, now, _handle(handle if isinstance(handle, VmHandle) else None), vm_id),
                )
            if status is VmStatus.DESTROYED:  # a tombstone holds no host port
                db.execute("DELETE FROM ports WHERE vm_id=?", (vm_id,))
            self._history(db, vm_id, now, action, status, origin)
            if call_ok:
                self._call_ok(db, origin, action, vm_id, now)
            if intent is not None:
                db.execute("DELETE FROM intents WHERE seq=?", (intent,))

    def record_refusal(self, vm_id: str, status: VmStatus, origin: Origin, job: str) -> None:
        """Put a refused attempt on ``vm_id``'s audit trail (action ``refused:<job>``, the caller, the call
        id); the VM itself is unchanged. The call's failure is recorded apart (:meth:`record_failure`)."""
        with self._tx((vm_id,)) as db:
            self._history(db, vm_id, time.time(), f"refused:{job}", status, origin)

    def history(self, vm_id: str) -> list[HistoryEntry]:
        rows = self._read(
            "SELECT at, action, status, call_id, caller FROM history WHERE vm_id=? ORDER BY seq", (vm_id,)
        )
        return [
            HistoryEntry(
                at=float(r[0]),  # type: ignore[arg-type]
                action=str(r[1]),
                status=VmStatus(str(r[2])),
                call_id=_u64(r[3]),
                caller=str(r[4]) if r[4] is not None else None,
            )
            for r in rows
        ]

    # ---- snapshots ---------------------------------------------------------------------------

    @staticmethod
    def _snap(row: tuple[object, ...]) -> SnapshotRecord:
        vm_id, snapshot_id, path, vm_status, spec, created_at, size_bytes = row
        return SnapshotRecord(
            vm_id=str(vm_id),
            snapshot_id=str(snapshot_id),
            path=str(path),
            vm_status=VmStatus(str(vm_status)),
            spec=_spec(str(spec)),
            created_at=float(created_at),  # type: ignore[arg-type]
            size_bytes=int(size_bytes),  # type: ignore[call-overload]
        )

    _SNAP_COLS = "vm_id, snapshot_id, path, vm_status, spec, created_at, size_bytes"

    def list_snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        rows = self._read(f"SELECT {self._SNAP_COLS} FROM snapshots WHERE vm_id=? ORDER BY seq", (vm_id,))
        return [self._snap(r) for r in rows]

    def get_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord | None:
        rows = self._read(
            f"SELECT {self._SNAP_COLS} FROM snapshots WHERE vm_id=? AND snapshot_id=?", (vm_id, snapshot_id)
        )
        return self._snap(rows[0]) if rows else None

    def all_snapshot_paths(self) -> set[str]:
        return {str(r[0]) for r in self._read("SELECT path FROM snapshots")}

    def add_snapshot(self, snap: SnapshotRecord, origin: Origin, *, intent: int | None = None) -> None:
        with self._tx((snap.vm_id,)) as db:
            db.execute(
                f"INSERT INTO snapshots ({self._SNAP_COLS}) VALUES (?,?,?,?,?,?,?)",
                (
                    snap.vm_id,
                    snap.snapshot_id,
                    snap.path,
                    snap.vm_status.value,
                    json.dumps(snap.spec.to_json()),
                    snap.created_at,
                    snap.size_bytes,
                ),
            )
            status = db.execute("SELECT status FROM vms WHERE vm_id=?", (snap.vm_id,)).fetchone()[0]
            self._history(db, snap.vm_id, snap.created_at, "snapshot", VmStatus(status), origin)
            self._call_ok(db, origin, "snapshot_vm", snap.vm_id, snap.created_at)
            if intent is not None:
                db.execute("DELETE FROM intents WHERE seq=?", (intent,))

    def delete_snapshot(self, vm_id: str, snapshot_id: str, origin: Origin) -> None:
        now = time.time()
        with self._tx((vm_id,)) as db:
            db.execute("DELETE FROM snapshots WHERE vm_id=? AND snapshot_id=?", (vm_id, snapshot_id))
            status = db.execute("SELECT status FROM vms WHERE vm_id=?", (vm_id,)).fetchone()[0]
            self._history(db, vm_id, now, "delete_snapshot", VmStatus(status), origin)
            self._call_ok(db, origin, "delete_snapshot", vm_id, now)

    # ---- calls (replay detection) -------------------------------------------------------------

    def get_call(self, call_id: int) -> CallOutcome | None:
        rows = self._read("SELECT call_id, action, vm_id, ok, error FROM calls WHERE call_id=?", (_i64(call_id),))
        if not rows:
            return None
        r = rows[0]
        return CallOutcome(
            call_id=_u64(r[0]) or 0,
            action=str(r[1]),
            vm_id=str(r[2]) if r[2] is not None else None,
            ok=bool(r[3]),
            error=str(r[4]) if r[4] is not None else None,
        )

    def record_failure(self, origin: Origin, action: str, vm_id: str | None, error: str) -> None:
        """Record that a call failed, so a replay answers the same error. Changes nothing else."""
        if origin.call_id is None:
            return
        with self._tx(()) as db:  # the calls table: no view shows it
            db.execute(
                "INSERT OR IGNORE INTO calls (call_id, action, vm_id, ok, error, at) VALUES (?,?,?,?,?,?)",
                (_i64(origin.call_id), action, vm_id, 0, error, time.time()),
            )

    # ---- intents -------------------------------------------------------------------------------

    def add_intent(self, vm_id: str, action: str, path: str, call_id: int | None) -> int:
        with self._tx(()) as db:  # intents: no view shows them
            cur = db.execute(
                "INSERT INTO intents (vm_id, action, path, call_id, at) VALUES (?,?,?,?,?)",
                (vm_id, action, path, _i64(call_id), time.time()),
            )
            return int(cur.lastrowid or 0)

    def drop_intent(self, seq: int) -> None:
        with self._tx(()) as db:
            db.execute("DELETE FROM intents WHERE seq=?", (seq,))

    def intents(self) -> list[Intent]:
        rows = self._read("SELECT seq, vm_id, action, path, call_id FROM intents ORDER BY seq")
        return [
            Intent(
                seq=int(r[0]),  # type: ignore[call-overload]
                vm_id=str(r[1]),
                action=str(r[2]),
                path=str(r[3]),
                call_id=_u64(r[4]),
            )
            for r in rows
        ]

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _history(
        db: sqlite3.Connection, vm_id: str, at: float, action: str, status: VmStatus, origin: Origin
    ) -> None:
        db.execute(
            "INSERT INTO history (vm_id, at, action, status, call_id, caller) VALUES (?,?,?,?,?,?)",
            (vm_id, at, action, status.value, _i64(origin.call_id), origin.caller),
        )

    @staticmethod
    def _call_ok(db: sqlite3.Connection, origin: Origin, action: str, vm_id: str, at: float) -> None:
        if origin.call_id is not None:
            db.execute(
                "INSERT OR REPLACE INTO calls (call_id, action, vm_id, ok, error, at) VALUES (?,?,?,?,?,?)",
                (_i64(origin.call_id), action, vm_id, 1, None, at),
            )


def _i64(call_id: int | None) -> int | None:
    """uint64 call id -> SQLite's signed 64-bit INTEGER (two's complement)."""
    if call_id is None:
        return None
    return call_id - (1 << 64) if call_id >= (1 << 63) else call_id


def _lowest_free(db: sqlite3.Connection, table: str, column: str, lo: int, hi: int, *,
                 pool: str | None = None) -> int | None:
    """The lowest value of ``column`` in ``[lo, hi]`` that no row of ``table`` (of ``pool``, when given)
    holds: ``lo`` itself, or one above a held value whose successor is free; ``None`` when every value
    is held. One query, inside the caller's transaction. ``table`` and ``column`` are this module's own
    names, never input."""
    mine, args = ("pool=? AND ", (pool,)) if pool is not None else ("", ())
    same = "b.pool=a.pool AND " if pool is not None else ""
    row = db.execute(
        f"SELECT ? WHERE ? <= ? AND NOT EXISTS (SELECT 1 FROM {table} WHERE {mine}{column}=?) UNION ALL "
        f"SELECT a.{column} + 1 FROM {table} a WHERE {mine}a.{column} + 1 BETWEEN ? AND ? AND NOT EXISTS "
        f"(SELECT 1 FROM {table} b WHERE {same}b.{column}=a.{column} + 1) ORDER BY 1 LIMIT 1",
        (lo, lo, hi, *args, lo, *args, lo, hi),
    ).fetchone()
    return None if row is None else int(row[0])


@functools.lru_cache(maxsize=256)
def _spec(text: str) -> VmSpec:
    """A spec column parsed once per distinct text (most VMs share a few specs; VmSpec is frozen)."""
    return VmSpec.from_json(json.loads(text))


def _u64(value: object) -> int | None:
    if value is None:
        return None
    v: int = int(value)  # type: ignore[call-overload]
    return v + (1 << 64) if v < 0 else v


def _handle(handle: VmHandle | None) -> str | None:
    return json.dumps(handle.to_json()) if handle is not None else None
