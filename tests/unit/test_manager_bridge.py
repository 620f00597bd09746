"""The bridge client against a real gRPC server on a Unix socket (tests/bridge_server.py), and the
committed stubs against ../shared's bridge.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm_blueprint.tangle.bridge import build
from microvm_blueprint.tangle.bridge.client import ManagerBridge
from microvm_blueprint.tangle.errors import BridgeError, TangleError

from ..bridge_server import FakeManagerBridge, serving


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "bridge.sock"


async def test_ping_then_request_port(sock: Path) -> None:
    async with serving(sock, FakeManagerBridge(grant=41234)) as fake:
        bridge = ManagerBridge(sock, timeout=10)
        try:
            await bridge.ping()
            assert await bridge.request_port(3000) == 41234
        finally:
            await bridge.aclose()
    assert fake.record.calls == ["Ping", "RequestPort(3000)"]


async def test_a_refused_ping_is_one_line(sock: Path) -> None:
    async with serving(sock, FakeManagerBridge(grant=None, refuse=True)):
        bridge = ManagerBridge(sock, timeout=10)
        try:
            with pytest.raises(BridgeError) as err:
                await bridge.ping()
        finally:
            await bridge.aclose()
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, TangleError)
    assert f"bridge at {sock}: Ping failed (UNAVAILABLE: launch cancelled by the test manager)" in text


async def test_no_socket_fails_after_the_timeout(sock: Path) -> None:
    bridge = ManagerBridge(sock, timeout=0.5)
    try:
        with pytest.raises(BridgeError, match=r"Ping failed \((DEADLINE_EXCEEDED|UNAVAILABLE)"):
            await bridge.ping()
    finally:
        await bridge.aclose()


async def test_a_granted_port_that_is_no_port_is_refused(sock: Path) -> None:
    async with serving(sock, FakeManagerBridge(grant=70000)):
        bridge = ManagerBridge(sock, timeout=10)
        try:
            with pytest.raises(BridgeError, match="granted port 70000"):
                await bridge.request_port(0)
        finally:
            await bridge.aclose()


def test_committed_stubs_match_the_shared_proto() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) makes the stubs")
    proto = build.proto_path()
    if not proto.is_file():
        pytest.skip(f"{proto} is not available (set MICROVM_SHARED_DIR)")
    assert build.main(["--check"]) == 0, "run python -m microvm_blueprint.tangle.bridge.build"


def test_check_notices_a_stale_stub(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) makes the stubs")
    proto = build.proto_path()
    if not proto.is_file():
        pytest.skip(f"{proto} is not available (set MICROVM_SHARED_DIR)")
    changed = tmp_path / "bridge.proto"
    changed.write_text(proto.read_text().replace("uint32 preferred_port = 1;", "uint32 preferred_port = 1; bool any = 2;"))
    assert build.main(["--check", "--proto", str(changed)]) == 1
