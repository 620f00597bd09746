"""Errors of the Tangle layer.

::

    MicrovmBlueprintError            (microvm_blueprint.errors)
    ├── ConfigError                  a missing or malformed setting (root class, re-exported here)
    └── TangleError
        ├── KeystoreError            keystore missing, unreadable or malformed
        ├── AbiDecodeError           calldata that does not decode as the job's argument tuple
        ├── RpcError                 the chain answered an error or garbage (retried)
        │   └── RpcUnavailable       the chain could not be reached at all (connection, timeout, HTTP 5xx)
        ├── JobError                 a handler refused a call; the text is recorded, never sent
        ├── BridgeError              the blueprint manager's bridge (gRPC socket) failed or refused
        └── RegistrationError        operator registration refused, or not an operator of the service

httpx/eth-abi/OSError exceptions are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from ..errors import ConfigError, MicrovmBlueprintError

__all__ = [
    "AbiDecodeError", "BridgeError", "ConfigError", "JobError", "KeystoreError", "RegistrationError", "RpcError",
    "RpcUnavailable", "TangleError",
]


class TangleError(MicrovmBlueprintError):
    """Base of the Tangle layer's errors."""


class KeystoreError(TangleError):
    """The operator keystore is missing, unreadable or malformed."""


class AbiDecodeError(TangleError):
    """Calldata does not decode as the expected tuple."""


class RpcError(TangleError):
    """The chain's RPC failed (transport or protocol). Keeps what was asked and answered: ``method``
    (the JSON-RPC method, or ``batch`` for a batch that failed whole), and the JSON-RPC error's
    ``code`` and ``data`` when the node answered one (``None`` otherwise)."""

    def __init__(self, message: str, *, method: str | None = None, code: int | None = None,
                 data: object = None) -> None:
        super().__init__(message)
        self.method = method
        self.code = code
        self.data = data


class RpcUnavailable(RpcError):
    """The chain's RPC could not be reached (connection refused or reset, timeout, HTTP 5xx)."""


class JobError(TangleError):
    """A job handler refused a call. The message is what the customer sees in the journal."""


class BridgeError(TangleError):
    """The blueprint manager's bridge (``BRIDGE_SOCKET_PATH``) could not be reached or refused a call."""


class RegistrationError(TangleError):
    """Operator registration was refused (the contract's revert, named), or the operator is not one
    of the service's operators."""
