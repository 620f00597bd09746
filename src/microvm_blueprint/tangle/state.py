"""Durable chain-side state (its own SQLite file under DATA_DIR): cursor, inbox, outbox.

* **cursor** — the next block the producer scans and the hash of the last block scanned (reorgs).
* **inbox** — every job call seen, inserted in the same transaction that advances the cursor, so a
  call is never missed; the primary key (call id) means it is never handed out twice. A call is
  ``new`` until its outcome is recorded, then ``done`` (or ``superseded``: a reorg gave its id to
  another call before it was handled; it is not run and nothing is sent for it).
* **outbox** — results waiting to reach the chain: ``pending`` -> ``sent`` (tx hash) -> ``done``
  (on-chain, or already there; with the block our transaction was mined in, so a reorg that replaces
  it puts the result back to ``pending``) / ``dropped`` (permanent revert). Marking a call ``done`` in the
  inbox and queueing its result happen in one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from ..sqlitedb import Database
from .calls import JobCall
from .errors import TangleError

log = logging.getLogger(__name__)


def i64(value: int) -> int:
    """uint64 -> SQLite signed INTEGER (two's complement)."""
    return value - (1 << 64) if value >= (1 << 63) else value


def u64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


@dataclass(frozen=True)
class Cursor:
    next_block: int
    last_hash: str | None


@dataclass(frozen=True)
class OutboxRow:
    service_id: int
    call_id: int
    output: bytes
    status: str
    tx_hash: str | None
    attempts: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (
    key TEXT PRIMARY KEY, next_block INTEGER NOT NULL, last_hash TEXT);
CREATE TABLE IF NOT EXISTS inbox (
    call_id INTEGER NOT NULL, service_id INTEGER NOT NULL, job_index INTEGER NOT NULL,
    caller TEXT NOT NULL, inputs BLOB NOT NULL, block_number INTEGER NOT NULL,
    block_hash TEXT NOT NULL, log_index INTEGER NOT NULL, tx_hash TEXT NOT NULL,
    from_quote INTEGER NOT NULL, status TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (service_id, call_id));
CREATE INDEX IF NOT EXISTS inbox_new ON inbox (status, block_number, log_index);
CREATE TABLE IF NOT EXISTS outbox (
    call_id INTEGER NOT NULL, service_id INTEGER NOT NULL, output BLOB NOT NULL,
    status TEXT NOT NULL, tx_hash TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT, at REAL NOT NULL, block INTEGER, PRIMARY KEY (service_id, call_id));
CREATE INDEX IF NOT EXISTS outbox_status ON outbox (status, at);
CREATE TABLE IF NOT EXISTS reorg (
    key TEXT PRIMARY KEY, from_block INTEGER NOT NULL, until_block INTEGER NOT NULL);
"""


class TangleState:
    def __init__(self, path: str | Path) -> None:
        self._dbx = Database(path, _SCHEMA, error=TangleError, what="chain state database")
        self.path = self._dbx.path
        columns = {str(r[1]) for r in self._rows("PRAGMA table_info(outbox)")}
        if "block" not in columns:  # a database from before results recorded their block
            with self._tx() as db:
                db.execute("ALTER TABLE outbox ADD COLUMN block INTEGER")

    def close(self) -> None:
        self._dbx.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._dbx.tx()

    def _rows(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        return self._dbx.rows(sql, args)

    # ---- cursor + inbox ----

    def cursor(self, key: str) -> Cursor | None:
        rows = self._rows("SELECT next_block, last_hash FROM cursor WHERE key=?", (key,))
        if not rows:
            return None
        return Cursor(int(rows[0][0]), str(rows[0][1]) if rows[0][1] else None)  # type: ignore[call-overload]

    def set_cursor(self, key: str, cursor: Cursor) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO cursor (key, next_block, last_hash) VALUES (?,?,?)",
                (key, cursor.next_block, cursor.last_hash),
            )

    def advance(self, key: str, cursor: Cursor, calls: Sequence[JobCall]) -> list[JobCall]:
        """Record new calls and move the cursor, atomically. Returns the calls not seen before."""
        fresh: list[JobCall] = []
        now = time.time()
        with self._tx() as db:
            for c in calls:
                cur = db.execute(
                    "INSERT OR IGNORE INTO inbox (call_id, service_id, job_index, caller, inputs, block_number, "
                    "block_hash, log_index, tx_hash, from_quote, status, at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        i64(c.call_id), i64(c.service_id), c.job_index, c.caller, c.inputs, c.block_number,
                        c.block_hash, c.log_index, c.tx_hash, int(c.from_quote), "new", now,
                    ),
                )
                if cur.rowcount:
                    fresh.append(c)
                    continue
                seen = db.execute(
                    "SELECT tx_hash, inputs, job_index, status FROM inbox WHERE service_id=? AND call_id=?",
                    (i64(c.service_id), i64(c.call_id)),
                ).fetchone()
                if seen is not None and (seen[0] != c.tx_hash or bytes(seen[1]) != c.inputs or seen[2] != c.job_index):
                    # a reorg gave this call id to another call: the first version was handled, and
                    # its result must never answer the new one (not sent, and not sent again when the
                    # reorg's results are reopened)
                    dropped = db.execute(
                        "UPDATE outbox SET status='dropped', reason=? WHERE service_id=? AND call_id=? "
                        "AND status != 'dropped'",
                        ("a reorg gave this call id to another call", i64(c.service_id), i64(c.call_id)),
                    ).rowcount
                    # and if it was not handled yet, it is not run (its call is gone from the chain)
                    db.execute(
                        "UPDATE inbox SET status='superseded' WHERE service_id=? AND call_id=? AND status='new'",
                        (i64(c.service_id), i64(c.call_id)),
                    )
                    log.error(
                        "call %d seen again with different content (tx %s, was %s; reorg?): keeping the first "
                        "(status %s)%s; the new call is not run (set CONFIRMATIONS above the chain's reorg "
                        "depth)", c.call_id, c.tx_hash, seen[0], seen[3],
                        ", its result dropped" if dropped else "", extra={"call_id": c.call_id},
                    )
            db.execute(
                "INSERT OR REPLACE INTO cursor (key, next_block, last_hash) VALUES (?,?,?)",
                (key, cursor.next_block, cursor.last_hash),
            )
        return fresh

    def rewind(self, key: str, service_id: int, to_block: int) -> int:
        """After a reorg noticed at start: scan again from ``to_block`` and forget the calls from there
        on that were not handled yet (the canonical chain decides whether they exist); the results
        mined from there on are reopened once the scan is back (:meth:`rewind_cursor`). Returns how
        many calls were forgotten."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM inbox WHERE service_id=? AND status='new' AND block_number>=?",
                (i64(service_id), to_block),
            )
            self._rewind(db, key, to_block)
            return int(cur.rowcount)

    def unfinished(self) -> list[JobCall]:
        """Calls recorded but not yet handled (a crash or shutdown interrupted them), in chain order."""
        rows = self._rows(
            "SELECT service_id, call_id, job_index, caller, inputs, block_number, block_hash, log_index, tx_hash, "
            "from_quote FROM inbox WHERE status='new' ORDER BY block_number, log_index"
        )
        return [
            JobCall(
                service_id=u64(int(r[0])),  # type: ignore[call-overload]
                call_id=u64(int(r[1])),  # type: ignore[call-overload]
                job_index=int(r[2]),  # type: ignore[call-overload]
                caller=str(r[3]),
                inputs=bytes(r[4]),  # type: ignore[call-overload]
                block_number=int(r[5]),  # type: ignore[call-overload]
                block_hash=str(r[6]),
                log_index=int(r[7]),  # type: ignore[call-overload]
                tx_hash=str(r[8]),
                from_quote=bool(r[9]),
            )
            for r in rows
        ]

    def finish(self, service_id: int, call_id: int, output: bytes | None) -> None:
        """Mark a call handled; queue its result (``None``: failed job, nothing to send). A call a reorg
        superseded (its id given to another call while it ran) queues nothing."""
        with self._tx() as db:
            row = db.execute(
                "SELECT status FROM inbox WHERE service_id=? AND call_id=?", (i64(service_id), i64(call_id))
            ).fetchone()
            if row is not None and row[0] == "superseded":
                return
            db.execute(
                "UPDATE inbox SET status='done' WHERE service_id=? AND call_id=?", (i64(service_id), i64(call_id))
            )
            if output is not None:
                db.execute(
                    "INSERT OR IGNORE INTO outbox (call_id, service_id, output, status, at) VALUES (?,?,?,?,?)",
                    (i64(call_id), i64(service_id), output, "pending", time.time()),
                )

    def call_status(self, service_id: int, call_id: int) -> str | None:
        rows = self._rows(
            "SELECT status FROM inbox WHERE service_id=? AND call_id=?", (i64(service_id), i64(call_id))
        )
        return str(rows[0][0]) if rows else None

    # ---- outbox ----

    def pending(self, limit: int) -> list[OutboxRow]:
        rows = self._rows(
            "SELECT service_id, call_id, output, status, tx_hash, attempts FROM outbox "
            "WHERE status IN ('pending', 'sent') ORDER BY at LIMIT ?",
            (limit,),
        )
        return [
            OutboxRow(
                service_id=u64(int(r[0])),  # type: ignore[call-overload]
                call_id=u64(int(r[1])),  # type: ignore[call-overload]
                output=bytes(r[2]),  # type: ignore[call-overload]
                status=str(r[3]),
                tx_hash=str(r[4]) if r[4] else None,
                attempts=int(r[5]),  # type: ignore[call-overload]
            )
            for r in rows
        ]

    def outbox_status(self, service_id: int, call_id: int) -> tuple[str, str | None] | None:
        rows = self._rows(
            "SELECT status, tx_hash FROM outbox WHERE service_id=? AND call_id=?", (i64(service_id), i64(call_id))
        )
        return (str(rows[0][0]), str(rows[0][1]) if rows[0][1] else None) if rows else None

    def outbox_reason(self, service_id: int, call_id: int) -> str | None:
        rows = self._rows("SELECT reason FROM outbox WHERE service_id=? AND call_id=?", (i64(service_id), i64(call_id)))
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    def mark(self, service_id: int, call_ids: Sequence[int], status: str, *, tx_hash: str | None = None,
             reason: str | None = None, block: int | None = None) -> None:
        """Set the status of these calls' results. ``block``: where our result transaction was mined
        (``done``), so a reorg that replaces that block can send it again (:meth:`rewind_cursor`)."""
        with self._tx() as db:
            for call_id in call_ids:
                db.execute(
                    "UPDATE outbox SET status=?, tx_hash=coalesce(?, tx_hash), reason=?, block=?, "
                    "attempts=attempts + (CASE WHEN ?='sent' THEN 1 ELSE 0 END) WHERE service_id=? AND call_id=?",
                    (status, tx_hash, reason, block, status, i64(service_id), i64(call_id)),
                )

    @staticmethod
    def _rewind(db: sqlite3.Connection, key: str, to_block: int) -> None:
        old = db.execute("SELECT next_block FROM cursor WHERE key=?", (key,)).fetchone()
        until = int(old[0]) if old else to_block
        db.execute("INSERT OR REPLACE INTO cursor (key, next_block, last_hash) VALUES (?,?,?)", (key, to_block, None))
        pending = db.execute("SELECT from_block, until_block FROM reorg WHERE key=?", (key,)).fetchone()
        if pending is not None:  # a reorg during the re-scan of another: cover both
            to_block, until = min(to_block, int(pending[0])), max(until, int(pending[1]))
        db.execute("INSERT OR REPLACE INTO reorg (key, from_block, until_block) VALUES (?,?,?)",
                   (key, to_block, until))

    def rewind_cursor(self, key: str, to_block: int) -> None:
        """A reorg noticed while running: scan again from ``to_block`` (recorded calls stay recorded,
        so none is handed over twice). Results mined from there on may have gone with the replaced
        blocks: they are reopened by :meth:`reopen_due` once the scan is back where it was, so that
        a call id the new blocks gave to another call is known first (its result is then dropped,
        never sent for the other call). Durable: a crash in between reopens at the next start."""
        with self._tx() as db:
            self._rewind(db, key, to_block)

    def reorg_pending(self, key: str) -> bool:
        """Whether a reorg's results are still to be reopened (:meth:`reopen_due`)."""
        return bool(self._rows("SELECT 1 FROM reorg WHERE key=?", (key,)))

    def reopen_due(self, key: str, next_block: int, *, caught_up: bool = False) -> int | None:
        """Called as the cursor moves: once it is back at the block where a reorg was noticed (or at
        the head, ``caught_up``, of a chain that got shorter), results mined in the re-scanned range
        are put back to ``pending`` (the consumer simulates first: one still on the chain is found
        completed and marked done without a transaction; one whose call went too is refused,
        JobCallNotFound, and dropped). Returns how many, or None when no reorg is waiting."""
        with self._tx() as db:
            pending = db.execute("SELECT from_block, until_block FROM reorg WHERE key=?", (key,)).fetchone()
            if pending is None or (next_block < int(pending[1]) and not caught_up):
                return None
            db.execute("DELETE FROM reorg WHERE key=?", (key,))
            cur = db.execute(
                "UPDATE outbox SET status='pending', reason='reorg', block=NULL WHERE status='done' AND block>=?",
                (int(pending[0]),),
            )
            return int(cur.rowcount)
