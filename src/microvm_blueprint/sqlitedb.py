"""One SQLite database file in WAL mode, shared by the layers' durable stores (like ``procs.py``).

Each store passes its own schema and its own error classes, so a database failure surfaces in the
caller's layer of the exception tree (``raise ... from exc``). Failures are sorted in two:

* **transient** (:func:`is_transient`): the database is locked or busy past the busy timeout, a
  disk I/O hiccup, a full disk. Nothing is wrong with the data or the request; the same step can
  succeed later. Raised as ``transient`` (a store passes a
  :class:`~microvm_blueprint.errors.TransientError` subclass there to have it retried, not recorded).
* **permanent**: everything else (corrupt or not-a-database file, schema trouble, a bug in SQL).
  Raised as ``error``.

A store that passes no ``transient`` class gets ``error`` for both (the old single class).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: primary SQLite result codes of failures that say nothing about the data or the request
TRANSIENT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,  # another connection holds the lock past busy_timeout
        sqlite3.SQLITE_LOCKED,  # a conflict inside this process (shared cache, open statement)
        sqlite3.SQLITE_IOERR,  # a disk I/O error (extended codes share the low byte)
        sqlite3.SQLITE_FULL,  # the disk (or a quota) is full for now
    }
)


def is_transient(exc: sqlite3.Error) -> bool:
    """True when ``exc`` is a failure worth retrying: locked, busy, I/O error, disk full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in TRANSIENT_CODES


class Database:
    """A connection usable from the event loop thread and worker threads (one lock). A statement
    waits up to 5 s for another connection's lock before it fails as transient."""

    def __init__(
        self,
        path: str | Path,
        schema: str,
        *,
        error: type[Exception],
        what: str,
        transient: type[Exception] | None = None,
    ) -> None:
        self.path = str(path)
        self.error = error
        self.transient = transient or error
        self.what = what
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA busy_timeout=5000")
            self.conn.executescript(schema)
        except sqlite3.Error as exc:
            raise self._classify(exc)(f"cannot open {what} {self.path}: {exc}") from exc
        self.lock = threading.RLock()

    def _classify(self, exc: sqlite3.Error) -> type[Exception]:
        return self.transient if is_transient(exc) else self.error

    def translate(self, exc: sqlite3.Error) -> Exception:
        """``exc`` as this store's transient or permanent error (raise it ``from exc``)."""
        return self._classify(exc)(f"{self.what} error: {exc}")

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; rolled back if the body or the commit fails, so the
        connection is clean for the next try after a transient failure."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self.translate(exc) from exc

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self.lock:
            try:
                return list(self.conn.execute(sql, tuple(args)).fetchall())
            except sqlite3.Error as exc:
                raise self.translate(exc) from exc
