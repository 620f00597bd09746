"""Operator registration and the start-up membership check (DESIGN.md §3, §11).

- :func:`write_registration_inputs`: ``REGISTRATION_MODE_ON`` / ``REGISTRATION_CAPTURE_ONLY``: the
  manager registers the operator itself and only wants this blueprint's registration inputs, which
  are empty (no fields): an empty file at ``REGISTRATION_OUTPUT_PATH``.
- :func:`register_operator`: without a manager, ``isOperatorRegistered(blueprintId, me)`` and, when
  it says no, ``registerOperator(blueprintId, 65-byte uncompressed key, rpcAddress)`` signed with the
  operator key. A revert is named in one line (what it means and what to do).
- :func:`check_service_operator`: ``isServiceOperator(SERVICE_ID, me)`` at ``run`` start.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from eth_abi import decode, encode

from .contracts import IS_OPERATOR_REGISTERED, IS_SERVICE_OPERATOR, REGISTER_OPERATOR, selector_bytes
from .errors import RegistrationError, RpcError
from .keystore import OperatorKey
from .rpc import ContractRevert, JsonRpc
from .transact import send_and_confirm

log = logging.getLogger(__name__)

SEL_IS_OPERATOR_REGISTERED = selector_bytes(IS_OPERATOR_REGISTERED)
SEL_REGISTER_OPERATOR = selector_bytes(REGISTER_OPERATOR)
SEL_IS_SERVICE_OPERATOR = selector_bytes(IS_SERVICE_OPERATOR)
#: How long ``register`` waits for its transaction to be mined.
RECEIPT_TIMEOUT = 120.0

#: What a revert of ``registerOperator`` means, for the one line the operator reads.
REVERT_HINTS = {
    "OperatorAlreadyRegistered": "this operator is already registered for the blueprint",
    "OperatorNotActive": "the operator is not an active operator in the staking contract (stake and join first)",
    "Unauthorized": "the contract does not allow this account to register",
    "ServiceNotFound": "no such service",
}


def write_registration_inputs(path: Path, inputs: bytes = b"") -> Path:
    """Write this blueprint's registration inputs (none: empty bytes) to ``path``, atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".registration-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(inputs)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise RegistrationError(f"cannot write registration inputs to {path}: {exc.strerror or exc}") from exc
    return path


async def _bool_call(rpc: JsonRpc, contract: str, data: bytes, what: str) -> bool:
    raw = await rpc.eth_call(contract, data)
    try:
        (value,) = decode(["bool"], raw)
    except Exception as exc:
        raise RpcError(f"{what} on {contract} answered {len(raw)} bytes, not a bool: is TANGLE_CONTRACT right?") from exc
    return bool(value)


async def is_operator_registered(rpc: JsonRpc, contract: str, blueprint_id: int, operator: str) -> bool:
    data = SEL_IS_OPERATOR_REGISTERED + encode(["uint64", "address"], [blueprint_id, operator])
    return await _bool_call(rpc, contract, data, "isOperatorRegistered")


async def is_service_operator(rpc: JsonRpc, contract: str, service_id: int, operator: str) -> bool:
    data = SEL_IS_SERVICE_OPERATOR + encode(["uint64", "address"], [service_id, operator])
    return await _bool_call(rpc, contract, data, "isServiceOperator")


async def check_service_operator(rpc: JsonRpc, contract: str, service_id: int, operator: str) -> None:
    """Raise :class:`RegistrationError` (one line) when ``operator`` is not an operator of the service."""
    if not await is_service_operator(rpc, contract, service_id, operator):
        raise RegistrationError(
            f"operator {operator} is not an operator of service {service_id} on {contract}: register it "
            "(`microvm-blueprint register`) and have the service approve it, or check SERVICE_ID and the keystore"
        )


@dataclass(frozen=True)
class Registration:
    """What :func:`register_operator` did: ``tx_hash`` is ``None`` when it was registered already."""

    operator: str
    blueprint_id: int
    tx_hash: str | None

    @property
    def already(self) -> bool:
        return self.tx_hash is None


def register_data(blueprint_id: int, public_key: bytes, rpc_address: str) -> bytes:
    """Calldata of ``registerOperator(uint64, bytes ecdsaPublicKey, string rpcAddress)``."""
    if len(public_key) != 65 or public_key[0] != 4:
        raise RegistrationError("registerOperator takes the 65-byte uncompressed public key (0x04 || x || y)")
    return SEL_REGISTER_OPERATOR + encode(["uint64", "bytes", "string"], [blueprint_id, public_key, rpc_address])


def explain_revert(exc: ContractRevert, blueprint_id: int, operator: str) -> str:
    name = exc.name or (f"unknown error {exc.selector}" if exc.selector else "no reason given")
    hint = REVERT_HINTS.get(exc.name or "")
    return f"registerOperator({blueprint_id}) from {operator} reverted: {name}" + (f" ({hint})" if hint else "")


async def register_operator(
    rpc: JsonRpc, contract: str, blueprint_id: int, key: OperatorKey, rpc_address: str,
    *, receipt_timeout: float = RECEIPT_TIMEOUT,
) -> Registration:
    """Register ``key`` for the blueprint unless it is already; raise :class:`RegistrationError` naming
    the contract's revert (estimated before sending, so a refused registration costs no gas)."""
    me = key.address
    if await is_operator_registered(rpc, contract, blueprint_id, me):
        return Registration(me, blueprint_id, None)
    data = register_data(blueprint_id, key.public_key, rpc_address)
    try:
        estimate = await rpc.estimate_gas(contract, data, me)
    except ContractRevert as exc:
        if exc.name == "OperatorAlreadyRegistered":  # registered between our check and now
            return Registration(me, blueprint_id, None)
        raise RegistrationError(explain_revert(exc, blueprint_id, me)) from exc
    tx_hash, _ = await send_and_confirm(rpc, key, contract, data, estimate, what="registerOperator",
                                        error=RegistrationError, receipt_timeout=receipt_timeout)
    if not await is_operator_registered(rpc, contract, blueprint_id, me):
        raise RegistrationError(f"registerOperator transaction {tx_hash} succeeded but the operator is not registered")
    return Registration(me, blueprint_id, tx_hash)
