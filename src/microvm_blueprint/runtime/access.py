"""Validation of the ways into a VM that job 8 asks for (DESIGN.md §8): SSH keys, published ports, disk size.

Pure functions: each takes what a customer sent and returns it normalised (tuples), or raises
:class:`~.errors.InvalidInput` with a message that names the field (``ssh_authorized_keys[2] ...``).
Nothing here touches the host; the limits are the ones §8 settles.

What a key may be is kept narrow on purpose, because a key ends up in files the guest reads (the config
drive's ``user-data``, then ``/root/.ssh/authorized_keys``): one line of printable ASCII, a known key type,
a single space, the base64 key blob whose own type string matches, and an optional comment. No
``authorized_keys`` options (``command=...``), no control characters of any kind.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from .errors import InvalidInput

MAX_KEYS = 16
MAX_KEY_BYTES = 8 * 1024
MAX_PORTS = 16
MAX_DISK_MIB = 1024 * 1024
"""1 TiB: a bound on the qcow2 virtual size a customer may ask for (host quotas may be lower)."""
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def utf8_text(field: str, value: object) -> tuple[str, bytes]:
    """``value`` and its UTF-8 bytes if it is a non-empty string that encodes (no lone surrogates);
    else :class:`~.errors.InvalidInput` naming ``field``. The common start of every text a customer sends
    (ids, keys); each caller then checks the length and characters its own rules allow."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    if value == "":
        raise InvalidInput(f"{field} must not be empty")
    try:
        return value, value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{field} is not valid UTF-8") from exc


def validate_ssh_key(key: object, field: str = "ssh_authorized_keys[0]") -> str:
    """One ``authorized_keys`` line: ``TYPE BASE64 [COMMENT]``; returns it unchanged."""
    key, raw = utf8_text(field, key)
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidInput(f"{field} is {len(raw)} bytes, more than the maximum of {MAX_KEY_BYTES}")
    if "\n" in key or "\r" in key:
        raise InvalidInput(f"{field} must be a single line")
    if "\0" in key:
        raise InvalidInput(f"{field} contains a NUL character")
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in key):
        raise InvalidInput(f"{field} must be printable ASCII (no control or non-ASCII characters)")
    parts = key.split(" ", 2)
    key_type = parts[0]
    if key_type not in KEY_TYPES:
        raise InvalidInput(f"{field} has an unknown key type {key_type[:40]!r} (known: {', '.join(KEY_TYPES)})")
    if len(parts) < 2 or parts[1] == "":
        raise InvalidInput(f"{field} has no key data after the type")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{field} key data is not valid base64") from exc
    if len(blob) < 4 or blob[4 : 4 + int.from_bytes(blob[:4], "big")] != key_type.encode():
        raise InvalidInput(f"{field} key data is not a {key_type} key")
    return key


def validate_ssh_keys(keys: object) -> tuple[str, ...]:
    """At most :data:`MAX_KEYS` keys, each valid for :func:`validate_ssh_key`."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
        raise InvalidInput("ssh_authorized_keys must be a list of strings")
    if len(keys) > MAX_KEYS:
        raise InvalidInput(f"ssh_authorized_keys has {len(keys)} keys, more than the maximum of {MAX_KEYS}")
    return tuple(validate_ssh_key(k, f"ssh_authorized_keys[{i}]") for i, k in enumerate(keys))


def validate_ports(ports: object) -> tuple[int, ...]:
    """At most :data:`MAX_PORTS` distinct guest ports in 1-65535, in the order given."""
    if isinstance(ports, str | bytes) or not isinstance(ports, Sequence):
        raise InvalidInput("ports must be a list of integers")
    if len(ports) > MAX_PORTS:
        raise InvalidInput(f"ports has {len(ports)} entries, more than the maximum of {MAX_PORTS}")
    seen: set[int] = set()
    for i, port in enumerate(ports):
        if isinstance(port, bool) or not isinstance(port, int):
            raise InvalidInput(f"ports[{i}] must be an integer")
        if not 1 <= port <= 65535:
            raise InvalidInput(f"ports[{i}] {port} is not a port number (1-65535)")
        if port in seen:
            raise InvalidInput(f"ports[{i}] {port} is listed twice")
        seen.add(port)
    return tuple(ports)


def validate_disk_mib(disk_mib: object, image_mib: int | None = None, max_mib: int = MAX_DISK_MIB) -> int:
    """``0`` (the image's size) or a size of at least the image's and at most ``max_mib``."""
    if isinstance(disk_mib, bool) or not isinstance(disk_mib, int):
        raise InvalidInput("disk_mib must be an integer")
    if disk_mib < 0:
        raise InvalidInput("disk_mib must not be negative")
    if disk_mib == 0:
        return 0
    if disk_mib > max_mib:
        raise InvalidInput(f"disk_mib {disk_mib} exceeds the maximum of {max_mib}")
    if image_mib is not None and disk_mib < image_mib:
        raise InvalidInput(f"disk_mib {disk_mib} is smaller than the image's {image_mib} MiB")
    return disk_mib
