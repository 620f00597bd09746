"""Legacy transactions signed with coincurve, checked byte for byte against eth-account (kept as a test
oracle only) and decoded with pyrlp. anvil checks the same bytes in the chain tests (the sender it
recovers must hold the funds and the nonce)."""

from __future__ import annotations

import coincurve
import pytest
import rlp
from eth_account import Account
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from microvm_blueprint.tangle.errors import TangleError
from microvm_blueprint.tangle.keystore import key_from_hex
from microvm_blueprint.tangle.signing import LegacyTx, rlp_encode, sign_legacy

ANVIL_1 = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"

uint256 = st.integers(min_value=0, max_value=2**256 - 1)
secrets = st.integers(min_value=1, max_value=coincurve.utils.GROUP_ORDER_INT - 1).map(lambda n: n.to_bytes(32, "big"))


@settings(max_examples=150, deadline=None)
@given(
    secret=secrets,
    nonce=st.integers(min_value=0, max_value=2**64 - 1),
    gas_price=uint256,
    gas=st.integers(min_value=21_000, max_value=2**63),
    to=st.binary(min_size=20, max_size=20),
    value=uint256,
    data=st.binary(max_size=300),
    chain_id=st.integers(min_value=1, max_value=2**48),
)
def test_the_same_bytes_as_eth_account(
    secret: bytes, nonce: int, gas_price: int, gas: int, to: bytes, value: int, data: bytes, chain_id: int
) -> None:
    address = to_checksum_address(to)
    ours = sign_legacy(LegacyTx(nonce, gas_price, gas, address, data, chain_id, value), secret)
    tx = {"nonce": nonce, "gasPrice": gas_price, "gas": gas, "to": address, "value": value, "data": data,
          "chainId": chain_id}
    assert ours == bytes(Account.sign_transaction(tx, secret).raw_transaction)


def test_the_signer_is_recovered_and_the_fields_are_as_given() -> None:
    key = key_from_hex(ANVIL_1)
    raw = sign_legacy(LegacyTx(nonce=7, gas_price=10**9, gas=500_000, to=CONTRACT, data=b"\x01\x02", chain_id=31337),
                      key.secret.reveal())
    assert Account.recover_transaction(raw) == key.address == "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    nonce, gas_price, gas, to, value, data, v, r, s = rlp.decode(raw)
    assert [int.from_bytes(x, "big") for x in (nonce, gas_price, gas, value)] == [7, 10**9, 500_000, 0]
    assert to == bytes.fromhex(CONTRACT[2:]) and data == b"\x01\x02"
    assert int.from_bytes(v, "big") in (31337 * 2 + 35, 31337 * 2 + 36)  # EIP-155
    assert int.from_bytes(s, "big") <= coincurve.utils.GROUP_ORDER_INT // 2  # low s (EIP-2)
    assert 0 < len(r) <= 32
    assert raw == sign_legacy(LegacyTx(7, 10**9, 500_000, CONTRACT.lower(), b"\x01\x02", 31337), key.secret.reveal())


@pytest.mark.parametrize(
    "item",
    [b"", b"\x00", b"\x7f", b"\x80", b"x" * 55, b"x" * 56, b"y" * 1024, [], [[]], [b"a", [b"b", [b""]]],
     [b"z" * 60, [b"\x01"] * 70]],
)
def test_rlp_matches_pyrlp(item: bytes | list[object]) -> None:
    assert rlp_encode(item) == rlp.encode(item)  # type: ignore[arg-type]


@pytest.mark.parametrize("to", ["0x1234", "0xzz" + "00" * 19, "not an address"])
def test_a_bad_recipient_is_a_tangle_error(to: str) -> None:
    with pytest.raises(TangleError, match="recipient"):
        sign_legacy(LegacyTx(0, 0, 21_000, to, b"", 1), bytes.fromhex(ANVIL_1[2:]))


def test_a_negative_field_is_a_tangle_error() -> None:
    with pytest.raises(TangleError, match="negative"):
        sign_legacy(LegacyTx(-1, 0, 21_000, CONTRACT, b"", 1), bytes.fromhex(ANVIL_1[2:]))
