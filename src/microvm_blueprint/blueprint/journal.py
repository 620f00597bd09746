"""The job journal: what became of every job call, for ``GET /jobs/{call_id}``.

Failed jobs are never written on-chain (blueprint-sdk has no error result), so this is where a
customer learns why no result came. Fed by the runner's ``JobObserver`` callbacks; SQLite, WAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import MicrovmBlueprintError
from ..sqlitedb import Database

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


def _i64(call_id: int) -> int:
    """uint64 call id -> SQLite's signed 64-bit INTEGER (two's complement), and back."""
    return call_id - (1 << 64) if call_id >= (1 << 63) else call_id


def _u64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (call_id INTEGER PRIMARY KEY, job TEXT NOT NULL, job_index INTEGER NOT NULL,
    status TEXT NOT NULL, caller TEXT, received_at REAL NOT NULL, finished_at REAL, error TEXT, result_tx TEXT);
"""


class JournalError(MicrovmBlueprintError):
    """The job journal database is unusable."""


class JobStatus(str, Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class JobEntry:
    call_id: int
    job: str
    job_index: int
    status: JobStatus
    caller: str | None
    received_at: float
    finished_at: float | None
    error: str | None
    result_tx: str | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "call_id": self.call_id,
            "job": self.job,
            "job_index": self.job_index,
            "status": self.status.value,
            "caller": self.caller,
            "received_at": self.received_at,
            "finished_at": self.finished_at,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.result_tx is not None:
            out["result_tx"] = self.result_tx
        return out


class JobJournal:
    def __init__(self, path: str | Path) -> None:
        self._dbx = Database(path, _SCHEMA, error=JournalError, what="job journal")
        self.path = self._dbx.path
        self._listeners: list[Callable[[int], None]] = []

    def close(self) -> None:
        self._dbx.close()

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(call_id)`` after each committed change to that call's entry (``GET
        /jobs/{call_id}/wait``). It must be quick; an exception from it is logged, not raised."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int], None]) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _write(self, call_id: int, sql: str, args: tuple[object, ...]) -> None:
        with self._dbx.tx() as db:
            db.execute(sql, args)
        for listener in tuple(self._listeners):
            try:
                listener(call_id)
            except Exception:
                log.exception("job journal listener failed")

    def received(self, call_id: int, job: str, job_index: int, caller: str | None) -> None:
        self._write(
            call_id,
            "INSERT OR IGNORE INTO jobs (call_id, job, job_index, status, caller, received_at) "
            "VALUES (?,?,?,?,?,?)",
            (_i64(call_id), job, job_index, JobStatus.PENDING.value, caller, time.time()),
        )

    def finished(self, call_id: int, *, error: str | None) -> None:
        status = JobStatus.FAILED if error is not None else JobStatus.DONE
        self._write(
            call_id,
            "UPDATE jobs SET status=?, error=?, finished_at=? WHERE call_id=?",
            (status.value, error[:MAX_ERROR_CHARS] if error else None, time.time(), _i64(call_id)),
        )

    def submitted(self, call_id: int, tx_hash: str) -> None:
        self._write(call_id, "UPDATE jobs SET result_tx=? WHERE call_id=?", (tx_hash, _i64(call_id)))

    def dropped(self, call_id: int, reason: str) -> None:
        self._write(
            call_id,
            "UPDATE jobs SET error=coalesce(error, ?) WHERE call_id=?",
            (f"result not accepted on-chain: {reason}"[:MAX_ERROR_CHARS], _i64(call_id)),
        )

    def get(self, call_id: int) -> JobEntry | None:
        rows = self._dbx.rows(
            "SELECT call_id, job, job_index, status, caller, received_at, finished_at, error, result_tx "
            "FROM jobs WHERE call_id=?",
            (_i64(call_id),),
        )
        if not rows:
            return None
        row: tuple[Any, ...] = rows[0]
        return JobEntry(
            call_id=_u64(row[0]),
            job=row[1],
            job_index=row[2],
            status=JobStatus(row[3]),
            caller=row[4],
            received_at=row[5],
            finished_at=row[6],
            error=row[7],
            result_tx=row[8],
        )
