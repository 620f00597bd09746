"""A blueprint's definition on Tangle (tnt-core ``Types.BlueprintDefinition``) and ``createBlueprint``.

This layer knows the struct, its ABI encoding and the TLV job schema format; which jobs a blueprint
has is the blueprint layer's business (``blueprint/definition.py`` builds this one's from its job
table).

Read from tnt-core (``src/libraries/Types.sol``, ``SchemaLib.sol``, ``core/BlueprintsCreate.sol``
at 8a2b24c) and blueprint-sdk's ``cargo tangle blueprint deploy`` (``cli/src/command/deploy/
definition.rs`` at 4c85bd163):

- ``createBlueprint(BlueprintDefinition)`` reverts ``BlueprintMetadataRequired`` on an empty
  ``metadataUri``, ``BlueprintMetadataHashRequired`` on a zero ``metadataHash``, ``InvalidState`` on
  no jobs, ``BlueprintMembershipRequired`` on no supported membership, and (newer contracts)
  ``BlueprintSourcesRequired`` / ``BlueprintBinaryRequired`` / ``BlueprintBinaryHashRequired`` on a
  source without a binary or a binary without its sha256. Job count and order are load-bearing: the
  job index of ``submitJob`` is the position in ``jobs``.
- A job schema is TLV "version 2": ``0x02``, ``uint16`` field count (big-endian), then per field a
  5-byte header (``uint8`` kind, ``uint16`` array length, ``uint16`` child count), the field name
  (compact length + UTF-8) and the children; a ``T[]`` is a List (21) with one unnamed child ``T``.
  Empty bytes mean "no schema". **When a schema is stored, the contract validates the job's inputs
  (``submitJob``) and results (``submitResult``) against it in the compact binary payload format**
  (a ``string`` is compact length + bytes, a ``uint32`` 4 bytes, a ``bool`` 1 byte), not in the ABI
  encoding blueprint-sdk's ``TangleResult`` and this operator use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from eth_abi import decode, encode

from .contracts import (
    APPROVE_SERVICE,
    BLUEPRINT_CREATED,
    CREATE_BLUEPRINT,
    REQUEST_SERVICE,
    selector_bytes,
    topic,
)
from .errors import TangleError
from .keystore import OperatorKey
from .rpc import ContractRevert, JsonRpc
from .transact import GAS_MULTIPLIER, send_and_confirm

log = logging.getLogger(__name__)


class DefinitionError(TangleError):
    """A blueprint definition that cannot be encoded, or a ``createBlueprint`` that failed."""


class Membership(IntEnum):
    FIXED = 0
    DYNAMIC = 1


class Pricing(IntEnum):
    PAY_ONCE = 0
    SUBSCRIPTION = 1
    EVENT_DRIVEN = 2


class SourceKind(IntEnum):
    CONTAINER = 0
    WASM = 1
    NATIVE = 2


class Fetcher(IntEnum):
    NONE = 0
    IPFS = 1
    HTTP = 2
    GITHUB = 3


class Arch(IntEnum):
    WASM32 = 0
    WASM64 = 1
    WASI32 = 2
    WASI64 = 3
    AMD32 = 4
    AMD64 = 5
    ARM32 = 6
    ARM64 = 7
    RISCV32 = 8
    RISCV64 = 9


class Os(IntEnum):
    UNKNOWN = 0
    LINUX = 1
    WINDOWS = 2
    MACOS = 3
    BSD = 4


# ---- job schemas (tnt-core SchemaLib, TLV version 2) -------------------------------------------

SCHEMA_VERSION = 0x02
#: ``Types.BlueprintFieldKind`` of each scalar Solidity type
FIELD_KINDS: dict[str, int] = {
    "void": 0, "bool": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "uint32": 6, "int32": 7,
    "uint64": 8, "int64": 9, "uint128": 10, "int128": 11, "uint256": 12, "int256": 13, "address": 14,
    "bytes32": 15, "string": 17, "bytes": 18,
}
KIND_ARRAY = 20  # T[n]
KIND_LIST = 21  # T[]
_KIND_NAMES = {v: k for k, v in FIELD_KINDS.items()}
_ARRAY = re.compile(r"^(.+)\[(\d*)\]$")


def _compact_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x4000:
        return bytes([0x80 | (n >> 8), n & 0xFF])
    if n < 0x200000:
        return bytes([0xC0 | (n >> 16), (n >> 8) & 0xFF, n & 0xFF])
    raise DefinitionError(f"schema name of {n} bytes is too long")


def _field(name: str, typ: str) -> bytes:
    name_bytes = _compact_length(len(name.encode())) + name.encode()
    m = _ARRAY.match(typ)
    if m:
        base, size = m.group(1), m.group(2)
        kind, length = (KIND_ARRAY, int(size)) if size else (KIND_LIST, 0)
        if length > 0xFFFF:
            raise DefinitionError(f"array {typ} is too long for a schema")
        return bytes([kind]) + length.to_bytes(2, "big") + (1).to_bytes(2, "big") + name_bytes + _field("", base)
    if typ not in FIELD_KINDS:
        raise DefinitionError(f"type {typ!r} has no schema kind (tuples are not used by this blueprint)")
    return bytes([FIELD_KINDS[typ]]) + bytes(4) + name_bytes


def encode_schema(fields: Sequence[tuple[str, str]]) -> bytes:
    """The TLV schema of ``(name, solidity type)`` fields; no fields is empty bytes (no schema)."""
    if not fields:
        return b""
    return bytes([SCHEMA_VERSION]) + len(fields).to_bytes(2, "big") + b"".join(_field(n, t) for n, t in fields)


def decode_schema(data: bytes) -> list[tuple[str, str]]:
    """The ``(name, type)`` fields of a TLV schema (inverse of :func:`encode_schema`)."""
    if not data:
        return []
    if data[0] != SCHEMA_VERSION:
        raise DefinitionError(f"schema version {data[0]} is not {SCHEMA_VERSION}")
    count = int.from_bytes(data[1:3], "big")
    pos = 3

    def read() -> tuple[str, str]:
        nonlocal pos
        if pos + 5 > len(data):
            raise DefinitionError("schema ends inside a field header")
        kind, length, children = data[pos], int.from_bytes(data[pos + 1:pos + 3], "big"), int.from_bytes(
            data[pos + 3:pos + 5], "big")
        pos += 5
        first = data[pos]
        if first < 0x80:
            n, pos = first, pos + 1
        elif first < 0xC0:
            n, pos = ((first & 0x3F) << 8) | data[pos + 1], pos + 2
        else:
            n, pos = ((first & 0x1F) << 16) | (data[pos + 1] << 8) | data[pos + 2], pos + 3
        name = data[pos:pos + n].decode()
        pos += n
        if kind in (KIND_ARRAY, KIND_LIST):
            if children != 1:
                raise DefinitionError("an array schema field has exactly one child")
            _, base = read()
            return name, f"{base}[{length if kind == KIND_ARRAY else ''}]"
        if kind not in _KIND_NAMES or children:
            raise DefinitionError(f"schema field kind {kind} is not one this blueprint uses")
        return name, _KIND_NAMES[kind]

    out = [read() for _ in range(count)]
    if pos != len(data):
        raise DefinitionError(f"{len(data) - pos} bytes after the schema's last field")
    return out


# ---- the definition struct -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobDefinition:
    """``Types.JobDefinition``: schemas are TLV bytes (:func:`encode_schema`), empty for none."""

    name: str
    description: str
    metadata_uri: str = ""
    params_schema: bytes = b""
    result_schema: bytes = b""

    def abi(self) -> tuple[object, ...]:
        return (self.name, self.description, self.metadata_uri, self.params_schema, self.result_schema)


@dataclass(frozen=True)
class Metadata:
    """``Types.BlueprintMetadata`` (the contract keeps ``name`` and ``profilingData``; the rest is in
    its events and the metadata document)."""

    name: str
    description: str = ""
    author: str = ""
    category: str = ""
    code_repository: str = ""
    logo: str = ""
    website: str = ""
    license: str = ""
    profiling_data: str = ""

    def abi(self) -> tuple[str, ...]:
        return (self.name, self.description, self.author, self.category, self.code_repository, self.logo,
                self.website, self.license, self.profiling_data)


@dataclass(frozen=True)
class Binary:
    """``Types.BlueprintBinary``: one build of the native artifact and its sha256."""

    arch: Arch
    os: Os
    name: str
    sha256: bytes

    def abi(self) -> tuple[object, ...]:
        if len(self.sha256) != 32 or self.sha256 == bytes(32):
            raise DefinitionError(f"binary {self.name!r} needs its 32-byte sha256 (the contract refuses zero)")
        return (int(self.arch), int(self.os), self.name, self.sha256)


@dataclass(frozen=True)
class NativeSource:
    """A ``Types.BlueprintSource`` of kind Native: the manager fetches ``artifact_uri`` with
    ``fetcher`` and runs ``entrypoint`` (the container, wasm and testing parts stay empty)."""

    fetcher: Fetcher
    artifact_uri: str
    entrypoint: str
    binaries: tuple[Binary, ...]

    def abi(self) -> tuple[object, ...]:
        if not self.binaries:
            raise DefinitionError("a native source needs at least one binary")
        return (int(SourceKind.NATIVE), ("", "", ""), (0, 0, "", ""),
                (int(self.fetcher), self.artifact_uri, self.entrypoint), ("", "", ""),
                [b.abi() for b in self.binaries])


@dataclass(frozen=True)
class Config:
    """``Types.BlueprintConfig`` (sent with ``hasConfig`` true)."""

    membership: Membership = Membership.FIXED
    pricing: Pricing = Pricing.PAY_ONCE
    min_operators: int = 1
    max_operators: int = 0  # 0: no maximum
    subscription_rate: int = 0
    subscription_interval: int = 0
    event_rate: int = 0

    def abi(self) -> tuple[int, ...]:
        return (int(self.membership), int(self.pricing), self.min_operators, self.max_operators,
                self.subscription_rate, self.subscription_interval, self.event_rate)


ZERO_ADDRESS = "0x" + "00" * 20


@dataclass(frozen=True)
class BlueprintDefinition:
    """``Types.BlueprintDefinition``, the argument of ``createBlueprint``."""

    metadata_uri: str
    metadata_hash: bytes
    metadata: Metadata
    jobs: tuple[JobDefinition, ...]
    sources: tuple[NativeSource, ...]
    config: Config = field(default_factory=Config)
    supported_memberships: tuple[Membership, ...] = (Membership.FIXED, Membership.DYNAMIC)
    manager: str = ZERO_ADDRESS
    master_manager_revision: int = 0  # 0: the latest master manager
    registration_schema: bytes = b""
    request_schema: bytes = b""

    def abi(self) -> tuple[object, ...]:
        if not self.metadata_uri:
            raise DefinitionError("the definition needs a metadata URI (the contract refuses an empty one)")
        if len(self.metadata_hash) != 32 or self.metadata_hash == bytes(32):
            raise DefinitionError("the definition needs the metadata document's 32-byte hash")
        if not self.jobs:
            raise DefinitionError("the definition needs at least one job")
        if not self.sources:
            raise DefinitionError("the definition needs at least one source")
        if not self.supported_memberships:
            raise DefinitionError("the definition needs at least one supported membership model")
        if len(self.jobs) > 256:
            raise DefinitionError("a job index is a uint8: at most 256 jobs")
        return (self.metadata_uri, self.metadata_hash, self.manager, self.master_manager_revision, True,
                self.config.abi(), self.metadata.abi(), [j.abi() for j in self.jobs], self.registration_schema,
                self.request_schema, [s.abi() for s in self.sources], [int(m) for m in self.supported_memberships])


#: the ABI type of ``Types.BlueprintDefinition``
DEFINITION_TYPE = (
    "(string,bytes32,address,uint32,bool,(uint8,uint8,uint32,uint32,uint256,uint64,uint256),"
    "(string,string,string,string,string,string,string,string,string),(string,string,string,bytes,bytes)[],"
    "bytes,bytes,(uint8,(string,string,string),(uint8,uint8,string,string),(uint8,string,string),"
    "(string,string,string),(uint8,uint8,string,bytes32)[])[],uint8[])"
)
SEL_CREATE_BLUEPRINT = selector_bytes(CREATE_BLUEPRINT)
TOPIC_BLUEPRINT_CREATED = topic(BLUEPRINT_CREATED)


def create_blueprint_data(definition: BlueprintDefinition) -> bytes:
    """Calldata of ``createBlueprint(BlueprintDefinition)``."""
    return SEL_CREATE_BLUEPRINT + encode([DEFINITION_TYPE], [definition.abi()])


def decode_definition(data: bytes) -> tuple[object, ...]:
    """``getBlueprintDefinition``'s answer as nested tuples (tests compare it with what was sent)."""
    (value,) = decode([DEFINITION_TYPE], data)
    return tuple(value)


#: what a revert of ``createBlueprint`` means
CREATE_HINTS = {
    "BlueprintMetadataRequired": "the metadata URI is empty",
    "BlueprintMetadataHashRequired": "the metadata hash is zero",
    "InvalidState": "no jobs, or a subscription price without a rate and interval",
    "BlueprintMembershipRequired": "no supported membership model",
    "BlueprintSourcesRequired": "no source",
    "BlueprintBinaryRequired": "a source has no binary",
    "BlueprintBinaryHashRequired": "a binary has no sha256",
    "MBSMRegistryNotSet": "this Tangle deployment has no master blueprint service manager registry",
    "MasterManagerUnavailable": "no master blueprint service manager at the requested revision",
    "InvalidRevision": "the master blueprint service manager registry has no such revision",
    "EnforcedPause": "the Tangle contract is paused",
}


@dataclass(frozen=True)
class CreatedBlueprint:
    blueprint_id: int
    owner: str
    tx_hash: str


def explain_create_revert(exc: ContractRevert, sender: str) -> str:
    name = exc.name or (f"unknown error {exc.selector}" if exc.selector else "no reason given")
    hint = CREATE_HINTS.get(exc.name or "")
    return f"createBlueprint from {sender} reverted: {name}" + (f" ({hint})" if hint else "")


async def create_blueprint(
    rpc: JsonRpc, contract: str, key: OperatorKey, definition: BlueprintDefinition, *,
    receipt_timeout: float = 120.0, gas_multiplier: float = GAS_MULTIPLIER,
) -> CreatedBlueprint:
    """Send ``createBlueprint`` signed by ``key`` (the blueprint's owner) and return the new id (from
    ``BlueprintCreated``). The gas is estimated first, so a definition the contract refuses is named
    (:data:`CREATE_HINTS`) before anything is spent."""
    me = key.address
    data = create_blueprint_data(definition)
    try:
        estimate = await rpc.estimate_gas(contract, data, me)
    except ContractRevert as exc:
        raise DefinitionError(explain_create_revert(exc, me)) from exc
    tx_hash, receipt = await send_and_confirm(rpc, key, contract, data, estimate, what="createBlueprint",
                                              error=DefinitionError, receipt_timeout=receipt_timeout,
                                              gas_multiplier=gas_multiplier)
    for entry in receipt.get("logs", []):
        topics = entry.get("topics", [])
        if (len(topics) >= 3 and topics[0] == TOPIC_BLUEPRINT_CREATED
                and str(entry.get("address", "")).lower() == contract.lower()):
            return CreatedBlueprint(int(topics[1], 16), "0x" + topics[2][-40:], tx_hash)
    raise DefinitionError(f"createBlueprint transaction {tx_hash} succeeded but emitted no BlueprintCreated")


# ---- a service of the blueprint (the customer requests, each operator approves) -------------------

APPROVAL_TYPE = "(uint64,((uint8,address),uint16)[],uint256[4],uint256[2],(uint8,bytes32,bytes32,uint64)[])"


def request_service_data(blueprint_id: int, operators: Sequence[str], permitted_callers: Sequence[str], *,
                         ttl: int = 0, config: bytes = b"") -> bytes:
    """Calldata of ``requestService`` paid with nothing (native token, amount 0), any confidentiality."""
    return selector_bytes(REQUEST_SERVICE) + encode(
        ["uint64", "address[]", "bytes", "address[]", "uint64", "address", "uint256", "uint8"],
        [blueprint_id, list(operators), config, list(permitted_callers), ttl, ZERO_ADDRESS, 0, 0],
    )


def approve_service_data(request_id: int) -> bytes:
    """Calldata of ``approveService`` with the default exposure: no security, BLS or TEE commitments."""
    return selector_bytes(APPROVE_SERVICE) + encode([APPROVAL_TYPE], [(request_id, [], [0] * 4, [0] * 2, [])])
