"""The heartbeat's EIP-712 digest, signature and metrics encoding, checked against eth-account (an
independent implementation, dev extra only) and hand-computed values."""

from __future__ import annotations

import pytest
from eth_abi import decode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from microvm_blueprint.tangle import contracts
from microvm_blueprint.tangle.errors import ConfigError, TangleError
from microvm_blueprint.tangle.heartbeat import (
    HEARTBEAT_TYPEHASH,
    SEL_SUBMIT_HEARTBEAT,
    domain_separator,
    encode_metrics,
    heartbeat_digest,
    sign_digest,
    submit_heartbeat_data,
)
from microvm_blueprint.tangle.keystore import _from_secret

KEY = bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")  # anvil #1
OPERATOR = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
REGISTRY = "0x2bdCC0de6bE1f7D2ee689a0342D76F52E8EFABa3"

TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Heartbeat": [
        {"name": "operator", "type": "address"},
        {"name": "serviceId", "type": "uint64"},
        {"name": "blueprintId", "type": "uint64"},
        {"name": "statusCode", "type": "uint8"},
        {"name": "metricsHash", "type": "bytes32"},
        {"name": "timestamp", "type": "uint64"},
    ],
}


def _oracle(chain_id: int, service_id: int, blueprint_id: int, code: int, metrics: bytes, ts: int) -> bytes:
    msg = encode_typed_data(full_message={
        "types": TYPES,
        "primaryType": "Heartbeat",
        "domain": {"name": "OperatorStatusRegistry", "version": "1", "chainId": chain_id,
                   "verifyingContract": REGISTRY},
        "message": {"operator": OPERATOR, "serviceId": service_id, "blueprintId": blueprint_id, "statusCode": code,
                    "metricsHash": keccak(metrics), "timestamp": ts},
    })
    return keccak(b"\x19" + msg.version + msg.header + msg.body)


@pytest.mark.parametrize(
    ("chain_id", "service_id", "blueprint_id", "code", "metrics", "ts"),
    [
        (31337, 0, 0, 0, b"", 1_700_000_000),
        (1, 2**64 - 1, 7, 3, encode_metrics([("vms_running", 2)]), 2**64 - 1),
        (3799, 12, 0, 99, encode_metrics([("a", 0), ("b", 2**256 - 1)]), 5),
    ],
)
def test_digest_matches_eth_account(chain_id: int, service_id: int, blueprint_id: int, code: int, metrics: bytes,
                                    ts: int) -> None:
    ours = heartbeat_digest(chain_id=chain_id, registry=REGISTRY, operator=OPERATOR, service_id=service_id,
                            blueprint_id=blueprint_id, status_code=code, metrics=metrics, timestamp=ts)
    assert ours == _oracle(chain_id, service_id, blueprint_id, code, metrics, ts)


def test_known_digest_and_type_hash() -> None:
    assert HEARTBEAT_TYPEHASH == keccak(
        b"Heartbeat(address operator,uint64 serviceId,uint64 blueprintId,uint8 statusCode,bytes32 metricsHash,"
        b"uint64 timestamp)"
    )
    # computed once with eth-account's encode_typed_data for these values (pinned, so a change on either
    # side shows)
    digest = heartbeat_digest(chain_id=31337, registry=REGISTRY, operator=OPERATOR, service_id=0, blueprint_id=0,
                              status_code=0, metrics=b"", timestamp=1_700_000_000)
    assert digest.hex() == "5ed44eee5b773ad40d501af6009de3526746d7c484a8ddb0f74a7de47d66a767"
    digest = heartbeat_digest(chain_id=31337, registry=REGISTRY, operator=OPERATOR, service_id=0, blueprint_id=0,
                              status_code=1, metrics=encode_metrics([("vms_running", 2)]), timestamp=1_700_000_000)
    assert digest.hex() == "22c605302da63514fc2cfe9eb24bb70eca13b62c04390760ef09a897fce237fc"
    assert domain_separator(31337, REGISTRY) != domain_separator(31338, REGISTRY)


def test_signature_is_r_s_v_and_recovers_the_operator() -> None:
    key = _from_secret(KEY)
    for ts in range(1_700_000_000, 1_700_000_010):  # both recovery ids turn up
        digest = heartbeat_digest(chain_id=31337, registry=REGISTRY, operator=key.address, service_id=0,
                                  blueprint_id=0, status_code=0, metrics=b"", timestamp=ts)
        sig = sign_digest(digest, KEY)
        assert len(sig) == 65 and sig[64] in (27, 28)
        assert Account._recover_hash(digest, signature=sig) == OPERATOR
        assert int.from_bytes(sig[32:64], "big") <= 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def test_metrics_encoding() -> None:
    assert encode_metrics([]) == b""
    pairs = [("vms_running", 2), ("vms_total", 3), ("jobs_done", 10), ("jobs_failed", 1), ("guest_memory_mib", 512)]
    raw = encode_metrics(pairs)
    assert decode(["(string,uint256)[]"], raw) == (tuple(pairs),)
    # the head is the offset of the one dynamic value, then the array length
    assert raw[:32] == (32).to_bytes(32, "big") and raw[32:64] == (5).to_bytes(32, "big")
    with pytest.raises(TangleError):
        encode_metrics([("x", -1)])
    with pytest.raises(TangleError):
        encode_metrics([("x", 2**256)])


def test_submit_heartbeat_calldata() -> None:
    assert SEL_SUBMIT_HEARTBEAT.hex() == "2bf4d6a7" == contracts.selector(contracts.SUBMIT_HEARTBEAT)[2:]
    data = submit_heartbeat_data(1, 2, 3, b"\x01\x02", 4, b"\x05" * 65)
    assert data[:4] == SEL_SUBMIT_HEARTBEAT
    assert decode(["uint64", "uint64", "uint8", "bytes", "uint64", "bytes"], data[4:]) == (
        1, 2, 3, b"\x01\x02", 4, b"\x05" * 65)


BASE_ENV = {"DATA_DIR": "/var/lib/op", "BLUEPRINT_ID": "3", "SERVICE_ID": "7",
            "TANGLE_CONTRACT": "0x0165878A594ca255338adfa4d48449f69242Eb8F"}


def test_heartbeat_interval_setting() -> None:
    from microvm_blueprint.tangle.environment import BlueprintEnvironment

    assert BlueprintEnvironment.load(BASE_ENV).heartbeat_interval == 300.0
    assert BlueprintEnvironment.load({**BASE_ENV, "HEARTBEAT_INTERVAL_SECS": "0"}).heartbeat_interval == 0.0
    assert BlueprintEnvironment.load({**BASE_ENV, "HEARTBEAT_INTERVAL_SECS": "60"}).heartbeat_interval == 60.0
    assert BlueprintEnvironment.load({**BASE_ENV, "HEARTBEAT_INTERVAL_SECS": " "}).heartbeat_interval == 300.0
    for bad, words in [("abc", "is not a number of seconds"), ("-1", "must be between"), ("0.5", "at least 1"),
                       ("1e9", "must be between")]:
        with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL_SECS") as info:
            BlueprintEnvironment.load({**BASE_ENV, "HEARTBEAT_INTERVAL_SECS": bad})
        assert words in str(info.value) and "\n" not in str(info.value)


def test_jitter_stays_within_ten_percent() -> None:
    from microvm_blueprint.tangle.heartbeat import HeartbeatService

    hb = HeartbeatService(None, None, _from_secret(KEY), registry=REGISTRY, service_id=0,  # type: ignore[arg-type]
                          blueprint_id=0, interval=300)
    delays = [hb.next_delay() for _ in range(2000)]
    assert 270 <= min(delays) < 280 and 320 < max(delays) <= 330
