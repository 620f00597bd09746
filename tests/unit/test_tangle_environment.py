"""BlueprintEnvironment: defaults, flag precedence, and one clear line naming each bad variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from microvm_blueprint import errors
from microvm_blueprint.tangle.environment import BlueprintEnvironment, Secret
from microvm_blueprint.tangle.errors import ConfigError, TangleError

TANGLE = "0x0165878A594ca255338adfa4d48449f69242Eb8F"
BASE = {"DATA_DIR": "/var/lib/op", "BLUEPRINT_ID": "3", "SERVICE_ID": "7", "TANGLE_CONTRACT": TANGLE}


def test_defaults() -> None:
    env = BlueprintEnvironment.load(BASE)
    assert env.http_rpc_url == "http://127.0.0.1:9944"
    assert env.ws_rpc_url is None
    assert env.keystore_uri == Path("./keystore")
    assert env.data_dir == Path("/var/lib/op")
    assert (env.blueprint_id, env.service_id, env.tangle_contract) == (3, 7, TANGLE)
    assert env.protocol == "tangle" and env.chain is None
    assert (env.test_mode, env.dry_run) == (False, False)
    assert (env.staking_contract, env.status_registry_contract, env.from_block) == (None, None, None)
    assert (env.max_getlogs_range, env.poll_interval, env.confirmations) == (1000, 1.0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.service_id = 8  # type: ignore[misc]


def test_everything_set() -> None:
    env = BlueprintEnvironment.load({
        **BASE,
        "HTTP_RPC_URL": "https://rpc.example:8545/x", "WS_RPC_URL": "wss://rpc.example/ws",
        "KEYSTORE_URI": "file:///etc/op/keystore", "CHAIN": "testnet", "PROTOCOL": "Tangle",
        "TEST_MODE": "true", "DRY_RUN": "1",
        "STAKING_CONTRACT": "0xdc64a140aa3e981100a9beca4e685f962f0cf6c9",
        "STATUS_REGISTRY_CONTRACT": "0x2bdCC0de6bE1f7D2ee689a0342D76F52E8EFABa3",
        "FROM_BLOCK": "0x10", "MAX_GETLOGS_RANGE": "5000", "POLL_INTERVAL": "0.25", "CONFIRMATIONS": "2",
        "RESULT_LINGER": "0.5",
    })
    assert env.keystore_uri == Path("/etc/op/keystore")
    assert env.staking_contract == "0xDc64a140Aa3E981100a9becA4E685f962f0cF6C9"  # checksummed
    assert (env.test_mode, env.dry_run, env.from_block) == (True, True, 16)
    assert (env.max_getlogs_range, env.poll_interval, env.confirmations) == (5000, 0.25, 2)
    assert env.result_linger == 0.5 and BlueprintEnvironment.load(BASE).result_linger == 0.05
    assert (env.chain, env.protocol, env.ws_rpc_url) == ("testnet", "tangle", "wss://rpc.example/ws")


def test_flags_override_env_and_none_means_not_given() -> None:
    env = BlueprintEnvironment.load(
        {**BASE, "HTTP_RPC_URL": "http://env:1"},
        http_rpc_url="http://flag:2", data_dir=None, dry_run=True, from_block=9, service_id=None,
        poll_interval=0.5,
    )
    assert env.http_rpc_url == "http://flag:2"
    assert env.data_dir == Path("/var/lib/op") and env.service_id == 7
    assert env.dry_run and env.from_block == 9 and env.poll_interval == 0.5
    with pytest.raises(TypeError, match="unknown BlueprintEnvironment setting"):
        BlueprintEnvironment.load(BASE, dryrun=True)


def test_service_id_only_required_for_run() -> None:
    env = {k: v for k, v in BASE.items() if k != "SERVICE_ID"}
    with pytest.raises(ConfigError, match=r"^SERVICE_ID is required for run$"):
        BlueprintEnvironment.load(env)
    assert BlueprintEnvironment.load(env, require_service=False).service_id is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DATA_DIR", "", "DATA_DIR is required"),
        ("DATA_DIR", "   ", "DATA_DIR is required"),
        ("BLUEPRINT_ID", "", "BLUEPRINT_ID is required"),
        ("BLUEPRINT_ID", "x", "BLUEPRINT_ID='x' is not an unsigned integer"),
        ("SERVICE_ID", "-1", "SERVICE_ID='-1' is out of range for uint64"),
        ("SERVICE_ID", str(2**64), "SERVICE_ID='18446744073709551616' is out of range for uint64"),
        ("SERVICE_ID", "٣", "SERVICE_ID='٣' is not an unsigned integer"),
        ("SERVICE_ID", "1.5", "SERVICE_ID='1.5' is not an unsigned integer"),
        ("TANGLE_CONTRACT", "", "TANGLE_CONTRACT is required"),
        ("TANGLE_CONTRACT", "0x123", "TANGLE_CONTRACT='0x123' is not an EVM address"),
        ("TANGLE_CONTRACT", TANGLE.replace("A", "a", 1), "is not an EVM address"),  # bad checksum
        ("TANGLE_CONTRACT", "0x" + "0" * 40, "TANGLE_CONTRACT='0x0000000000000000000000000000000000000000' is the zero"),
        ("STAKING_CONTRACT", "staking", "STAKING_CONTRACT='staking' is not an EVM address"),
        ("STATUS_REGISTRY_CONTRACT", "0xzz", "STATUS_REGISTRY_CONTRACT='0xzz' is not an EVM address"),
        ("HTTP_RPC_URL", "ftp://x", "HTTP_RPC_URL='ftp://x' is not a http/https URL"),
        ("HTTP_RPC_URL", "http://[::1", "HTTP_RPC_URL='http://[::1' is not a http/https URL"),
        ("HTTP_RPC_URL", "http://host:99999", "HTTP_RPC_URL='http://host:99999' is not a http/https URL"),
        ("HTTP_RPC_URL", "localhost:8545", "is not a http/https URL"),
        ("WS_RPC_URL", "http://x", "WS_RPC_URL='http://x' is not a ws/wss URL"),
        ("KEYSTORE_URI", "s3://bucket/keys", "KEYSTORE_URI='s3://bucket/keys': only filesystem paths"),
        ("PROTOCOL", "eigenlayer", "PROTOCOL='eigenlayer' is not supported (only 'tangle')"),
        ("TEST_MODE", "perhaps", "TEST_MODE='perhaps' is not a boolean"),
        ("DRY_RUN", "2", "DRY_RUN='2' is not a boolean"),
        ("FROM_BLOCK", "latest", "FROM_BLOCK='latest' is not an unsigned integer"),
        ("MAX_GETLOGS_RANGE", "0", "MAX_GETLOGS_RANGE must be at least 1"),
        ("MAX_GETLOGS_RANGE", str(2**32), "MAX_GETLOGS_RANGE='4294967296' is out of range for uint32"),
        ("POLL_INTERVAL", "soon", "POLL_INTERVAL='soon' is not a number of seconds"),
        ("POLL_INTERVAL", "nan", "POLL_INTERVAL='nan' must be between 0.01 and 3600 seconds"),
        ("POLL_INTERVAL", "0", "POLL_INTERVAL='0' must be between"),
        ("CONFIRMATIONS", "-2", "CONFIRMATIONS='-2' is out of range for uint16"),
        ("RESULT_LINGER", "a bit", "RESULT_LINGER='a bit' is not a number of seconds"),
        ("RESULT_LINGER", "-0.1", "RESULT_LINGER='-0.1' must be between 0 and 60 seconds"),
        ("RESULT_LINGER", "inf", "RESULT_LINGER='inf' must be between 0 and 60 seconds"),
        ("RESULT_LINGER", "nan", "RESULT_LINGER='nan' must be between"),
    ],
)
def test_a_bad_value_names_its_variable_in_one_line(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        BlueprintEnvironment.load({**BASE, name: value})
    text = str(err.value)
    assert message in text, text
    assert name in text and "\n" not in text
    # a bad setting is the root ConfigError (shared by every layer), not a chain-side TangleError
    assert type(err.value) is errors.ConfigError and not isinstance(err.value, TangleError)


def test_secret_hides_its_value() -> None:
    key = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
    s = Secret(key)
    for shown in (repr(s), str(s), f"{s}", f"{s!r}", repr([s]), repr({"k": s})):
        assert "59c6" not in shown
    assert s.reveal() == key
    assert s == Secret(key) and s != Secret("other") and s != key
