"""The blueprint-sdk filesystem keystore, ECDSA (secp256k1) keys only.

Layout: ``<root>/Ecdsa/<hex(blake3(33-byte compressed public key))>``; each file holds JSON
``[[33 public key bytes as ints], [32 secret bytes as ints]]``. The first key (by file name) is the
operator. Files are written 0600 through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import blake3
import coincurve
from eth_utils import keccak, to_checksum_address

from .environment import Secret
from .errors import KeystoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorKey:
    address: str
    public_key: bytes  # 65-byte uncompressed (0x04 || x || y)
    compressed: bytes
    secret: Secret[bytes]

    @property
    def private_key_hex(self) -> Secret[str]:
        return Secret("0x" + self.secret.reveal().hex())


def _from_secret(secret: bytes) -> OperatorKey:
    try:
        priv = coincurve.PrivateKey(secret)
    except (ValueError, TypeError) as exc:
        raise KeystoreError("invalid secp256k1 secret key") from exc
    uncompressed = priv.public_key.format(compressed=False)
    address = to_checksum_address(keccak(uncompressed[1:])[-20:])
    return OperatorKey(address, uncompressed, priv.public_key.format(compressed=True), Secret(secret))


def _dir(root: Path) -> Path:
    return Path(root) / "Ecdsa"


def key_file_name(compressed_pubkey: bytes) -> str:
    return blake3.blake3(compressed_pubkey).hexdigest()


def _write(root: Path, key: OperatorKey) -> Path:
    folder = _dir(root)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / key_file_name(key.compressed)
        content = json.dumps([list(key.compressed), list(key.secret.reveal())])
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")  # created 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise KeystoreError(f"cannot write keystore at {folder}: {exc.strerror or exc}") from exc
    return path


def generate_key(root: Path | str) -> OperatorKey:
    """A fresh random key written to the keystore (its ``address`` is what to register and fund)."""
    key = _from_secret(secrets.token_bytes(32))
    _write(Path(root), key)
    return key


def key_from_hex(secret_hex: str) -> OperatorKey:
    """The key of a hex secret (``0x`` optional, surrounding whitespace ignored); the secret is never echoed."""
    text = secret_hex.strip().removeprefix("0x")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise KeystoreError("secret must be 32 bytes of hex") from None
    if len(secret) != 32:
        raise KeystoreError("secret must be 32 bytes of hex")
    return _from_secret(secret)


def import_key(root: Path | str, secret_hex: str) -> OperatorKey:
    """Write the key of a hex secret (``0x`` optional) to the keystore; the secret is never echoed."""
    key = key_from_hex(secret_hex)
    _write(Path(root), key)
    return key


def _read(path: Path) -> OperatorKey:
    try:
        data = json.loads(path.read_text())
        pub, sec = bytes(data[0]), bytes(data[1])
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore entry {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise KeystoreError(f"malformed keystore entry {path} (expected JSON [[33 ints], [32 ints]])") from exc
    if len(pub) != 33 or len(sec) != 32:
        raise KeystoreError(f"malformed keystore entry {path.name}: wrong key lengths")
    key = _from_secret(sec)
    if key.compressed != pub:
        raise KeystoreError(f"keystore entry {path.name}: public key does not match the secret")
    if path.name != key_file_name(pub):
        log.warning("keystore entry %s is not named after its public key (expected %s)", path.name,
                    key_file_name(pub))
    try:
        if path.stat().st_mode & 0o077:
            log.warning("keystore entry %s is readable by other users; chmod 600 it", path)
    except OSError:
        pass
    return key


def list_keys(root: Path | str) -> list[OperatorKey]:
    """Every ECDSA key of the keystore, by file name (temporary ``.tmp-*`` files skipped)."""
    folder = _dir(Path(root))
    if not folder.is_dir():
        return []
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise KeystoreError(f"cannot list keystore {folder}: {exc.strerror or exc}") from exc
    return [_read(p) for p in entries]


def load_operator_key(root: Path | str) -> OperatorKey:
    """The first ECDSA key of the keystore: the operator's."""
    folder = _dir(Path(root))
    if not folder.is_dir():
        raise KeystoreError(
            f"no ECDSA keystore at {folder} (create one with `microvm-blueprint keys create` or `keys import`)"
        )
    keys = list_keys(root)
    if not keys:
        raise KeystoreError(f"keystore {folder} holds no ECDSA key")
    return keys[0]
