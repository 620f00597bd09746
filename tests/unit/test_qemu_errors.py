"""Every error the QMP client can raise becomes a runtime ``VmError`` (the VmmDriver contract)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPError, Runstate, StateError
from qemu.qmp.error import ProtocolError
from qemu.qmp.events import ListenerError
from qemu.qmp.message import DeserializationError, Message, UnexpectedTypeError
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError, GreetingError, NegotiationError, ServerParseError

from microvm_blueprint.runtime.adapters.qemu import QemuProcess, QemuSettings, map_qmp_error
from microvm_blueprint.runtime.errors import VmError, VmmApiError, VmmError, VmmTimeout


def _execute_error() -> ExecuteError:
    sent = Message({"execute": "stop"})
    received = Message({"error": {"class": "GenericError", "desc": "not now"}})
    return ExecuteError(ErrorResponse(received), sent, received)


CASES: list[tuple[BaseException, type[VmmError]]] = [
    (_execute_error(), VmmApiError),
    (TimeoutError(), VmmTimeout),
    (ConnectError("failed to establish connection", ConnectionRefusedError(111, "refused")), VmmError),
    (StateError("not connected", Runstate.IDLE, Runstate.RUNNING), VmmError),
    (ExecInterruptedError("Disconnected"), VmmError),
    (EOFError(), VmmError),
    (asyncio.IncompleteReadError(b"", 10), VmmError),
    (ConnectionResetError(104, "reset"), VmmError),
    (ConnectionRefusedError(111, "refused"), VmmError),
    (BrokenPipeError(32, "broken pipe"), VmmError),
    (FileNotFoundError(2, "no socket"), VmmError),
    (OSError(5, "i/o"), VmmError),
    (QMPError("generic"), VmmError),
    (ListenerError("listener"), VmmError),
    (ProtocolError("broken"), VmmApiError),
    (DeserializationError("bad json", b"{"), VmmApiError),
    (UnexpectedTypeError("not an object", 3), VmmApiError),
    (ServerParseError("no id", Message({"return": {}})), VmmApiError),
    (BadReplyError("wrong id", Message({"return": {}}), Message({"execute": "stop"})), VmmApiError),
    (GreetingError("no greeting", EOFError()), VmmApiError),
    (NegotiationError("no caps", EOFError()), VmmApiError),
    (ValueError("odd"), VmmError),
    (RuntimeError("odd"), VmmError),
]


@pytest.mark.parametrize(("exc", "expected"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_every_qmp_client_error_maps_into_the_runtime_tree(exc: BaseException, expected: type[VmmError]) -> None:
    mapped = map_qmp_error(exc, "query-status", timeout=3, exit_code=9, log_tail="qemu said")
    assert type(mapped) is expected
    assert isinstance(mapped, VmError)
    assert "query-status" in str(mapped)  # names the call
    assert mapped.log_tail == "qemu said"
    if expected is VmmError:  # the process may be gone: its exit code travels with the error
        assert mapped.exit_code == 9


def test_every_qmp_client_error_class_is_in_the_table() -> None:
    """A QMP client upgrade that adds an error class shows up here rather than as an escaped error."""
    import qemu.qmp.error
    import qemu.qmp.events
    import qemu.qmp.message
    import qemu.qmp.protocol
    import qemu.qmp.qmp_client

    classes = {
        obj for mod in (qemu.qmp.error, qemu.qmp.events, qemu.qmp.message, qemu.qmp.protocol, qemu.qmp.qmp_client)
        for obj in vars(mod).values()
        if isinstance(obj, type) and issubclass(obj, QMPError) and not obj.__name__.startswith("_")
    }
    assert {ExecuteError, StateError, ConnectError, ExecInterruptedError, ProtocolError} <= classes
    covered = {type(exc) for exc, _ in CASES}
    assert classes <= covered, f"not in the table: {sorted(c.__name__ for c in classes - covered)}"


async def test_a_call_on_a_dead_session_is_a_vmm_error(tmp_path: Path) -> None:
    """A real QMP client that is not connected (QEMU gone) raises StateError; the process maps it."""
    proc = QemuProcess("vm", tmp_path, QemuSettings(qmp_timeout=2), dirfd=-1, pid=None)
    with pytest.raises(VmmError, match="lost the QMP connection to qemu during stop") as info:
        await proc.execute("stop")
    assert isinstance(info.value.__cause__, StateError)
    with pytest.raises(VmmError, match="during getfd"):
        await proc.pass_fd(tmp_path / "memory.bin", "snapshot", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(VmmError, match="cannot open"):
        await proc.pass_fd(tmp_path / "missing" / "memory.bin", "restore", 0)
