"""The blueprint-sdk filesystem keystore layout: <root>/Ecdsa/<hex(blake3(compressed pubkey))>."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import blake3
import coincurve
import pytest
from eth_account import Account

from microvm_blueprint.tangle.errors import KeystoreError
from microvm_blueprint.tangle.keystore import (
    generate_key,
    import_key,
    key_file_name,
    list_keys,
    load_operator_key,
)

ANVIL_1 = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
ANVIL_1_ADDRESS = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def test_import_writes_the_sdk_layout(tmp_path: Path) -> None:
    key = import_key(tmp_path, ANVIL_1)
    assert key.address == ANVIL_1_ADDRESS
    compressed = coincurve.PrivateKey(bytes.fromhex(ANVIL_1[2:])).public_key.format(compressed=True)
    path = tmp_path / "Ecdsa" / blake3.blake3(compressed).hexdigest()
    assert [p.name for p in (tmp_path / "Ecdsa").iterdir()] == [path.name]
    assert path.name == key_file_name(compressed) and len(path.name) == 64
    content = json.loads(path.read_text())
    assert content == [list(compressed), list(bytes.fromhex(ANVIL_1[2:]))]
    assert all(isinstance(b, int) and 0 <= b < 256 for b in content[0] + content[1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key.public_key) == 65 and key.public_key[0] == 4 and key.compressed == compressed


def test_round_trip_and_the_secret_stays_hidden(tmp_path: Path) -> None:
    made = generate_key(tmp_path)
    loaded = load_operator_key(tmp_path)
    assert loaded == made
    secret = made.secret.reveal()
    assert Account.from_key(secret).address == made.address
    assert secret.hex() not in repr(made) and secret.hex() not in str(loaded)
    assert secret.hex() not in repr(made.private_key_hex)


def test_the_first_key_by_file_name_is_the_operator(tmp_path: Path) -> None:
    keys = [generate_key(tmp_path) for _ in range(4)]
    by_name = sorted(keys, key=lambda k: key_file_name(k.compressed))
    assert load_operator_key(tmp_path) == by_name[0]
    assert list_keys(tmp_path) == by_name
    (tmp_path / "Ecdsa" / ".tmp-leftover").write_text("half-written")  # skipped
    assert load_operator_key(tmp_path) == by_name[0]


def test_a_key_file_written_by_the_sdk_is_read(tmp_path: Path) -> None:
    secret = bytes(range(1, 33))
    compressed = coincurve.PrivateKey(secret).public_key.format(compressed=True)
    folder = tmp_path / "Ecdsa"
    folder.mkdir()
    (folder / blake3.blake3(compressed).hexdigest()).write_text(json.dumps([list(compressed), list(secret)]))
    key = load_operator_key(tmp_path)
    assert key.secret.reveal() == secret and key.address == Account.from_key(secret).address


def test_missing_and_empty_keystores(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match=r"no ECDSA keystore at .*keys create"):
        load_operator_key(tmp_path / "nowhere")
    (tmp_path / "Ecdsa").mkdir()
    with pytest.raises(KeystoreError, match="holds no ECDSA key"):
        load_operator_key(tmp_path)
    assert list_keys(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "malformed keystore entry"),
        ("{}", "malformed keystore entry"),
        ("[[1, 2, 3]]", "malformed keystore entry"),
        ("[[300], [1]]", "malformed keystore entry"),
        (json.dumps([[2] * 33, [1] * 31]), "wrong key lengths"),
        (json.dumps([[2] * 33, [1] * 32]), "public key does not match the secret"),
        (json.dumps([[2] * 33, [0] * 32]), "invalid secp256k1 secret key"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    folder = tmp_path / "Ecdsa"
    folder.mkdir()
    (folder / ("ab" * 32)).write_text(content)
    with pytest.raises(KeystoreError, match=message):
        load_operator_key(tmp_path)


def test_a_readable_key_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = import_key(tmp_path, ANVIL_1)
    path = tmp_path / "Ecdsa" / key_file_name(key.compressed)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="microvm_blueprint.tangle.keystore"):
        load_operator_key(tmp_path)
    assert "readable by other users" in caplog.text
    assert ANVIL_1[2:] not in caplog.text


@pytest.mark.parametrize("secret", ["", "0x12", "zz" * 32, "00" * 33])
def test_import_refuses_a_bad_secret_without_echoing_it(tmp_path: Path, secret: str) -> None:
    with pytest.raises(KeystoreError) as err:
        import_key(tmp_path, secret)
    assert "32 bytes of hex" in str(err.value)
    if secret:
        assert secret not in str(err.value)
    assert not (tmp_path / "Ecdsa").exists() or not list((tmp_path / "Ecdsa").iterdir())


def test_an_unwritable_keystore_is_a_keystore_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(KeystoreError, match="cannot write keystore"):
        generate_key(tmp_path / "file")
