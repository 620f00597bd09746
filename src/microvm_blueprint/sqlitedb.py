"""One SQLite database file in WAL mode, shared by the layers' durable stores (like ``procs.py``).

Each store passes its own schema and its own error class, so a database failure surfaces in the
caller's layer of the exception tree (``raise ... from exc``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


class Database:
    """A connection usable from the event loop thread and worker threads (one lock)."""

    def __init__(self, path: str | Path, schema: str, *, error: type[Exception], what: str) -> None:
        self.path = str(path)
        self.error = error
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
            raise error(f"cannot open {what} {self.path}: {exc}") from exc
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; rolled back if the body raises."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self.error(f"{self.what} error: {exc}") from exc

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self.lock:
            try:
                return list(self.conn.execute(sql, tuple(args)).fetchall())
            except sqlite3.Error as exc:
                raise self.error(f"{self.what} error: {exc}") from exc
