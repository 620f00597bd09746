"""One transaction signed with a key, sent and waited for: the one-off calls of the CLI (``register``'s
``registerOperator``, ``blueprint deploy``'s ``createBlueprint``). The caller estimates the gas first, so
that a revert is named (in its own words) before anything is spent; :func:`send_and_confirm` signs,
sends and waits for the receipt with a deadline. Inside ``run`` the result sender
(:mod:`.consumer`) owns the operator's nonces and sends everything; this is for commands that run alone.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import TangleError
from .keystore import OperatorKey
from .rpc import JsonRpc
from .signing import LegacyTx, sign_legacy

log = logging.getLogger(__name__)

#: Gas limit over the node's estimate (as the result sender's).
GAS_MULTIPLIER = 1.3


async def send_and_confirm(
    rpc: JsonRpc, key: OperatorKey, to: str, data: bytes, gas_estimate: int, *, what: str,
    error: type[TangleError], receipt_timeout: float, gas_multiplier: float = GAS_MULTIPLIER,
) -> tuple[str, dict[str, Any]]:
    """Sign ``data`` to ``to`` with ``key`` (its pending nonce, the node's gas price, ``gas_estimate`` times
    ``gas_multiplier``), send it and wait up to ``receipt_timeout`` seconds for a successful receipt.
    Returns ``(tx_hash, receipt)``; raises ``error`` naming ``what`` when it is not mined in time or
    mined and failed, and :class:`RpcError` for what the node refuses."""
    me = key.address
    tx = LegacyTx(nonce=await rpc.nonce(me), gas_price=await rpc.gas_price(), gas=int(gas_estimate * gas_multiplier),
                  to=to, data=data, chain_id=await rpc.chain_id())
    tx_hash = await rpc.send_raw(sign_legacy(tx, key.secret.reveal()))
    log.info("%s sent from %s: tx %s", what, me, tx_hash)
    receipt = await rpc.wait_receipt(tx_hash, receipt_timeout)
    if receipt is None:
        raise error(f"{what} transaction {tx_hash} not mined after {receipt_timeout:.0f}s")
    if int(str(receipt.get("status")), 16) != 1:
        raise error(f"{what} transaction {tx_hash} was mined and failed (status 0)")
    return tx_hash, receipt
