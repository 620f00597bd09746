"""TangleArg decoding and TangleResult encoding (blueprint-sdk semantics, DESIGN.md §3).

Arguments are a tuple. Input of at least 64 bytes whose first word is ``0x20`` is tried in the
*wrapped* form ``abi.decode(x, ((T1,...)))`` first, then the *flat* form ``abi.decode(x, (T1,...))``;
anything else only flat. Decoding is strict (canonical padding, in-bounds offsets), input larger
than a cap (default 64 KiB) is refused before decoding, strings must be valid UTF-8, and the input
must be exactly as long as the canonical encoding of what it decodes to: bytes after a valid
encoding are refused, not ignored (they could smuggle data past anything that reads the inputs).
A result is one value ABI-encoded on its own.

Only :class:`AbiDecodeError` ever escapes :func:`decode_args` (fuzzed in the tests).
(blueprint-sdk's compact TLV form for schema-validated jobs is not implemented: no job here uses it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_abi import decode, encode
from eth_abi.exceptions import EncodingError

from .errors import AbiDecodeError, TangleError

#: Default cap on a job's input size.
MAX_INPUT_BYTES = 64 * 1024
_WORD_0X20 = (0x20).to_bytes(32, "big")


def _signature(types: Sequence[str]) -> str:
    return f"({','.join(types)})"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _decode(types: list[str], data: bytes) -> tuple[Any, ...]:
    """eth-abi's strict decode with every failure as AbiDecodeError (never any other type)."""
    try:
        return tuple(decode(types, data, strict=True))
    except UnicodeDecodeError as exc:
        raise AbiDecodeError(f"a string argument is not valid UTF-8 (byte {exc.start} of that string)") from exc
    except RecursionError as exc:
        raise AbiDecodeError("inputs nest too deeply") from exc
    except Exception as exc:  # DecodingError, NonEmptyPaddingBytes, InvalidPointer, ValueError, ...
        raise AbiDecodeError(_short(exc)) from exc


def _check_length(types: list[str], values: Sequence[Any], data: bytes) -> None:
    """Refuse input longer (or shorter) than the canonical encoding of the values it decoded to."""
    try:
        canonical = len(encode(types, list(values)))
    except Exception as exc:  # cannot happen for values eth-abi decoded itself; stay within our errors
        raise AbiDecodeError(_short(exc)) from exc
    if canonical != len(data):
        extra = len(data) - canonical
        what = f"{extra} trailing byte(s) after" if extra > 0 else f"{-extra} byte(s) missing from"
        raise AbiDecodeError(f"{what} the encoding ({canonical} bytes)")


def _check_strings(values: Sequence[Any]) -> None:
    """Defence in depth: no decoded string may hold lone surrogates (not representable as UTF-8)."""
    for v in values:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise AbiDecodeError("a string argument is not valid UTF-8") from exc
        elif isinstance(v, tuple | list):
            _check_strings(v)


def decode_args(
    types: Sequence[str], data: bytes | bytearray | memoryview, *, max_bytes: int = MAX_INPUT_BYTES
) -> tuple[Any, ...]:
    """Decode job inputs as the tuple ``types`` (the wrapped form first when it may apply).

    Raises :class:`AbiDecodeError` (and nothing else) with a one-line reason on any malformed input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AbiDecodeError(f"inputs must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise AbiDecodeError(f"inputs of {len(data)} bytes exceed the limit of {max_bytes} bytes")
    data = bytes(data)
    flat = [str(t) for t in types]
    expected = _signature(flat)
    wrapped_error: AbiDecodeError | None = None
    if len(data) >= 64 and data[:32] == _WORD_0X20:
        try:
            (inner,) = _decode([expected], data)
            _check_strings(inner)
            _check_length([expected], [inner], data)
            return tuple(inner)
        except AbiDecodeError as exc:
            wrapped_error = exc  # not the wrapped form after all: the flat form decides
    try:
        values = _decode(flat, data)
        _check_strings(values)
        _check_length(flat, values, data)
    except AbiDecodeError as exc:
        # a wrapped encoding with bytes after it: say that, not why the flat form failed
        trailing = wrapped_error is not None and "trailing" in str(wrapped_error)
        reason = wrapped_error if trailing and wrapped_error is not None else exc
        raise AbiDecodeError(f"malformed inputs: expected {expected}: {reason}") from reason.__cause__
    return values


def encode_args(types: Sequence[str], values: Sequence[Any]) -> bytes:
    """Flat ABI encoding of a job's argument tuple (what a customer sends)."""
    try:
        return encode(list(types), list(values))
    except (EncodingError, TypeError, ValueError, OverflowError) as exc:
        raise AbiDecodeError(f"cannot encode {_signature(types)}: {_short(exc)}") from exc


def encode_result(typ: str, value: Any) -> bytes:
    """One value ABI-encoded on its own (TangleResult): ``encode_result("bool", True)``."""
    try:
        return encode([typ], [value])
    except (EncodingError, TypeError, ValueError, OverflowError) as exc:
        raise TangleError(f"cannot encode a {typ} result: {_short(exc)}") from exc


def decode_result(typ: str, data: bytes) -> Any:
    """The inverse of :func:`encode_result` (what a customer reads from ``JobResultSubmitted``)."""
    if not isinstance(data, bytes | bytearray):
        raise AbiDecodeError(f"a result must be bytes, not {type(data).__name__}")
    try:
        (value,) = _decode([typ], bytes(data))
    except AbiDecodeError as exc:
        raise AbiDecodeError(f"malformed result: expected {typ}: {exc}") from exc.__cause__
    return value
