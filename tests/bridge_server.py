"""A blueprint manager's bridge for tests: the real gRPC service (``blueprint_manager_bridge``, stubs from
``tangle/bridge``) served by grpc.aio on a Unix socket, recording what the blueprint asked.

``on_ping`` runs inside ``Ping`` before it answers (a test checks what the blueprint had done by then);
``refuse`` makes ``Ping`` fail with UNAVAILABLE; ``grant`` is the port ``RequestPort`` answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from microvm_blueprint.tangle.bridge import bridge_pb2, bridge_pb2_grpc


@dataclass
class BridgeRecord:
    calls: list[str] = field(default_factory=list)  # "Ping", "RequestPort(<preferred>)" in order
    pinged: asyncio.Event = field(default_factory=asyncio.Event)


class FakeManagerBridge(bridge_pb2_grpc.BlueprintManagerBridgeServicer):
    def __init__(self, *, grant: int | None, refuse: bool = False,
                 on_ping: Callable[[], Awaitable[None]] | None = None) -> None:
        self.grant = grant
        self.refuse = refuse
        self.on_ping = on_ping
        self.record = BridgeRecord()

    async def Ping(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        self.record.calls.append("Ping")
        if self.on_ping is not None:
            await self.on_ping()
        self.record.pinged.set()
        if self.refuse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "launch cancelled by the test manager")
        return empty_pb2.Empty()

    async def RequestPort(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.record.calls.append(f"RequestPort({request.preferred_port})")
        port = self.grant if self.grant is not None else request.preferred_port
        return bridge_pb2.PortResponse(port=port)


@contextlib.asynccontextmanager
async def serving(socket_path: Path, bridge: FakeManagerBridge) -> AsyncIterator[FakeManagerBridge]:
    """Serve ``bridge`` on ``socket_path`` until the block ends (stopped with a grace period)."""
    server = grpc.aio.server()
    generated: Any = bridge_pb2_grpc  # untyped generated code (tangle/bridge/build.py), as in client.py
    generated.add_BlueprintManagerBridgeServicer_to_server(bridge, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    try:
        yield bridge
    finally:
        await asyncio.shield(server.stop(grace=1))
