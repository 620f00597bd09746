"""Job 8's new inputs (DESIGN.md §8): SSH keys, ports, disk size; every error names its field."""

from __future__ import annotations

import base64
import os

import pytest

from microvm_blueprint.runtime import access
from microvm_blueprint.runtime.errors import InvalidInput


def _blob(key_type: str, payload: bytes = b"") -> str:
    t = key_type.encode()
    return base64.b64encode(len(t).to_bytes(4, "big") + t + payload).decode()


def key(key_type: str = "ssh-ed25519", comment: str = "me@host", payload: bytes | None = None) -> str:
    data = payload if payload is not None else (32).to_bytes(4, "big") + os.urandom(32)
    line = f"{key_type} {_blob(key_type, data)}"
    return f"{line} {comment}" if comment else line


@pytest.mark.parametrize("key_type", access.KEY_TYPES)
def test_every_known_key_type_is_accepted(key_type: str) -> None:
    k = key(key_type)
    assert access.validate_ssh_keys([k]) == (k,)
    bare = key(key_type, comment="")
    assert access.validate_ssh_key(bare) == bare  # the comment is optional


def test_a_key_made_by_ssh_keygen_is_accepted() -> None:
    # a real ed25519 public key (fixed, from ssh-keygen -t ed25519)
    real = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFNGMa6e5RyWvtnugA0FwZ1M6BZasAb9bkLLhGTcR/y3 test@example"
    assert access.validate_ssh_keys([real]) == (real,)
    assert access.validate_ssh_keys([]) == ()


NINE_KIB = key(comment="x" * (9 * 1024))

BAD_KEYS = [
    ("multi-line", [key() + "\n" + key()], r"ssh_authorized_keys\[0\] must be a single line"),
    ("trailing newline", [key() + "\n"], r"ssh_authorized_keys\[0\] must be a single line"),
    ("carriage return", [key(), key() + "\rssh-rsa x"], r"ssh_authorized_keys\[1\] must be a single line"),
    ("9 KiB", [NINE_KIB], r"ssh_authorized_keys\[0\] is \d+ bytes, more than the maximum of 8192"),
    ("bad type", [key("ssh-dss")], r"ssh_authorized_keys\[0\] has an unknown key type 'ssh-dss'"),
    ("options first", ['command="/bin/sh" ' + key()], r"ssh_authorized_keys\[0\] has an unknown key type"),
    ("NUL", [key() + "\0"], r"ssh_authorized_keys\[0\] contains a NUL character"),
    ("tab", [key().replace(" ", "\t", 1)], r"ssh_authorized_keys\[0\] must be printable ASCII"),
    ("escape", [key(comment="\x1b[2J")], r"ssh_authorized_keys\[0\] must be printable ASCII"),
    ("unicode line separator", [key(comment="a\u2028b")], r"ssh_authorized_keys\[0\] must be printable ASCII"),
    ("empty", [""], r"ssh_authorized_keys\[0\] must not be empty"),
    ("not a string", [b"ssh-ed25519 AAAA"], r"ssh_authorized_keys\[0\] must be a string"),
    ("no data", ["ssh-ed25519"], r"ssh_authorized_keys\[0\] has no key data"),
    ("bad base64", ["ssh-ed25519 ***"], r"ssh_authorized_keys\[0\] key data is not valid base64"),
    ("type mismatch", [f"ssh-ed25519 {_blob('ssh-rsa')} x"], r"ssh_authorized_keys\[0\] key data is not a ssh-ed25519"),
    ("17 keys", [key() for _ in range(17)], r"ssh_authorized_keys has 17 keys, more than the maximum of 16"),
    ("a string, not a list", key(), r"ssh_authorized_keys must be a list of strings"),
    ("YAML-ish comment", [key(comment="x\n- evil")], r"must be a single line"),
]


@pytest.mark.parametrize(("keys", "message"), [(k, m) for _, k, m in BAD_KEYS], ids=[n for n, _, _ in BAD_KEYS])
def test_hostile_keys_are_rejected_naming_the_field(keys: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        access.validate_ssh_keys(keys)


def test_sixteen_keys_of_8_kib_each_are_the_limit() -> None:
    k = key(comment="")
    k = k + " " + "c" * (access.MAX_KEY_BYTES - len(k) - 1)
    assert len(k.encode()) == access.MAX_KEY_BYTES
    assert len(access.validate_ssh_keys([k] * 16)) == 16
    with pytest.raises(InvalidInput, match="more than the maximum of 8192"):
        access.validate_ssh_key(k + "c")


BAD_PORTS = [
    ("17 ports", list(range(1, 18)), r"ports has 17 entries, more than the maximum of 16"),
    ("port 0", [22, 0], r"ports\[1\] 0 is not a port number \(1-65535\)"),
    ("65536", [65536], r"ports\[0\] 65536 is not a port number"),
    ("negative", [-22], r"ports\[0\] -22 is not a port number"),
    ("duplicates", [22, 80, 22], r"ports\[2\] 22 is listed twice"),
    ("bool", [True], r"ports\[0\] must be an integer"),
    ("string", ["22"], r"ports\[0\] must be an integer"),
    ("not a list", "22", r"ports must be a list of integers"),
]


@pytest.mark.parametrize(("ports", "message"), [(p, m) for _, p, m in BAD_PORTS], ids=[n for n, _, _ in BAD_PORTS])
def test_bad_ports_are_rejected_naming_the_field(ports: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        access.validate_ports(ports)


def test_good_ports_keep_their_order() -> None:
    assert access.validate_ports([]) == ()
    assert access.validate_ports([8080, 22, 1, 65535]) == (8080, 22, 1, 65535)
    assert access.validate_ports(list(range(1, 17))) == tuple(range(1, 17))


@pytest.mark.parametrize(("disk", "image", "message"), [
    (-1, None, "disk_mib must not be negative"),
    (True, None, "disk_mib must be an integer"),
    ("512", None, "disk_mib must be an integer"),
    (access.MAX_DISK_MIB + 1, None, "disk_mib 1048577 exceeds the maximum of 1048576"),
    (100, 512, "disk_mib 100 is smaller than the image's 512 MiB"),
])
def test_bad_disk_sizes_are_rejected(disk: object, image: int | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        access.validate_disk_mib(disk, image)


def test_good_disk_sizes() -> None:
    assert access.validate_disk_mib(0, 512) == 0  # the image's own size
    assert access.validate_disk_mib(512, 512) == 512
    assert access.validate_disk_mib(2048, 512) == 2048
    with pytest.raises(InvalidInput, match="exceeds the maximum of 1024"):
        access.validate_disk_mib(2048, 512, max_mib=1024)
