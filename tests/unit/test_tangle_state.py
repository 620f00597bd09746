"""The chain-side state's reorg bookkeeping: results record the block they were mined in; a reorg
reopens exactly those mined from the rewind point on, and only once the re-scan is back where it was
(durably: a crash in between reopens after the next start); a call id the reorg gave to another call
has its unsent result dropped; an older database gains the column."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from microvm_blueprint.tangle.calls import JobCall
from microvm_blueprint.tangle.state import Cursor, TangleState

KEY = "jobs:0xabc:0"


def call(call_id: int, tx: str, block: int = 25) -> JobCall:
    return JobCall(service_id=0, call_id=call_id, job_index=0, caller="0x" + "11" * 20, inputs=b"in-" + tx.encode(),
                    block_number=block, block_hash="0x" + "22" * 32, log_index=0, tx_hash=tx, from_quote=False)


def test_a_rewind_reopens_the_results_mined_from_there_on_once_the_scan_is_back(tmp_path: Path) -> None:
    state = TangleState(tmp_path / "t.sqlite3")
    for call_id in range(5):
        state.finish(0, call_id, b"\x01")
    state.mark(0, [0], "done", tx_hash="0xa", block=10)  # before the rewind point
    state.mark(0, [1], "done", tx_hash="0xb", block=20)  # at it
    state.mark(0, [2], "done", tx_hash="0xc", block=25)  # after it
    state.mark(0, [3], "done", reason="already completed on-chain")  # not ours: no block
    state.mark(0, [4], "sent", tx_hash="0xe")  # in flight: its receipt is watched anyway
    state.set_cursor(KEY, Cursor(30, "0x" + "11" * 32))
    state.rewind_cursor(KEY, 20)
    assert state.cursor(KEY) == Cursor(20, None) and state.reorg_pending(KEY)
    assert state.reopen_due(KEY, 25) is None  # the re-scan is not back yet: nothing reopened
    assert state.outbox_status(0, 1) == ("done", "0xb")
    assert state.reopen_due(KEY, 30) == 2
    assert [state.outbox_status(0, c) for c in range(5)] == [
        ("done", "0xa"), ("pending", "0xb"), ("pending", "0xc"), ("done", None), ("sent", "0xe"),
    ]
    assert state.outbox_reason(0, 1) == "reorg" and not state.reorg_pending(KEY)
    assert state.reopen_due(KEY, 31) is None  # once
    state.close()


def one_mined(path: Path, *, block: int, cursor: int, call_id: int = 1) -> TangleState:
    """A state with one result of ours mined in ``block``, and the cursor at ``cursor``."""
    state = TangleState(path)
    state.finish(0, call_id, b"\x01")
    state.mark(0, [call_id], "done", tx_hash=f"0x{call_id}", block=block)
    state.set_cursor(KEY, Cursor(cursor, "0x" + "11" * 32))
    return state


def test_a_shorter_chain_reopens_when_the_scan_reaches_its_head(tmp_path: Path) -> None:
    state = one_mined(tmp_path / "t.sqlite3", block=28, cursor=30)
    state.rewind_cursor(KEY, 20)
    assert state.reopen_due(KEY, 27) is None
    assert state.reopen_due(KEY, 27, caught_up=True) == 1
    state.close()


def test_a_pending_reopen_survives_a_restart_and_the_start_rewind_records_one(tmp_path: Path) -> None:
    state = one_mined(tmp_path / "t.sqlite3", block=40, cursor=45, call_id=7)
    state.rewind(KEY, 0, 35)  # noticed at start
    state.close()
    state = TangleState(tmp_path / "t.sqlite3")  # a crash before the re-scan was back
    assert state.reorg_pending(KEY) and state.outbox_status(0, 7) == ("done", "0x7")
    assert state.reopen_due(KEY, 45) == 1 and state.outbox_status(0, 7) == ("pending", "0x7")
    state.close()


def test_two_reorgs_before_the_scan_is_back_cover_both_ranges(tmp_path: Path) -> None:
    state = one_mined(tmp_path / "t.sqlite3", block=12, cursor=50)
    state.rewind_cursor(KEY, 30)
    state.set_cursor(KEY, Cursor(40, "0x" + "33" * 32))
    state.rewind_cursor(KEY, 10)  # a second one, deeper, before the first re-scan was back at 50
    assert state.reopen_due(KEY, 45) is None
    assert state.reopen_due(KEY, 50) == 1
    state.close()


def test_a_call_id_given_to_another_call_drops_the_old_result(tmp_path: Path) -> None:
    state = TangleState(tmp_path / "t.sqlite3")
    assert state.advance(KEY, Cursor(26, "0x" + "11" * 32), [call(1, "0xold")])
    state.finish(0, 1, b"\x01")  # handled; its result queued
    assert state.outbox_status(0, 1) == ("pending", None)
    # the re-scan after a reorg: call 1 is now another transaction
    assert state.advance(KEY, Cursor(27, "0x" + "44" * 32), [call(1, "0xnew")]) == []
    assert state.outbox_status(0, 1) == ("dropped", None)
    assert state.outbox_reason(0, 1) == "a reorg gave this call id to another call"
    # one already mined is not reopened by the reorg either
    assert state.advance(KEY, Cursor(28, "0x" + "55" * 32), [call(2, "0xtwo")])
    state.finish(0, 2, b"\x01")
    state.mark(0, [2], "done", tx_hash="0xr2", block=27)
    state.rewind_cursor(KEY, 20)
    state.advance(KEY, Cursor(28, "0x" + "66" * 32), [call(2, "0xother")])
    assert state.reopen_due(KEY, 28) == 0 and state.outbox_status(0, 2) == ("dropped", "0xr2")
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
    state.rewind_cursor(KEY, 0)
    assert state.reopen_due(KEY, 0) == 0  # its block is unknown: left alone
    state.mark(0, [3], "done", tx_hash="0x3", block=5)
    state.rewind_cursor(KEY, 0)
    assert state.reopen_due(KEY, 0) == 1
    state.close()
    TangleState(path).close()  # opening it again changes nothing


def test_a_call_superseded_before_it_ran_queues_nothing(tmp_path: Path) -> None:
    state = TangleState(tmp_path / "t.sqlite3")
    assert state.advance(KEY, Cursor(26, "0x" + "11" * 32), [call(1, "0xold")])  # handed over, not handled yet
    state.advance(KEY, Cursor(27, "0x" + "44" * 32), [call(1, "0xnew")])  # a reorg gave its id to another
    assert state.call_status(0, 1) == "superseded"
    state.finish(0, 1, b"\x01")  # the handler was already running: its result must not answer the new call
    assert state.call_status(0, 1) == "superseded" and state.outbox_status(0, 1) is None
    assert state.unfinished() == []  # and a restart does not hand it over again
    state.close()
