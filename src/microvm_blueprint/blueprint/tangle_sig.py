"""Signed reads of the query API (DESIGN.md §9): ``Authorization: Tangle-Sig <address>:<unix seconds>:<0x sig>``.

The signature is an EIP-191 ``personal_sign`` (what a wallet signs) of the text
``microvm-blueprint GET <path and query> <unix seconds>``, where the path and query are the request
target exactly as sent (``/vms/vm-1/console?tail=4096``). The server recovers the signer with
coincurve, takes a signature at most :data:`MAX_AGE` seconds old and at most :data:`MAX_AHEAD` ahead
of its clock, and answers only the VM's owner or the service owner.

Replays: the text names the request and the second, not a nonce, so one signature could be sent again
for as long as it is fresh. The server remembers every read it answered (signer and text) until it is
stale and refuses the same one again: each signed request is good for one read (the CLI signs each
read anew; two reads of one path in the same second by one signer need two seconds). At most
:data:`REMEMBERED` are kept; while that many fresh ones are remembered, new signed reads get a 503.

Kept apart from :mod:`.query` so that the CLI signs without importing the server.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import coincurve
from eth_utils import keccak, to_checksum_address

from ..errors import MicrovmBlueprintError, TransientError

SCHEME = "Tangle-Sig"
#: seconds a signature stays good after the time it names
MAX_AGE = 300
#: seconds the time it names may be ahead of the server's clock
MAX_AHEAD = 60
#: signed reads remembered against replay
REMEMBERED = 10_000
_HEADER = re.compile(SCHEME + r" (0x[0-9a-fA-F]{40}):([0-9]{1,12}):(0x[0-9a-fA-F]{130})")


class Unauthorized(MicrovmBlueprintError):
    """The request is not signed by someone allowed to make it: answered 401."""


class TooManySigned(MicrovmBlueprintError):
    """More fresh signed reads than :data:`REMEMBERED`: answered 503."""


def message(target: str, at: int) -> bytes:
    """The text signed for a GET of ``target`` (path and query as sent) at Unix time ``at``."""
    return f"microvm-blueprint GET {target} {at}".encode()


def _digest(text: bytes) -> bytes:
    """EIP-191 version 0x45 (``personal_sign``): keccak of the prefix, the length in decimal and the text."""
    return keccak(b"\x19Ethereum Signed Message:\n" + str(len(text)).encode() + text)


def sign(secret: bytes, target: str, at: int) -> str:
    """The ``Authorization`` header value for a GET of ``target`` at ``at``, signed with ``secret``."""
    key = coincurve.PrivateKey(secret)
    sig = key.sign_recoverable(_digest(message(target, at)), hasher=None)
    address = to_checksum_address(keccak(key.public_key.format(compressed=False)[1:])[-20:])
    return f"{SCHEME} {address}:{at}:0x{sig[:64].hex()}{sig[64] + 27:02x}"


def recover(text: bytes, signature: bytes) -> str:
    """The (checksummed) address that signed ``text`` with the 65-byte ``r || s || v`` ``signature``
    (``v`` 0/1 or 27/28); :class:`Unauthorized` if it does not verify."""
    v = signature[64] - 27 if signature[64] >= 27 else signature[64]
    if v not in (0, 1):
        raise Unauthorized("signature has a bad recovery id (v must be 27 or 28)")
    try:
        pub = coincurve.PublicKey.from_signature_and_message(signature[:64] + bytes([v]), _digest(text), hasher=None)
    except Exception as exc:  # coincurve raises ValueError or its own errors for a bad point
        raise Unauthorized("signature does not verify") from exc
    return to_checksum_address(keccak(pub.format(compressed=False)[1:])[-20:])


def _same(a: str, b: str | None) -> bool:
    return b is not None and a.lower() == b.lower()


@dataclass
class SignedReads:
    """Who may read what: ``public`` lets everyone; otherwise a fresh signature of the VM's owner or of
    ``service_owner()`` (which may raise :class:`TransientError` while it is not known), used once."""

    public: bool = False
    service_owner: Callable[[], str | None] | None = None
    _seen: set[tuple[str, bytes]] = field(default_factory=set)
    _expiry: list[tuple[int, str, bytes]] = field(default_factory=list)  # heap: when each seen read goes stale

    def check(self, header: str | None, target: str, vm_id: str, owner: str | None, now: float) -> None:
        """Return if the request with ``Authorization: header`` for ``target`` may read VM ``vm_id``
        (owned by ``owner``); else raise :class:`Unauthorized` (or :class:`TooManySigned`)."""
        if self.public:
            return
        if header is None:
            raise Unauthorized(f"the console is private: sign the request (Authorization: {SCHEME} "
                               f"<address>:<unix seconds>:<0x signature>, a personal_sign of "
                               f"'microvm-blueprint GET {target} <unix seconds>') as the VM's owner")
        m = _HEADER.fullmatch(header.strip())
        if m is None:
            raise Unauthorized(f"malformed Authorization header: expected {SCHEME} <0x address>:<unix seconds>:"
                               "<0x 65-byte signature>")
        claimed, at, signature = m.group(1), int(m.group(2)), bytes.fromhex(m.group(3)[2:])
        if now - at > MAX_AGE:
            raise Unauthorized(f"stale signature: signed {now - at:.0f} s ago, at most {MAX_AGE} s is accepted")
        if at - now > MAX_AHEAD:
            raise Unauthorized(f"signature from the future: {at - now:.0f} s ahead of the server's clock "
                               f"(at most {MAX_AHEAD} s)")
        text = message(target, at)
        signer = recover(text, signature)
        if not _same(signer, claimed):
            raise Unauthorized(f"signature is not by {claimed} (wrong key, or it signs another request or time)")
        if not _same(signer, owner) and not _same(signer, self._service_owner()):
            raise Unauthorized(f"{signer} may not read the console of vm '{vm_id}': only its owner and the "
                               "service owner may")
        self._remember(signer.lower(), text, at, now)

    def _service_owner(self) -> str | None:
        if self.service_owner is None:
            return None
        try:
            return self.service_owner()
        except TransientError:
            return None  # not read from the chain yet: only VM owners, for now

    def _remember(self, signer: str, text: bytes, at: int, now: float) -> None:
        while self._expiry and now - self._expiry[0][0] > MAX_AGE:
            _, s, t = heapq.heappop(self._expiry)
            self._seen.discard((s, t))
        key = (signer, text)
        if key in self._seen:
            raise Unauthorized("replayed signature: this signed request was already answered; sign each read anew")
        if len(self._seen) >= REMEMBERED:
            raise TooManySigned(f"more than {REMEMBERED} signed reads in {MAX_AGE} s; try again shortly")
        self._seen.add(key)
        heapq.heappush(self._expiry, (at, signer, text))
