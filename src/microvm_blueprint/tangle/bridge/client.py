"""A client of blueprint-sdk's manager bridge (``blueprint_manager_bridge.BlueprintManagerBridge``).

The manager launches a blueprint with ``BRIDGE_SOCKET_PATH`` and serves this gRPC service on that
Unix socket; the blueprint must ``Ping`` before anything else (the manager marks a launch failed when
no Ping comes within 480 s) and asks ``RequestPort`` for each port it listens on (the manager
reserved one on the host). Every failure is a :class:`BridgeError` with one line of text.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from ..errors import BridgeError
from . import bridge_pb2, bridge_pb2_grpc

log = logging.getLogger(__name__)

#: How long one bridge call may take, waiting for the socket to accept included.
CALL_TIMEOUT = 30.0


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details() or 'no details'}"
    return f"{type(exc).__name__}: {exc}"


class ManagerBridge:
    """One gRPC channel to the manager's bridge socket. ``await bridge.aclose()`` when done."""

    def __init__(self, socket_path: Path, *, timeout: float = CALL_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        # "unix:" + an absolute path: grpc's own Unix-socket target (the authority is unused)
        self._channel: Any = grpc.aio.insecure_channel(f"unix:{self.socket_path.absolute()}")
        generated: Any = bridge_pb2_grpc  # untyped generated code (build.py)
        self._stub: Any = generated.BlueprintManagerBridgeStub(self._channel)

    async def ping(self) -> None:
        """``Ping`` the manager; raises :class:`BridgeError` when it does not answer OK in time.

        Waits for the socket to accept (up to the timeout): the manager may create it a moment late."""
        try:
            await self._stub.Ping(empty_pb2.Empty(), timeout=self.timeout, wait_for_ready=True)
        except (grpc.aio.AioRpcError, OSError) as exc:
            raise BridgeError(f"blueprint manager bridge at {self.socket_path}: Ping failed ({_why(exc)})") from exc

    async def request_port(self, preferred: int) -> int:
        """The host port the manager reserved for us (``preferred`` is a wish; 0 = any)."""
        if not 0 <= preferred < 2**16:
            raise BridgeError(f"preferred port {preferred} is not a TCP port")
        try:
            reply = await self._stub.RequestPort(
                bridge_pb2.PortRequest(preferred_port=preferred), timeout=self.timeout, wait_for_ready=True
            )
        except (grpc.aio.AioRpcError, OSError) as exc:
            raise BridgeError(f"blueprint manager bridge at {self.socket_path}: RequestPort failed ({_why(exc)})") from exc
        port = int(reply.port)
        if not 0 < port < 2**16:
            raise BridgeError(f"blueprint manager bridge at {self.socket_path} granted port {port}, not a TCP port")
        return port

    async def aclose(self) -> None:
        """Close the channel (cancels nothing of the manager's)."""
        await asyncio.shield(self._channel.close())
