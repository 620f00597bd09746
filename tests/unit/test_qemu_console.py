"""The console file QEMU appends to: read from an offset, capped by punching its head, tail intact."""

from __future__ import annotations

import os
from pathlib import Path

from microvm_blueprint.runtime.adapters.qemu import console


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as QEMU's logfile=,logappend=on
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _lines(first: int, last: int) -> bytes:
    return b"".join(f"line {i:06d}\n".encode() for i in range(first, last))


def test_trim_caps_the_disk_use_and_keeps_the_tail_and_the_offsets(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    cap = 64 * 1024
    _append(path, _lines(0, 30_000))  # 360 KB
    size = path.stat().st_size
    reader = console.ConsoleReader(path, offset=size - 12 * 10)  # a reader part-way through the file
    assert console.held_bytes(path) > cap
    assert console.trim(path, cap)
    assert console.held_bytes(path) <= cap
    assert path.stat().st_size == size  # the same length: every offset still means the same byte
    kept = console.tail(path, 1 << 20)
    assert kept.endswith("line 029999\n") and "\0" not in kept
    assert len(kept) >= cap // 2 - 12 and "line 000000" not in kept
    assert console.tail(path, 24) == "line 029998\nline 029999\n"
    assert reader.read() == _lines(29_990, 30_000).decode()
    _append(path, b"MICROVM-READY\n")  # QEMU goes on appending after a trim
    assert reader.read() == "MICROVM-READY\n"
    assert console.contains(path, "MICROVM-READY") and console.contains(path, "line 029999")
    assert not console.trim(path, cap)  # under the cap again: nothing to do


def test_a_small_console_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    assert not console.trim(path, 1024)  # no file yet
    assert console.tail(path, 100) == "" and console.ConsoleReader(path).read() == ""
    _append(path, b"boot\n")
    assert not console.trim(path, 1 << 20)
    assert console.tail(path, 100) == "boot\n"
    assert console.tail(path, 0) == ""


def test_the_reader_finds_a_line_split_across_reads_and_characters_split_across_bytes(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    reader = console.ConsoleReader(path)
    text = "ü MICROVM-READY\n"
    raw = text.encode()
    _append(path, raw[:1])  # half of the two-byte ü
    first = reader.read()
    _append(path, raw[1:8])
    second = reader.read()
    _append(path, raw[8:])
    assert first + second + reader.read() == text
    assert console.contains(path, "MICROVM-READY")
    assert not console.contains(path, "MICROVM-READY-NOT")


def test_the_reader_starts_over_when_the_file_was_cut(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    _append(path, b"a" * 100)
    reader = console.ConsoleReader(path)
    assert reader.read() == "a" * 100
    os.truncate(path, 0)  # a copytruncate where holes cannot be punched
    _append(path, b"new\n")
    assert reader.read() == "new\n"
