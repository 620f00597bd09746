"""The guest console file: QEMU appends to it (``logfile=``), the operator reads it and keeps it capped.

QEMU opens ``console.log`` with ``O_APPEND`` and writes every byte the guest prints, whether or not an
operator is running, so an operator killed at any moment loses nothing. The operator never writes
the file; it keeps its disk use under a cap by punching a hole over its head
(``fallocate(PUNCH_HOLE|KEEP_SIZE)``): the file keeps its length and every offset stays valid for a
reader that is part-way through it, and the dropped head reads as NUL bytes, which readers skip.
Where the file system cannot punch holes the head is cut by rewriting the tail
(``copytruncate``: bytes the guest prints during that instant may be lost, only then).

The cap is kept while an operator runs (a ``stat`` a second per VM); while none runs, QEMU goes on
appending, and the next operator trims the file when it re-adopts the VM.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already runs on
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def _punch(fd: int, length: int) -> bool:
    """Free the first ``length`` bytes of the file on disk (they read back as NULs); False if this
    file system cannot."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def held_bytes(path: str | Path) -> int:
    """The disk space the console file takes (its punched head excluded); 0 if it does not exist."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def trim(path: str | Path, cap: int) -> bool:
    """Keep the file's disk use at most ``cap`` bytes: when it holds more, drop its head so that the
    last ``cap // 2`` bytes remain. True if it trimmed. Raises OSError only for an unreadable file."""
    if held_bytes(path) <= cap:  # the common case: one stat
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_blocks * 512 <= cap or st.st_size <= cap // 2:
            return False
        cut = st.st_size - cap // 2
        if _punch(fd, cut):
            return True
        keep = os.pread(fd, cap // 2, cut)  # copytruncate: the one lossy instant (see module doc)
        os.ftruncate(fd, 0)
        os.write(fd, keep)
        log.warning("console %s: this file system cannot punch holes; trimmed by rewriting its tail", path)
        return True
    finally:
        os.close(fd)


def tail(path: str | Path, limit: int) -> str:
    """The last ``limit`` bytes of the console as text ('' if there is none); the punched head skipped."""
    if limit <= 0:
        return ""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - limit))
            data = fh.read(limit)
    except OSError:
        return ""
    return data.lstrip(b"\0").decode("utf-8", "replace")


@dataclass
class ConsoleReader:
    """Reads what the guest printed since the last call, from a byte offset into the file.

    Decodes incrementally (a UTF-8 character split between two reads is not garbled) and skips the
    NULs of a punched head; starts over from 0 if the file was cut shorter (copytruncate)."""

    path: Path
    offset: int = 0

    def __post_init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, limit: int = 1 << 20) -> str:
        """The next at most ``limit`` bytes of console text ('' if nothing new)."""
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size < self.offset:
                    self.offset = 0
                    self._decoder.reset()
                fh.seek(self.offset)
                data = fh.read(limit)
        except FileNotFoundError:
            return ""
        self.offset += len(data)
        return self._decoder.decode(data.replace(b"\0", b""))


def contains(path: str | Path, needle: str) -> bool:
    """True if the console (what is left of it) contains ``needle``."""
    reader = ConsoleReader(Path(path))
    carry = ""
    with contextlib.suppress(OSError):
        while chunk := reader.read():
            text = carry + chunk
            if needle in text:
                return True
            carry = text[-len(needle):]
    return False
