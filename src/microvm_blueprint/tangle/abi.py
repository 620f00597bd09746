"""TangleArg decoding and TangleResult encoding (blueprint-sdk semantics, DESIGN.md §3).

Arguments are a tuple. Input of at least 64 bytes whose first word is ``0x20`` is tried in the
*wrapped* form ``abi.decode(x, ((T1,...)))`` first, then the *flat* form ``abi.decode(x, (T1,...))``;
anything else only flat. A result is one value ABI-encoded on its own.

Only :class:`AbiDecodeError` ever escapes :func:`decode_args` (fuzzed in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError, EncodingError

from .errors import AbiDecodeError

MAX_INPUT_BYTES = 64 * 1024
_WORD_0X20 = (0x20).to_bytes(32, "big")


def _decode(types: list[str], data: bytes) -> tuple[Any, ...]:
    values = decode(types, data, strict=True)
    return tuple(values)


def _check_strings(values: Sequence[Any]) -> None:
    for v in values:
        if isinstance(v, str):
            # eth-abi decodes invalid UTF-8 with surrogateescape-like replacement on some versions
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise AbiDecodeError("string argument is not valid UTF-8") from exc
        elif isinstance(v, tuple | list):
            _check_strings(v)


def decode_args(types: Sequence[str], data: bytes, *, max_bytes: int = MAX_INPUT_BYTES) -> tuple[Any, ...]:
    """Decode job inputs as the tuple ``types`` (wrapped form first when it may apply)."""
    if not isinstance(data, bytes | bytearray):
        raise AbiDecodeError("inputs must be bytes")
    if len(data) > max_bytes:
        raise AbiDecodeError(f"inputs of {len(data)} bytes exceed the limit of {max_bytes} bytes")
    data = bytes(data)
    flat = list(types)
    errors: list[str] = []
    if len(data) >= 64 and data[:32] == _WORD_0X20:
        try:
            (inner,) = _decode([f"({','.join(flat)})"], data)
            _check_strings(inner)
            return tuple(inner)
        except (DecodingError, EncodingError, ValueError, TypeError, OverflowError, UnicodeError) as exc:
            errors.append(str(exc))
        except AbiDecodeError as exc:
            errors.append(str(exc))
    try:
        values = _decode(flat, data)
    except (DecodingError, EncodingError, ValueError, TypeError, OverflowError, UnicodeError) as exc:
        raise AbiDecodeError(f"malformed inputs: expected ({','.join(flat)}): {_short(exc)}") from exc
    _check_strings(values)
    return values


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def encode_args(types: Sequence[str], values: Sequence[Any]) -> bytes:
    """Flat ABI encoding of a job's argument tuple (what a customer sends)."""
    try:
        return encode(list(types), list(values))
    except (EncodingError, TypeError, ValueError, OverflowError) as exc:
        raise AbiDecodeError(f"cannot encode ({','.join(types)}): {_short(exc)}") from exc


def encode_result(typ: str, value: Any) -> bytes:
    """One value ABI-encoded on its own (TangleResult)."""
    return encode([typ], [value])


def decode_result(typ: str, data: bytes) -> Any:
    try:
        (value,) = decode([typ], data)
    except (DecodingError, ValueError, TypeError, OverflowError, UnicodeError) as exc:
        raise AbiDecodeError(f"malformed result: expected {typ}: {_short(exc)}") from exc
    return value
