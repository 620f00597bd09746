"""The chain-side state's reorg bookkeeping: results record the block they were mined in, a reorg
reopens exactly those mined from the rewind point on, and an older database gains the column."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from microvm_blueprint.tangle.state import Cursor, TangleState

KEY = "jobs:0xabc:0"


def test_a_rewind_reopens_the_results_mined_from_there_on(tmp_path: Path) -> None:
    state = TangleState(tmp_path / "t.sqlite3")
    for call_id in range(5):
        state.enqueue(0, call_id, b"\x01")
    state.mark(0, [0], "done", tx_hash="0xa", block=10)  # before the rewind point
    state.mark(0, [1], "done", tx_hash="0xb", block=20)  # at it
    state.mark(0, [2], "done", tx_hash="0xc", block=25)  # after it
    state.mark(0, [3], "done", reason="already completed on-chain")  # not ours: no block
    state.mark(0, [4], "sent", tx_hash="0xe")  # in flight: its receipt is watched anyway
    state.set_cursor(KEY, Cursor(30, "0x" + "11" * 32))
    assert state.rewind_cursor(KEY, 20) == 2
    assert state.cursor(KEY) == Cursor(20, None)
    assert [state.outbox_status(0, c) for c in range(5)] == [
        ("done", "0xa"), ("pending", "0xb"), ("pending", "0xc"), ("done", None), ("sent", "0xe"),
    ]
    assert state.outbox_reason(0, 1) == "reorg"
    assert state.rewind_cursor(KEY, 0) == 1  # once reopened, a result has no block until mined again
    state.close()


def test_the_rewind_at_start_reopens_results_too(tmp_path: Path) -> None:
    state = TangleState(tmp_path / "t.sqlite3")
    state.enqueue(0, 7, b"\x01")
    state.mark(0, [7], "done", tx_hash="0x7", block=40)
    state.rewind(KEY, 0, 35)
    assert state.outbox_status(0, 7) == ("pending", "0x7")
    state.close()


def test_a_database_from_before_gains_the_block_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE outbox (call_id INTEGER NOT NULL, service_id INTEGER NOT NULL, output BLOB NOT NULL, "
        "status TEXT NOT NULL, tx_hash TEXT, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, at REAL NOT NULL, "
        "PRIMARY KEY (service_id, call_id));"
        "INSERT INTO outbox VALUES (3, 0, x'01', 'done', '0x3', 1, NULL, 0);"
    )
    db.commit()
    db.close()
    state = TangleState(path)
    assert state.outbox_status(0, 3) == ("done", "0x3")
    assert state.rewind_cursor(KEY, 0) == 0  # its block is unknown: left alone
    state.mark(0, [3], "done", tx_hash="0x3", block=5)
    assert state.rewind_cursor(KEY, 0) == 1
    state.close()
    TangleState(path).close()  # opening it again changes nothing
