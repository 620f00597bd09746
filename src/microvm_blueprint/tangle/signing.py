"""Legacy (EIP-155) transactions signed with coincurve: what the operator and the customer send.

Both sign ``gasPrice`` transactions to the Tangle contract with a secp256k1 key they already hold
(:mod:`.keystore` derives addresses with coincurve too). This is the whole of it: RLP, keccak and a
recoverable signature. eth-account did the same through py_ecc and eth-keyfile, whose import alone
cost the customer CLI ~0.6 s before its first request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import coincurve
from eth_utils import keccak

from .errors import TangleError

RlpItem = bytes | Sequence["RlpItem"]


@dataclass(frozen=True)
class LegacyTx:
    """An unsigned legacy transaction; ``chain_id`` goes into the signature (EIP-155 replay protection)."""

    nonce: int
    gas_price: int
    gas: int
    to: str  # 0x-prefixed 20-byte address (any case)
    data: bytes
    chain_id: int
    value: int = 0

    def _fields(self) -> list[RlpItem]:
        try:
            to = bytes.fromhex(self.to.removeprefix("0x"))
        except ValueError:
            raise TangleError(f"transaction recipient {self.to!r} is not hex") from None
        if len(to) != 20:
            raise TangleError(f"transaction recipient {self.to!r} is not a 20-byte address")
        return [_int(self.nonce), _int(self.gas_price), _int(self.gas), to, _int(self.value), bytes(self.data)]


def sign_legacy(tx: LegacyTx, secret: bytes) -> bytes:
    """The raw signed transaction (what ``eth_sendRawTransaction`` takes) for ``tx`` signed by ``secret``.

    The signature is RFC 6979 deterministic with a low ``s`` (libsecp256k1), so the same
    transaction and key always give the same bytes."""
    fields = tx._fields()
    digest = keccak(rlp_encode([*fields, _int(tx.chain_id), b"", b""]))
    sig = coincurve.PrivateKey(secret).sign_recoverable(digest, hasher=None)  # r (32) || s (32) || recovery id
    v = sig[64] + 35 + 2 * tx.chain_id
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
    return rlp_encode([*fields, _int(v), _int(r), _int(s)])


def _int(value: int) -> bytes:
    if value < 0:
        raise TangleError(f"transaction field {value} is negative")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def rlp_encode(item: RlpItem) -> bytes:
    """Recursive Length Prefix encoding of bytes and (nested) lists of bytes."""
    if isinstance(item, bytes | bytearray):
        if len(item) == 1 and item[0] < 0x80:
            return bytes(item)
        return _length(len(item), 0x80) + bytes(item)
    payload = b"".join(rlp_encode(x) for x in item)
    return _length(len(payload), 0xC0) + payload


def _length(n: int, offset: int) -> bytes:
    if n < 56:
        return bytes([offset + n])
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([offset + 55 + len(size)]) + size
