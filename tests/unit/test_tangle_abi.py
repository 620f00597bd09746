"""TangleArg decoding (wrapped and flat forms), TangleResult encoding, and hostile calldata."""

from __future__ import annotations

from typing import Any

import pytest
from eth_abi import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm_blueprint.tangle.abi import MAX_INPUT_BYTES, decode_args, decode_result, encode_args, encode_result
from microvm_blueprint.tangle.errors import AbiDecodeError

JOB_SIGNATURES: list[list[str]] = [
    ["string"],
    ["string", "string"],
    ["string", "string", "string"],
    ["string", "uint32", "uint32", "string"],
    ["uint64", "bool", "address"],
    ["bytes", "uint256[]", "string[]"],
    ["bytes32", "int128", "(string,uint8)"],
]


def test_flat_and_wrapped_forms_decode_alike() -> None:
    args = ("vm-1", 2, 512, "")
    types = ["string", "uint32", "uint32", "string"]
    flat = encode(types, list(args))
    wrapped = encode(["(string,uint32,uint32,string)"], [args])
    assert flat != wrapped
    assert decode_args(types, flat) == args
    assert decode_args(types, wrapped) == args


def test_short_input_is_only_tried_flat() -> None:
    assert decode_args(["uint32"], encode(["uint32"], [0x20])) == (0x20,)  # 32 bytes, first word 0x20
    assert decode_args(["bool", "uint8"], encode(["bool", "uint8"], [True, 7])) == (True, 7)


def test_static_tuple_starting_with_0x20_is_the_same_either_way() -> None:
    assert decode_args(["uint256", "uint256"], encode(["uint256", "uint256"], [0x20, 5])) == (0x20, 5)


def test_a_flat_single_string_is_not_mistaken_for_the_wrapped_form() -> None:
    for text in ["vm-1", "a" * 32, "x" * 100, "", "é" * 40]:
        assert decode_args(["string"], encode(["string"], [text])) == (text,)


@pytest.mark.parametrize(
    ("types", "data", "reason"),
    [
        (["string"], b"", "Tried to read 32 bytes"),
        (["string"], b"\x00" * 31, "Tried to read 32 bytes"),
        (["string"], encode(["uint256"], [2**200]), "malformed inputs: expected (string)"),
        (["string"], encode(["bytes"], [b"\xff\xfe"]), "not valid UTF-8"),
        (["string", "string"], encode(["string", "bytes"], ["ok", b"\xc3\x28"]), "not valid UTF-8"),
        (["bool"], encode(["uint256"], [2]), "malformed inputs: expected (bool)"),
        (["uint8"], encode(["uint256"], [256]), "malformed inputs: expected (uint8)"),
        (["address"], b"\x01" * 32, "malformed inputs: expected (address)"),
    ],
)
def test_malformed_inputs_are_refused_clearly(types: list[str], data: bytes, reason: str) -> None:
    with pytest.raises(AbiDecodeError) as err:
        decode_args(types, data)
    message = str(err.value)
    assert reason in message and "\n" not in message and len(message) < 400


def test_size_cap() -> None:
    big = encode(["string"], ["a" * MAX_INPUT_BYTES])
    with pytest.raises(AbiDecodeError, match=r"exceed the limit of 65536 bytes"):
        decode_args(["string"], big)
    assert decode_args(["string"], big, max_bytes=len(big)) == ("a" * MAX_INPUT_BYTES,)
    with pytest.raises(AbiDecodeError, match="limit of 10 bytes"):
        decode_args(["string"], encode(["string"], ["vm"]), max_bytes=10)


def test_inputs_must_be_bytes() -> None:
    with pytest.raises(AbiDecodeError, match="inputs must be bytes"):
        decode_args(["string"], "0x00")  # type: ignore[arg-type]
    assert decode_args(["string"], bytearray(encode(["string"], ["vm"]))) == ("vm",)


def test_results_are_single_values_encoded_on_their_own() -> None:
    assert encode_result("bool", True) == (1).to_bytes(32, "big")
    assert encode_result("string", "ok") == encode(["string"], ["ok"])
    assert decode_result("bool", encode_result("bool", True)) is True
    assert decode_result("uint64", encode_result("uint64", 7)) == 7
    with pytest.raises(AbiDecodeError, match="malformed result: expected bool"):
        decode_result("bool", b"\x02" * 32)
    assert encode_args(["string", "uint32"], ["a", 1]) == encode(["string", "uint32"], ["a", 1])
    with pytest.raises(AbiDecodeError, match="cannot encode"):
        encode_args(["uint8"], [300])


# ---- fuzzing: whatever the bytes, the only exception is AbiDecodeError -----------------------------

_WORDS = st.sampled_from(
    [0, 1, 0x20, 0x40, 0x60, 31, 32, 33, 2**32, 2**64 - 1, 2**255, 2**256 - 1, 65536, 10**9]
).map(lambda n: n.to_bytes(32, "big"))


def _mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, chunk in ops:
        at = pos % (len(buf) + 1)
        if op == "flip" and buf:
            buf[at % len(buf)] ^= chunk[0] | 1
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = chunk
        elif op == "word" and len(buf) >= 32:
            w = (at // 32) * 32 if at + 32 <= len(buf) else 0
            buf[w:w + 32] = chunk.ljust(32, b"\x00")[:32]
    return bytes(buf)


def _value_for(typ: str) -> st.SearchStrategy[Any]:
    if typ.endswith("[]"):
        return st.lists(_value_for(typ[:-2]), max_size=4)
    if typ.startswith("("):
        inner = typ[1:-1].split(",")
        return st.tuples(*[_value_for(t) for t in inner])
    if typ == "string":
        return st.text(max_size=80)
    if typ == "bytes":
        return st.binary(max_size=80)
    if typ == "bytes32":
        return st.binary(min_size=32, max_size=32)
    if typ.startswith("uint"):
        return st.integers(0, 2 ** int(typ[4:]) - 1)
    if typ.startswith("int"):
        bits = int(typ[3:])
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if typ == "bool":
        return st.booleans()
    if typ == "address":
        return st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
    raise AssertionError(typ)


@st.composite
def calldata(draw: st.DrawFn) -> tuple[list[str], bytes]:
    types = draw(st.sampled_from(JOB_SIGNATURES))
    kind = draw(st.sampled_from(["random", "flat", "wrapped", "mutated", "words"]))
    if kind == "random":
        return types, draw(st.binary(max_size=400))
    if kind == "words":
        return types, b"".join(draw(st.lists(_WORDS, max_size=12)))
    values = [draw(_value_for(t)) for t in types]
    flat = encode(types, values)
    wrapped = encode([f"({','.join(types)})"], [tuple(values)])
    base = flat if kind == "flat" or draw(st.booleans()) else wrapped
    if kind in ("flat", "wrapped"):
        return types, base
    ops = draw(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "word"]), st.integers(0, 1000),
                                  st.one_of(_WORDS, st.binary(min_size=1, max_size=40))), min_size=1, max_size=4))
    return types, _mutate(base, ops)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calldata())
def test_fuzz_only_abidecodeerror_escapes(case: tuple[list[str], bytes]) -> None:
    types, data = case
    try:
        values = decode_args(types, data)
    except AbiDecodeError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(values, tuple) and len(values) == len(types)
    for v in values:  # every decoded string re-encodes as UTF-8
        if isinstance(v, str):
            v.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(JOB_SIGNATURES).flatmap(lambda ts: st.tuples(st.just(ts), st.tuples(*[_value_for(t) for t in ts]))))
def test_the_wrapped_form_always_round_trips(case: tuple[list[str], tuple[Any, ...]]) -> None:
    """The form the SDK's clients send (the argument tuple encoded as one value) always decodes back."""
    types, values = case
    wrapped = encode([f"({','.join(types)})"], [values])
    got = decode_args(types, wrapped)
    norm = encode([f"({','.join(types)})"], [got])
    assert norm == wrapped


@pytest.mark.parametrize("types", JOB_SIGNATURES, ids=lambda ts: ",".join(ts))
@pytest.mark.parametrize("form", ["flat", "wrapped"])
@pytest.mark.parametrize("tail", [b"\x00", b"\x00" * 32, b"\x01" * 32, b"hidden payload"])
def test_bytes_after_a_valid_encoding_are_refused(types: list[str], form: str, tail: bytes) -> None:
    """Input = a valid encoding + anything: refused, saying so (before: decoded, the tail ignored)."""
    values = _SAMPLES[",".join(types)]
    good = encode(types, values) if form == "flat" else encode([f"({','.join(types)})"], [tuple(values)])
    assert decode_args(types, good) == tuple(values)
    with pytest.raises(AbiDecodeError) as err:
        decode_args(types, good + tail)
    message = str(err.value)
    assert f"{len(tail)} trailing byte(s) after the encoding ({len(good)} bytes)" in message, message
    assert message.startswith(f"malformed inputs: expected ({','.join(types)}): ") and "\n" not in message


_SAMPLES: dict[str, list[Any]] = {
    "string": ["vm-1"],
    "string,string": ["vm-1", "snap"],
    "string,string,string": ["src", "snap", "copy"],
    "string,uint32,uint32,string": ["vm-1", 2, 512, ""],
    "uint64,bool,address": [7, True, "0x" + "11" * 20],
    "bytes,uint256[],string[]": [b"\x01\x02", (1, 2), ("a", "bc")],
    "bytes32,int128,(string,uint8)": [b"\x07" * 32, -5, ("x", 3)],
}
