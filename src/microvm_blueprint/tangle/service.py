"""The service owner (DESIGN.md §9): the one caller besides a VM's owner that may act on every VM.

Read once at start from ``getService(serviceId)`` (tnt-core's ``Types.Service``; the dev contract
answers the same tuple). The runtime never asks the chain: the operator hands it :meth:`ServiceOwner.get`.
"""

from __future__ import annotations

import asyncio
import logging

from eth_abi import decode, encode
from eth_utils import to_checksum_address

from ..errors import TransientError
from .contracts import GET_SERVICE, SERVICE_TUPLE, selector_bytes
from .errors import RpcError, TangleError
from .producer import Backoff
from .rpc import JsonRpc

log = logging.getLogger(__name__)

SEL_GET_SERVICE = selector_bytes(GET_SERVICE)
_SERVICE_TYPE = "(" + ",".join(c["type"] for c in SERVICE_TUPLE["components"]) + ")"  # type: ignore[index]


async def read_service_owner(rpc: JsonRpc, contract: str, service_id: int) -> str:
    """The owner of ``service_id`` (checksummed). :class:`RpcError` on a malformed answer; a revert
    (no such service) and an unreachable chain raise what :meth:`JsonRpc.eth_call` raises."""
    raw = await rpc.eth_call(contract, SEL_GET_SERVICE + encode(["uint64"], [service_id]))
    try:
        ((_blueprint, owner, *_rest),) = decode([_SERVICE_TYPE], raw)
    except Exception as exc:
        raise RpcError(f"getService answered malformed data: {exc}") from exc
    return to_checksum_address(owner)


class ServiceOwner:
    """A background service of the runner that learns the service owner, and :meth:`get` to ask it.

    It is ready after its first attempt (the query API and the producer do not wait on a chain that is
    away); while the owner is not known, :meth:`get` raises a :class:`TransientError`, so a call that
    needs it is retried rather than refused for good, and the reading goes on with backoff until it
    succeeds or the service turns out not to exist.
    """

    name = "service-owner"

    def __init__(self, rpc: JsonRpc, contract: str, service_id: int, *, backoff: Backoff | None = None) -> None:
        self.rpc = rpc
        self.contract = contract
        self.service_id = service_id
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.address: str | None = None
        self._settled = False  # known, or known not to be there

    def get(self) -> str | None:
        """The service owner's address; ``None`` if the service has none; TransientError until read."""
        if not self._settled:
            raise TransientError(f"the owner of service {self.service_id} is not known yet (getService unanswered)")
        return self.address

    async def run(self, ready: asyncio.Event) -> None:
        while True:
            try:
                self.address = await read_service_owner(self.rpc, self.contract, self.service_id)
                self._settled = True
                log.info("service %d is owned by %s: it may act on every VM", self.service_id, self.address)
            except RpcError as exc:  # unreachable or garbage: try again
                log.warning("cannot read the owner of service %d yet: %s", self.service_id, exc)
            except TangleError as exc:  # a revert: no such service, so no service owner
                self._settled = True
                log.error("service %d has no owner to read (%s): only each VM's owner may change it",
                          self.service_id, exc)
            ready.set()
            if self._settled:
                return
            await asyncio.sleep(self.backoff.next())
